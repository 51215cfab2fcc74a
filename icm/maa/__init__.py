"""MAA (IJCV 2026): AAFG and model-/domain-wise Meta-AAFG, the canvas, bounds and the stage."""

from icm.maa.bounds import LinfBound, MapBound, build_bound
from icm.maa.canvas import Placement, letterbox, paste_back
from icm.maa.methods import METHODS, Member, aafg, meta_aafg, meta_round, per_image_losses

__all__ = ["LinfBound", "MapBound", "build_bound", "Placement", "letterbox", "paste_back", "METHODS",
           "Member", "aafg", "meta_aafg", "meta_round", "per_image_losses"]
