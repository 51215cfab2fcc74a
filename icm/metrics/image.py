"""Image-quality and classification metrics."""

from __future__ import annotations

import math

import torch


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> float:
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return math.inf if mse == 0 else 10 * math.log10(data_range ** 2 / mse)


def ms_ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> float:
    """MS-SSIM through pytorch_msssim (5 scales, window 11, which needs a side > 160 px).

    Smaller images get the largest odd window that still fits the 4 downsamplings; below 33 px
    there is no multi-scale answer and single-scale SSIM (window 3..11) is returned instead.
    """
    from pytorch_msssim import ms_ssim as _ms_ssim, ssim as _ssim

    side = min(a.shape[-2:])
    win = 11
    while win > 3 and side <= (win - 1) * 16:
        win -= 2
    if side > (win - 1) * 16:
        return float(_ms_ssim(a.float(), b.float(), data_range=data_range, win_size=win))
    return float(_ssim(a.float(), b.float(), data_range=data_range, win_size=max(3, min(11, side | 1 if side % 2 else side - 1))))


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == labels).float().mean())
