"""The codec's forward on the latent its bitstream actually codes, and per-image latent refinement.

* ``coded_latent`` / ``coded_forward`` — a CompressAI codec's own ``forward`` with the rounding its
  ``compress`` does in place of the training noise (the medians' grid for the entropy bottleneck,
  the means' grid for a Gaussian conditional with means), optionally with straight-through
  gradients. For the context-model codecs (mbt2018, cheng2020) ``forward`` rounds y on the integer
  grid while ``compress`` codes ``round(y − μ) + μ`` position by position, μ predicted from the
  positions already coded; that ŷ is computed here and put in ``forward``'s place, so x̂, the
  likelihoods and the rate are those of the real bitstream (up to float round-off).
* ``refine_latent`` — **this project's addition**, not a published method (METHODS.md §4): a few
  Adam steps on one image's latent y at encode time against dynamic adaptation's training
  objective ``R + λ_h·255²·MSE(x, x̂) + λ_m·L_det(x̄)``, x̄ the machine decode where the codec has
  one (g_t's output for ``dynamic:``, β = 1 for ``ugicm:``), x̂ where it has none. The decoder is
  untouched: ``compress_latent`` writes a standard bitstream for the codec's own ``decompress``.
Every wrapper of this project (``dynamic:``, ``ugicm:``, ``adapt_icmh:``) and every plain
CompressAI codec works the same way: the latent is that of the wrapped codec (``.codec``).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
from compressai.models import JointAutoregressiveHierarchicalPriors
from torch import nn

from icm.codecs.base import CodecWrapper
from icm.losses.rd import bpp_of


def compression_model(model: nn.Module) -> nn.Module:
    """The CompressAI codec inside one of this project's wrappers (or the codec itself)."""
    return model.codec if isinstance(model, CodecWrapper) else model


class _FixedLatent(nn.Module):
    """Stands in for ``g_a``: returns the given latent, whatever the input."""

    def __init__(self, y: torch.Tensor):
        super().__init__()
        self.y = y

    def forward(self, _x):
        return self.y


def _rounded(straight_through: bool):
    def quantize(inputs: torch.Tensor, mode: str, means: torch.Tensor | None = None) -> torch.Tensor:
        """Rounding to the means' (or medians') grid, as ``compress`` does; with the identity's
        gradient when ``straight_through``."""
        offset = means if means is not None else 0
        rounded = torch.round(inputs - offset) + offset
        return inputs + (rounded - inputs).detach() if straight_through else rounded
    return quantize


@torch.no_grad()
def context_coded_latent(codec: JointAutoregressiveHierarchicalPriors, y: torch.Tensor) -> torch.Tensor:
    """The ŷ that ``codec.compress`` codes for latent ``y``: ``round(y − μ) + μ`` at each position
    in raster order, μ from the hyperprior and the masked context of the positions before it.

    It is the fixed point of ``ŷ ← round(y − μ(ŷ)) + μ(ŷ)`` with μ computed for all positions at
    once: each pass settles at least the next position in raster order (its context is causal),
    so the iteration reaches it — the one fixed point — within H·W passes, in practice far fewer."""
    z_hat, _ = codec.entropy_bottleneck(codec.h_a(y), training=False)   # as compress: the medians' grid
    params = codec.h_s(z_hat)
    y_hat = torch.round(y)
    for _ in range(y.shape[-2] * y.shape[-1] + 1):
        gaussian = codec.entropy_parameters(torch.cat([params, codec.context_prediction(y_hat)], dim=1))
        means = gaussian.chunk(2, 1)[1]
        settled = torch.round(y - means) + means
        if torch.equal(settled, y_hat):
            return y_hat
        y_hat = settled
    raise RuntimeError("the context model's coded latent did not settle within H·W passes")


