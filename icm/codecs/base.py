"""What every codec wrapper of this project shares: it holds a CompressAI codec (``codec``) and is
used like one — ``compress``, ``decompress``, ``aux_loss``, ``update`` and the state dict are the
codec's own (checkpoint keys stay CompressAI's, plus the wrapper's additions inside ``codec``)."""

from __future__ import annotations

import torch
from torch import nn


class CodecWrapper(nn.Module):
    def __init__(self, codec: nn.Module):
        super().__init__()
        self.codec = codec

    def compress(self, x: torch.Tensor, **kwargs) -> dict:
        return self.codec.compress(x, **kwargs)

    def decompress(self, strings, shape, **kwargs) -> dict:
        return self.codec.decompress(strings, shape, **kwargs)

    def human_and_machine(self, x: torch.Tensor) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """(likelihoods, human decode, machine decode) of one forward; one decode serves both
        unless the wrapper has a machine decode of its own."""
        out = self.codec(x)
        return out["likelihoods"], out["x_hat"], out["x_hat"]

    def aux_loss(self) -> torch.Tensor:
        return self.codec.aux_loss()

    def update(self, *args, **kwargs):
        return self.codec.update(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # the codec's own load_state_dict resizes its entropy coders' CDF buffers
        return self.codec.load_state_dict(state_dict, strict=strict)

    def state_dict(self, *args, **kwargs):
        return self.codec.state_dict(*args, **kwargs)
