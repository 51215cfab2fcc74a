"""Rate–distortion loss as CompressAI computes it: ``λ·255²·MSE + bpp``."""

from __future__ import annotations

import math

import torch
from compressai.losses import RateDistortionLoss


def bpp_of(likelihoods: dict[str, torch.Tensor], num_pixels: int) -> torch.Tensor:
    """Estimated bits per pixel from the entropy models' likelihoods (sum of −log2 over the batch,
    divided by the batch's pixels, as CompressAI's RateDistortionLoss does)."""
    return sum(torch.log(v).sum() / (-math.log(2) * num_pixels) for v in likelihoods.values())


def rd_loss(output: dict, target: torch.Tensor, lmbda: float) -> dict[str, torch.Tensor]:
    """CompressAI's RateDistortionLoss: ``{"loss", "bpp_loss", "mse_loss"}``."""
    return RateDistortionLoss(lmbda=lmbda)(output, target)