@contextmanager
def coded_latent(model: nn.Module, y: torch.Tensor, straight_through: bool = False):
    """Inside, ``model``'s own ``forward`` (and ``compress``, which does its own rounding) runs
    on the latent ``y`` in place of ``g_a(x)``, rounded as ``compress`` rounds it (with
    straight-through gradients on request), the codec in eval mode."""
    codec = compression_model(model)
    entropy_models = [m for m in codec.modules() if hasattr(m, "quantize") and hasattr(m, "_likelihood")]
    coded = context_coded_latent(codec, y.detach()) if isinstance(codec, JointAutoregressiveHierarchicalPriors) else None
    quantize = _rounded(straight_through)

    def context_quantize(inputs, mode, means=None):
        # mbt2018/cheng2020's forward asks for ŷ without means (the integer grid): give it the coded ŷ
        if means is None:
            return inputs + (coded - inputs).detach() if straight_through else coded
        return quantize(inputs, mode, means)

    g_a, was_training = codec.g_a, codec.training
    codec.eval()
    codec.g_a = _FixedLatent(y)
    for m in entropy_models:
        m.quantize = quantize
    if coded is not None:
        codec.gaussian_conditional.quantize = context_quantize
    try:
        yield codec
    finally:
        codec.g_a = g_a
        for m in entropy_models:
            m.__dict__.pop("quantize", None)
        codec.train(was_training)


def coded_forward(model: nn.Module, x: torch.Tensor) -> dict:
    """The wrapped CompressAI codec's ``forward`` as its bitstream decodes: ``{"x_hat",
    "likelihoods"}`` of the coded latent (x̂ not clamped: ``decompress`` clamps it)."""
    codec = compression_model(model)
    with coded_latent(model, codec.g_a(x)) as inner:
        return inner(x)


def _decodes(model: nn.Module, x: torch.Tensor) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """(likelihoods, human decode x̂, machine decode x̄) of ``model``'s forward, both clamped."""
    if isinstance(model, CodecWrapper):
        likelihoods, x_hat, x_bar = model.human_and_machine(x)
    else:
        out = model(x)
        likelihoods, x_hat, x_bar = out["likelihoods"], out["x_hat"], out["x_hat"]
    return likelihoods, x_hat.clamp(0, 1), x_bar.clamp(0, 1)


def refine_latent(model: nn.Module, x: torch.Tensor, detection_loss: Callable[[torch.Tensor], torch.Tensor] | None,
                  steps: int = 10, lr: float = 0.5, lmbda: float = 0.0130, lmbda_machine: float = 1.0,
                  pad: tuple[int, int, int, int] = (0, 0, 0, 0)) -> tuple[torch.Tensor, list[dict]]:
    """Refine the latent of one padded image ``x`` (1×3×H×W, ``pad`` = its padding (left, right,
    top, bottom)) for a frozen ``model``: ``steps`` Adam steps on y against
    ``R + lmbda·255²·MSE(x, x̂) + lmbda_machine·detection_loss(x̄)`` of the coded latent
    (straight-through rounding; R in bits per pixel of the unpadded image, the MSE over it).
    Returns the latent with the lowest objective seen (compress it with ``compress_latent``) and
    each evaluated latent's terms (``history[0]``: the unrefined one)."""
    model.eval()
    codec = compression_model(model)
    with torch.no_grad():
        y = codec.g_a(x).clone()
    y.requires_grad_(True)
    opt = torch.optim.Adam([y], lr=lr)
    left, right, top, bottom = pad
    h, w = x.shape[-2] - top - bottom, x.shape[-1] - left - right
    region = (..., slice(top, top + h), slice(left, left + w))
    history, best = [], (float("inf"), y.detach().clone())
    for step in range(steps + 1):
        with coded_latent(model, y, straight_through=True):
            likelihoods, x_hat, x_bar = _decodes(model, x)
        rate = bpp_of(likelihoods, h * w)
        mse = torch.mean((x_hat[region] - x[region]) ** 2)
        machine = detection_loss(x_bar) if detection_loss is not None and lmbda_machine else rate * 0
        loss = rate + lmbda * 255 ** 2 * mse + lmbda_machine * machine
        history.append({"objective": float(loss.detach()), "bpp": float(rate.detach()), "mse": float(mse.detach()),
                        "detection": float(machine.detach())})
        if history[-1]["objective"] < best[0]:
            best = (history[-1]["objective"], y.detach().clone())
        if step == steps:
            break
        y.grad, = torch.autograd.grad(loss, [y])   # the latent's gradient only: nothing accumulates in the codec
        opt.step()
    return best[1], history


@torch.no_grad()
def compress_latent(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """The codec's own ``compress`` of the latent ``y`` (for the image ``x`` it was refined on):
    a standard bitstream, decoded by the codec's unchanged ``decompress``."""
    codec = compression_model(model)
    g_a = codec.g_a
    codec.g_a = _FixedLatent(y)
    try:
        return model.compress(x)
    finally:
        codec.g_a = g_a
