"""Losses: rate–distortion (CompressAI's), CLIP global/instance distances and UG-ICM's sum."""

from icm.losses.clip import ClipDistance
from icm.losses.rd import bpp_of, rd_loss
from icm.losses.ugicm import UGICMLoss

__all__ = ["ClipDistance", "UGICMLoss", "bpp_of", "rd_loss"]
