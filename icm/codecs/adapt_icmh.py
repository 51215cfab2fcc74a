"""Adapt-ICMH (ECCV 2024, "Image Compression for Machine and Human Vision With Spatial-Frequency
Adaptation"; METHODS.md §3): spatial-frequency modulation adapters (SFMA) in a frozen codec.

An SFMA adapter (in_dim C, mid 64) adds ``factor·(spatial(x) + frequency(x))`` to its input:

* frequency branch — 1×1 down → rfft2 (``norm="backward"``, unscaled) → amplitude ``|Y|`` gated by
  ``sigmoid(1×1(ReLU(depthwise 3×3(|Y|))))``, phase kept → irfft2 → ReLU → 1×1 up;
* spatial branch — gated: two 1×1 downs, a depthwise 5×5 on one, their product, ReLU, 1×1 up.

Adapters go after the first three stages of the analysis transform and of the synthesis transform
(6 adapters; a stage ends where the next resolution change begins). Only adapter parameters train,
without gradient clipping, on ``task_λ·perceptual(clamp(x̂, 0, 1), x) + bpp`` (the authors clamp
x̂ before the task network); the base codec, its entropy models and their CDF tables stay frozen.
The up projections start at zero, so an untrained adapted codec is the base codec.

Departures, said plainly: the authors used a transformer codec (TIC) and report likelihood bpp
only; here the adapters sit on any CompressAI codec and every bpp is that of the real bitstream
(the encoder adapters change the latent, so the adapter's bit cost is measured, not assumed).
"""

from __future__ import annotations

import torch
from torch import nn

from icm.codecs.base import CodecWrapper


class SFMA(nn.Module):
    def __init__(self, channels: int, mid: int = 64, factor: float = 1.0):
        super().__init__()
        self.factor = factor
        self.freq_down = nn.Conv2d(channels, mid, 1)
        self.freq_gate = nn.Sequential(nn.Conv2d(mid, mid, 3, padding=1, groups=mid), nn.ReLU(inplace=True),
                                       nn.Conv2d(mid, mid, 1))
        self.freq_up = nn.Conv2d(mid, channels, 1)
        self.spatial_a = nn.Conv2d(channels, mid, 1)
        self.spatial_b = nn.Sequential(nn.Conv2d(channels, mid, 1), nn.Conv2d(mid, mid, 5, padding=2, groups=mid))
        self.spatial_up = nn.Conv2d(mid, channels, 1)
        for up in (self.freq_up, self.spatial_up):   # identity at initialisation
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)

    def frequency(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        spectrum = torch.fft.rfft2(self.freq_down(x).float())   # norm="backward", as the authors
        amplitude, phase = spectrum.abs(), spectrum.angle()
        amplitude = amplitude * torch.sigmoid(self.freq_gate(amplitude))
        y = torch.fft.irfft2(torch.polar(amplitude, phase), s=(h, w)).to(x.dtype)
        return self.freq_up(torch.relu(y))

    def spatial(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial_up(torch.relu(self.spatial_a(x) * self.spatial_b(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.factor * (self.spatial(x) + self.frequency(x))


def _stage_ends(layers: nn.Sequential, in_channels: int, size: int) -> list[tuple[str, int]]:
    """(child name, its output channels) after which each stage ends: the child just before each
    later resolution change (from one dry run)."""
    names = [name for name, _ in layers.named_children()]
    h = torch.zeros(1, in_channels, size, size)
    changes, channels = [], []
    with torch.no_grad():
        for i, child in enumerate(layers.children()):
            out = child(h)
            if out.shape[-1] != h.shape[-1]:
                changes.append(i)
            channels.append(out.shape[1])
            h = out
    return [(names[j - 1], channels[j - 1]) for j in changes[1:]]


class AdaptedTransform(nn.Module):
    """A CompressAI transform (``nn.Sequential``) with an adapter after each of its first three
    stages; its own children keep their names, so base checkpoints load unchanged."""

    def __init__(self, layers: nn.Sequential, in_channels: int, size: int, mid: int = 64, stages: int = 3):
        super().__init__()
        ends = _stage_ends(layers, in_channels, size)[:stages]
        self.order = [name for name, _ in layers.named_children()]
        for name, child in layers.named_children():
            self.add_module(name, child)
        self.adapters = nn.ModuleDict({name: SFMA(ch, mid) for name, ch in ends})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.order:
            x = getattr(self, name)(x)
            if name in self.adapters:
                x = self.adapters[name](x)
        return x


class AdaptICMH(CodecWrapper):
    """A frozen CompressAI codec with SFMA adapters in ``g_a`` and ``g_s``. ``forward``,
    ``compress`` and ``decompress`` are the codec's own; ``state_dict`` keys are the codec's plus
    ``g_a.adapters.*`` / ``g_s.adapters.*``."""

    def __init__(self, codec: nn.Module, mid: int = 64):
        latent = next(m.in_channels for m in codec.g_s.modules() if hasattr(m, "in_channels"))
        codec.g_a = AdaptedTransform(codec.g_a, 3, 256, mid)
        codec.g_s = AdaptedTransform(codec.g_s, latent, 4, mid)
        super().__init__(codec)
        self.freeze_base()

    def freeze_base(self) -> None:
        """Only the adapters train: the base codec, its entropy models and CDF tables stay as loaded."""
        self.codec.requires_grad_(False)
        for p in self.adapter_parameters():
            p.requires_grad_(True)

    def adapter_parameters(self):
        return [p for t in (self.codec.g_a, self.codec.g_s) for p in t.adapters.parameters()]

    def forward(self, x: torch.Tensor) -> dict:
        return self.codec(x)
