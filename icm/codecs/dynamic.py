"""Dynamic adaptation (ICIP 2024, "Learned Image Compression for Both Humans and Machines via
Dynamic Adaptation"; METHODS.md §4).

* ``PostDecoder`` — the network g_t the paper draws (its code was not released): 5×5 conv → RB →
  RB → AB → RB → RB → 5×5 conv with a global residual, x̄ = x̂ + g_t(x̂); RB = 1×1–ReLU–3×3–ReLU–1×1
  plus identity, AB = Cheng2020's attention block from CompressAI. Its last conv starts at zero:
  an untrained g_t is the identity.
* ``DynamicCodec`` — a CompressAI codec plus g_t. One bitstream: people get x̂, machines x̄ —
  UG-ICM's promise reached from the other side. Trained with the detector's own training losses
  on x̄, the codec frozen (``loss: dynamic``: it then runs as it decodes — rounded latents, x̂
  clamped — so g_t learns on the x̂ it will see), or jointly ``R + λ_h·MSE(x, x̂) + λ_m·L_det(x̄)``
  (``loss: dynamic_joint``, the codec in train mode).

Per-image latent refinement, this project's addition, is ``icm.codecs.refine``.
"""

from __future__ import annotations

import torch
from compressai.layers import AttentionBlock
from torch import nn

from icm.codecs.base import CodecWrapper
from icm.codecs.refine import coded_forward


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
        self.codec_frozen = False

    def freeze_codec(self, frozen: bool = True) -> None:
        """``frozen``: only g_t trains, and ``forward`` runs the codec as it decodes."""
        self.codec_frozen = frozen
        self.codec.requires_grad_(not frozen)

    def forward(self, x: torch.Tensor) -> dict:
        if self.codec_frozen:   # x̂ as decoded: rounded latents (eval mode), clamped
            with torch.no_grad():
                out = coded_forward(self.codec, x)
            out["x_hat"] = out["x_hat"].clamp(0, 1)
        else:
            out = self.codec(x)
        return {**out, "x_bar": self.g_t(out["x_hat"])}

    def human_and_machine(self, x: torch.Tensor):
        out = self.codec(x)
        return out["likelihoods"], out["x_hat"], self.g_t(out["x_hat"].clamp(0, 1))

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
