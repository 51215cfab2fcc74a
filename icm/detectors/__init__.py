"""Detectors behind one interface (see ``icm.detectors.base``), built by name from the zoo."""

from icm.detectors import centernet, detectron2_backend, tv, yolo  # noqa: F401 - registration
from icm.detectors.base import Detector, loss_branch, sum_terms, total

__all__ = ["Detector", "loss_branch", "sum_terms", "total"]
