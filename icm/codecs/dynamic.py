"""Dynamic adaptation (ICIP 2024, "Learned Image Compression for Both Humans and Machines via
Dynamic Adaptation"; METHODS.md §4) and per-image latent refinement.

* ``PostDecoder`` — the network g_t the paper draws (its code was not released): 5×5 conv → RB →
  RB → AB → RB → RB → 5×5 conv with a global residual, x̄ = x̂ + g_t(x̂); RB = 1×1–ReLU–3×3–ReLU–1×1
  plus identity, AB = Cheng2020's attention block from CompressAI. Its last conv starts at zero:
  an untrained g_t is the identity.
* ``DynamicCodec`` — a CompressAI codec plus g_t. One bitstream: people get x̂, machines x̄ —
  UG-ICM's promise reached from the other side. Trained with the detector's own training losses
  on x̄, the codec frozen (``loss: dynamic``), or jointly ``R + λ_h·MSE(x, x̂) + λ_m·L_det(x̄)``
  (``loss: dynamic_joint``).
* ``refine_latent`` — **this project's addition**, not the paper's: a few gradient steps on one
  image's latent y at encode time (straight-through rounding) against ``R + λ_m·L_det(decode(y))``
  for a frozen codec. The decoder is untouched, so any stock CompressAI decoder reads the result.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from compressai.layers import AttentionBlock
from torch import nn

from icm.codecs.base import CodecWrapper
from icm.losses.rd import bpp_of


class ResidualUnit(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels // 2, 1), nn.ReLU(inplace=True),
                                  nn.Conv2d(channels // 2, channels // 2, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(channels // 2, channels, 1))

    def forward(self, x):
        return x + self.body(x)


class PostDecoder(nn.Module):
    def __init__(self, channels: int = 64):
        super().__init__()
        self.head = nn.Conv2d(3, channels, 5, padding=2)
        self.body = nn.Sequential(ResidualUnit(channels), ResidualUnit(channels), AttentionBlock(channels),
                                  ResidualUnit(channels), ResidualUnit(channels))
        self.tail = nn.Conv2d(channels, 3, 5, padding=2)
        nn.init.zeros_(self.tail.weight)
        nn.init.zeros_(self.tail.bias)

    def forward(self, x_hat: torch.Tensor) -> torch.Tensor:
        return x_hat + self.tail(self.body(self.head(x_hat)))


class DynamicCodec(CodecWrapper):
    """A CompressAI codec (``codec``) and its post-decoder ``g_t``. ``forward`` → ``{"x_hat",
    "x_bar", "likelihoods"}``; ``decompress(..., machine=True)`` returns x̄ as ``x_hat``.
    ``state_dict`` keys: the codec's own plus ``g_t.*``."""

    def __init__(self, codec: nn.Module, channels: int = 64):
        super().__init__(codec)
        self.g_t = PostDecoder(channels)

    def forward(self, x: torch.Tensor) -> dict:
        out = self.codec(x)
        return {**out, "x_bar": self.g_t(out["x_hat"])}

    def decompress(self, strings, shape, machine: bool = False, **kwargs) -> dict:
        out = self.codec.decompress(strings, shape, **kwargs)
        return {**out, "x_hat": self.g_t(out["x_hat"]).clamp(0, 1)} if machine else out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        codec = {k: v for k, v in state_dict.items() if not k.startswith("g_t.")}
        post = {k[len("g_t."):]: v for k, v in state_dict.items() if k.startswith("g_t.")}
        self.codec.load_state_dict(codec, strict=strict)   # resizes the entropy coders' CDF buffers
        return self.g_t.load_state_dict(post, strict=strict)

    def state_dict(self, *args, **kwargs):
        return {**self.codec.state_dict(), **{f"g_t.{k}": v for k, v in self.g_t.state_dict().items()}}


class _FixedLatent(nn.Module):
    """Stands in for ``g_a``: returns the latent being refined, whatever the input."""

    def __init__(self, y: torch.Tensor):
        super().__init__()
        self.y = y

    def forward(self, _x):
        return self.y


def _ste_round(inputs: torch.Tensor, mode: str, means: torch.Tensor | None = None) -> torch.Tensor:
    """Rounding (to the means' grid) with the identity's gradient: straight-through."""
    offset = means if means is not None else 0
    return inputs + (torch.round(inputs - offset) + offset - inputs).detach()


@contextmanager
def latent_in_place_of_encoder(codec: nn.Module, y: torch.Tensor, straight_through: bool = False):
    """Run the codec's own ``forward``/``compress`` with ``y`` as the latent: every CompressAI
    codec starts both with ``y = self.g_a(x)``. ``straight_through``: its entropy models round
    with straight-through gradients (eval-mode forward) instead of adding noise."""
    g_a = codec.g_a
    patched = [m for m in codec.modules() if hasattr(m, "quantize") and hasattr(m, "_likelihood")]
    codec.g_a = _FixedLatent(y)
    if straight_through:
        for m in patched:
            m.quantize = _ste_round
    try:
        yield
    finally:
        codec.g_a = g_a
        for m in patched:
            m.__dict__.pop("quantize", None)


def refine_latent(codec: nn.Module, x: torch.Tensor, objective, steps: int = 10, lr: float = 0.5,
                  lmbda: float = 1.0) -> tuple[torch.Tensor, list[float]]:
    """Refine the latent of one padded image ``x`` (1×3×H×W) for a frozen ``codec``: ``steps`` Adam
    steps on y against ``bpp(y) + lmbda·objective(x̂(y))`` with straight-through rounding.
    Returns the best latent seen (compress it with ``compress_latent``) and the objective before
    each step (``history[0]``: the unrefined latent)."""
    codec.eval()
    with torch.no_grad():
        y = codec.g_a(x).clone()
    y.requires_grad_(True)
    opt = torch.optim.Adam([y], lr=lr)
    history, best = [], (float("inf"), y.detach().clone())
    n_pixels = x.shape[0] * x.shape[-2] * x.shape[-1]
    for step in range(steps + 1):
        with latent_in_place_of_encoder(codec, y, straight_through=True):
            out = codec(x)
        loss = bpp_of(out["likelihoods"], n_pixels) + lmbda * objective(out["x_hat"].clamp(0, 1))
        history.append(float(loss.detach()))
        if history[-1] < best[0]:
            best = (history[-1], y.detach().clone())
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return best[1], history


@torch.no_grad()
def compress_latent(codec: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """The codec's own ``compress`` of the latent ``y`` (for the image ``x`` it was refined on):
    a standard bitstream, decoded by the codec's unchanged ``decompress``."""
    with latent_in_place_of_encoder(codec, y):
        return codec.compress(x)
