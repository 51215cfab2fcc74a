"""UG-ICM's β-conditioned decoder (AAAI 2025, "Unified Coding for Both Human Perception and
Generalized Machine Analytics with CLIP Supervision"; METHODS.md §2).

One bitstream: the encoder and entropy model of any CompressAI codec stay as they are; its
synthesis transform gets a conditioned residual block (the authors' PCDM) before each upsampling
stage (4 for a 4-stage ``g_s``, as the authors have; the first acts on ŷ itself where ``g_s``
starts by upsampling, as bmshj2018's and mbt2018's do), driven by c = MLP(Fourier(β)) with the
authors' ``BetaMlp`` Linear–ReLU–Linear–ReLU (21 → 512 → 512, so c ≥ 0); β = 0 decodes for
humans, β = 1 for machines.

Where this departs from the authors (YinKangSheng/UG-ICM ``modules/transform/synthesis.py``):
their PCDMs *replace* MLIC++'s residual blocks, so the first maps M → N channels; here the blocks
are *added* to a CompressAI ``g_s`` (whose own first layer maps M → N), so the first keeps M
channels, and each block's second conv and both shifts start at zero — an untrained block is the
identity, and a trained plain codec decodes unchanged until training moves it.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from icm.codecs.base import CodecWrapper


def fourier_features(beta: torch.Tensor, frequencies: int = 10) -> torch.Tensor:
    """β (B,) → [β, sin(2^k β), cos(2^k β)] for k = 0..frequencies-1: (B, 1 + 2·frequencies)."""
    beta = beta.reshape(-1, 1).float()
    scaled = beta * (2.0 ** torch.arange(frequencies, device=beta.device, dtype=beta.dtype))
    return torch.cat([beta, scaled.sin(), scaled.cos()], dim=1)


class ConditionedBlock(nn.Module):
    """conv–GELU–shift–conv–GELU–shift + skip, each shift a bias-free ``Linear(c)`` per channel
    (the authors' PCDM). The second conv and both shifts start at zero, so an untrained block is
    the identity and a pretrained codec decodes as before until training moves it."""

    def __init__(self, channels: int, cond_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.shift1 = nn.Linear(cond_dim, channels, bias=False)
        self.shift2 = nn.Linear(cond_dim, channels, bias=False)
        self.act = nn.GELU()
        for layer in (self.conv2, self.shift1, self.shift2):
            nn.init.zeros_(layer.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.act(self.conv1(x)) + self.shift1(c)[:, :, None, None]
        h = self.act(self.conv2(h)) + self.shift2(c)[:, :, None, None]
        return x + h


class FixedCondition(nn.Module):
    """A conditioned block at one fixed condition ``c``: an ordinary residual block."""

    def __init__(self, block: ConditionedBlock, c: torch.Tensor):
        super().__init__()
        self.block = block
        self.register_buffer("c", c.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x, self.c.expand(x.shape[0], -1))


def _upsampling_children(layers: nn.Sequential, latent_channels: int) -> tuple[list[int], list[int]]:
    """Indices of the children that enlarge their input, and every child's output channels
    (from one dry run on a small latent)."""
    h = torch.zeros(1, latent_channels, 4, 4)
    ups, channels = [], []
    with torch.no_grad():
        for i, layer in enumerate(layers):
            out = layer(h)
            if out.shape[-1] > h.shape[-1]:
                ups.append(i)
            channels.append(out.shape[1])
            h = out
    return ups, channels


class ConditionalSynthesis(nn.Module):
    """A CompressAI ``g_s`` (a ``nn.Sequential``) with a conditioned block before every
    upsampling stage (the first on ŷ: ``blocks["y_hat"]``), and the β → c MLP. ``c`` is set by
    ``UGICM`` per call."""

    INPUT = "y_hat"   # the key of the block acting on ŷ, before the first child

    def __init__(self, g_s: nn.Sequential, cond_dim: int = 512, frequencies: int = 10):
        super().__init__()
        latent = next(m.in_channels for m in g_s.modules() if hasattr(m, "in_channels"))
        ups, channels = _upsampling_children(g_s, latent)
        self.order = [name for name, _ in g_s.named_children()]
        for name, child in g_s.named_children():  # same keys as the plain codec's g_s.<i>.*
            self.add_module(name, child)
        inputs = [latent] + channels   # the channels entering each child
        self.blocks = nn.ModuleDict({(self.order[j - 1] if j else self.INPUT): ConditionedBlock(inputs[j], cond_dim)
                                     for j in ups})
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(1 + 2 * frequencies, cond_dim), nn.ReLU(),
                                 nn.Linear(cond_dim, cond_dim), nn.ReLU())
        self.c: torch.Tensor | None = None

    def condition(self, beta: torch.Tensor) -> torch.Tensor:
        return self.mlp(fourier_features(beta, self.frequencies))

    def forward(self, y_hat: torch.Tensor) -> torch.Tensor:
        if self.c is None:
            raise RuntimeError("ConditionalSynthesis called without a condition: use UGICM(x, beta)")
        if self.c.shape[0] == 2 * y_hat.shape[0]:  # both decodes of every latent (UGICM.BOTH)
            y_hat = torch.cat([y_hat, y_hat])
        c = self.c.expand(y_hat.shape[0], -1) if self.c.shape[0] == 1 else self.c
        h = self.blocks[self.INPUT](y_hat, c) if self.INPUT in self.blocks else y_hat
        for name in self.order:
            h = getattr(self, name)(h)
            if name in self.blocks:
                h = self.blocks[name](h, c)
        return h


class UGICM(CodecWrapper):
    """A CompressAI codec whose decoder is conditioned on β; ``compress`` is the codec's own.

    ``forward(x, beta)`` → CompressAI's ``{"x_hat", "likelihoods"}`` with one β per sample, or
    with ``beta=UGICM.BOTH`` both decodes of every sample from one encode (``x_hat`` holds the
    n human decodes, then the n machine decodes); ``decompress(strings, shape, beta)`` decodes
    one bitstream for humans (0) or machines (1).
    ``state_dict`` keys are the codec's own plus ``g_s.blocks.*`` / ``g_s.mlp.*``.
    """

    BOTH = "both"

    def __init__(self, codec: nn.Module, cond_dim: int = 512, frequencies: int = 10):
        codec.g_s = ConditionalSynthesis(codec.g_s, cond_dim, frequencies)
        super().__init__(codec)

    @contextmanager
    def conditioned(self, beta):
        g_s = self.codec.g_s
        beta = torch.as_tensor(beta, dtype=torch.float32, device=next(g_s.mlp.parameters()).device).reshape(-1)
        g_s.c = g_s.condition(beta)
        try:
            yield
        finally:
            g_s.c = None

    def forward(self, x: torch.Tensor, beta) -> dict:
        if isinstance(beta, str) and beta == self.BOTH:
            beta = torch.cat([torch.zeros(len(x)), torch.ones(len(x))])
        with self.conditioned(beta):
            return self.codec(x)

    def decompress(self, strings, shape, beta=0.0, **kwargs) -> dict:
        with self.conditioned(beta):
            return self.codec.decompress(strings, shape, **kwargs)

    def human_and_machine(self, x: torch.Tensor):
        out = self.forward(x, self.BOTH)
        return out["likelihoods"], out["x_hat"][:len(x)], out["x_hat"][len(x):]

    def at_beta(self, beta: float) -> nn.Module:
        """The codec decoding at one β as a plain CompressAI codec — its ``g_s`` an
        ``nn.Sequential`` with each conditioned block fixed at c(β) (``FixedCondition``), so it
        decodes any of this codec's bitstreams exactly as ``decompress(beta=β)`` does. What the
        machine-side methods (adapters, g_t, refinement) adapt when they start from a UG-ICM
        codec. Consumes this wrapper: its modules move into the returned codec."""
        from collections import OrderedDict

        codec, g_s = self.codec, self.codec.g_s
        with torch.no_grad():
            c = g_s.condition(torch.tensor([float(beta)], device=next(g_s.mlp.parameters()).device))
        layers = [(g_s.INPUT, FixedCondition(g_s.blocks[g_s.INPUT], c))] if g_s.INPUT in g_s.blocks else []
        for name in g_s.order:
            layers.append((name, getattr(g_s, name)))
            if name in g_s.blocks:
                layers.append((f"{name}_block", FixedCondition(g_s.blocks[name], c)))
        codec.g_s = nn.Sequential(OrderedDict(layers))
        return codec

    def decoder_parameters(self):
        """What UG-ICM's stage 2 trains: the synthesis transform, its blocks and the condition MLP."""
        return self.codec.g_s.parameters()
