"""Bits per pixel from the *actual* bitstream of a CompressAI codec."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def pad_to_multiple(x: torch.Tensor, multiple: int = 64) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Pad symmetrically to a multiple of ``multiple`` (as CompressAI's examples do); returns the padding."""
    h, w = x.shape[-2:]
    new_h, new_w = -(-h // multiple) * multiple, -(-w // multiple) * multiple
    left, top = (new_w - w) // 2, (new_h - h) // 2
    pad = (left, new_w - w - left, top, new_h - h - top)
    return F.pad(x, pad, mode="constant", value=0), pad


def crop_padding(x: torch.Tensor, pad: tuple[int, int, int, int]) -> torch.Tensor:
    left, right, top, bottom = pad
    return x[..., top:x.shape[-2] - bottom, left:x.shape[-1] - right]


@dataclass
class CodedImage:
    strings: list                 # the bitstream pieces, as CompressAI returns them
    shape: tuple                  # latent shape needed by decompress
    num_bytes: int
    bpp: float                    # 8 * bytes / (H * W) of the original size
    x_hat: torch.Tensor           # decoded, cropped back, clamped to [0, 1]
    pad: tuple = (0, 0, 0, 0)     # padding added before compress (left, right, top, bottom)


@torch.no_grad()
def code_image(model, x: torch.Tensor, multiple: int = 64, compress_kwargs: dict | None = None,
               decode_kwargs: dict | None = None) -> CodedImage:
    """``compress`` → bytes → ``decompress`` one image (1x3xHxW in [0,1]).

    The model must have had ``update()`` called (CompressAI builds its CDF tables there).
    ``compress_kwargs`` go to ``compress`` (e.g. a variable-rate model's ``inputscale``),
    ``decode_kwargs`` to ``decompress`` (the same rate settings, or a decoder condition).
    """
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"code_image takes one image 1x3xHxW, got {tuple(x.shape)}")
    h, w = x.shape[-2:]
    padded, pad = pad_to_multiple(x, multiple)
    out = model.compress(padded, **(compress_kwargs or {}))
    num_bytes = sum(len(s) for group in out["strings"] for s in group)
    coded = CodedImage(out["strings"], tuple(out["shape"]), num_bytes, 8.0 * num_bytes / (h * w), x, pad)
    coded.x_hat = decode_again(model, coded, decode_kwargs)
    return coded


@torch.no_grad()
def decode_again(model, coded: CodedImage, decode_kwargs: dict | None = None) -> torch.Tensor:
    """Decompress the same bitstream (e.g. a conditional decoder at another β), cropped back."""
    decoded = model.decompress(coded.strings, coded.shape, **(decode_kwargs or {}))["x_hat"]
    return crop_padding(decoded, coded.pad).clamp(0, 1)
