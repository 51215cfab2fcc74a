"""The rate term as CompressAI's ``RateDistortionLoss`` computes it, for losses that pair it
with other distortions (UG-ICM)."""

from __future__ import annotations

import math

import torch


def bpp_of(likelihoods: dict[str, torch.Tensor], num_pixels: int) -> torch.Tensor:
    """Estimated bits per pixel from the entropy models' likelihoods (sum of −log2 over the batch,
    divided by the batch's pixels, as CompressAI's RateDistortionLoss does)."""
    return sum(torch.log(v).sum() / (-math.log(2) * num_pixels) for v in likelihoods.values())
