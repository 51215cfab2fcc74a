"""Losses: CLIP global/instance distances and UG-ICM's sum (plain RD training uses CompressAI's
``RateDistortionLoss``)."""

from icm.losses.clip import ClipDistance
from icm.losses.rd import bpp_of
from icm.losses.ugicm import UGICMLoss

__all__ = ["ClipDistance", "UGICMLoss", "bpp_of"]
