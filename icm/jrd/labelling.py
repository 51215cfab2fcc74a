"""Object-wise labels and JRD (OW-JRD, IEEE TMM 2023; METHODS.md §5).

Label convention of the authors: 0 = the object is still recognised at that level, 1 = not.
An object is recognised when a detection of the same class has IoU ≥ ``iou_threshold`` and score
≥ ``score_threshold`` with the object's reference box.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torchvision.ops import box_iou


@dataclass
class Match:
    recognised: np.ndarray      # bool per reference object
    best_iou: np.ndarray        # IoU of the detection that recognised it (else the best eligible one's)
    score: np.ndarray           # that detection's score (0 when none)


def match_objects(ref_boxes, ref_labels, det_boxes, det_scores, det_labels,
                  iou_threshold: float = 0.5, score_threshold: float = 0.5) -> Match:
    """Recognition of each reference object (boxes xyxy px) by one image's detections, matched
    one to one as COCO matches: detections with score ≥ ``score_threshold``, in decreasing score
    order, each claim the unclaimed object of their class they overlap most, if that IoU is ≥
    ``iou_threshold``. A detection recognises at most one object."""
    ref_boxes = torch.as_tensor(np.asarray(ref_boxes, np.float32)).reshape(-1, 4)
    det_boxes = torch.as_tensor(np.asarray(det_boxes, np.float32)).reshape(-1, 4)
    ref_labels = np.asarray(ref_labels, np.int64).reshape(-1)
    det_labels = np.asarray(det_labels, np.int64).reshape(-1)
    det_scores = np.asarray(det_scores, np.float32).reshape(-1)
    n = len(ref_boxes)
    recognised = np.zeros(n, bool)
    best_iou, best_score = np.zeros(n, np.float32), np.zeros(n, np.float32)
    if n and len(det_boxes):
        eligible = (ref_labels[:, None] == det_labels[None, :]) & (det_scores[None, :] >= score_threshold)
        iou = np.where(eligible, box_iou(ref_boxes, det_boxes).numpy(), -1.0)
        for j in np.argsort(-det_scores, kind="stable"):
            free = np.where(recognised, -1.0, iou[:, j])
            i = int(free.argmax())
            if free[i] >= iou_threshold:
                recognised[i], best_iou[i], best_score[i] = True, iou[i, j], det_scores[j]
        left = ~recognised
        best = iou.argmax(axis=1)
        overlap = iou[np.arange(n), best]
        best_iou[left] = np.maximum(overlap[left], 0)
        best_score[left] = np.where(overlap[left] >= 0, det_scores[best[left]], 0)
    return Match(recognised, best_iou, best_score)


def not_recognised_labels(recognised_per_level: Sequence[bool]) -> np.ndarray:
    """The authors' binary labels: 0 where recognised, 1 where not."""
    return (~np.asarray(recognised_per_level, bool)).astype(np.int64)


def jrd(labels: Sequence[int]) -> int:
    """JRD = the highest level still labelled 0 (recognised); -1 when no level is (the authors'
    convention: the last recognised level)."""
    zeros = np.flatnonzero(np.asarray(labels) == 0)
    return int(zeros[-1]) if len(zeros) else -1


def first_unrecognised(labels: Sequence[int]) -> int:
    """The other JRD convention: the first level not recognised; ``len(labels)`` when every
    level is recognised. Equals ``jrd + 1`` exactly when the labels are monotonic."""
    ones = np.flatnonzero(np.asarray(labels) == 1)
    return int(ones[0]) if len(ones) else len(labels)


def is_monotonic(labels: Sequence[int]) -> bool:
    """Recognised up to some level and never again after it (labels 0…0 1…1)."""
    labels = np.asarray(labels)
    return bool(np.all(np.diff(labels) >= 0))


def error_tolerant_jrd(labels: Sequence[int], window: int = 8, threshold: int = 5) -> int:
    """The authors' error-tolerance rule over an object's ordered predictions (0 = recognised),
    written there for 64 levels and here for any L ≥ ``window``: if the predictions change value
    at most once, JRD = the last level predicted 0 (0 if none); otherwise scan windows
    ``p[s:s+window]`` from s = L − window down to 0 and return s + window − 1 for the first whose
    last entry is 0 and whose sum is ≤ ``threshold``; 0 if none."""
    p = np.asarray(labels, np.int64)
    if len(p) < window:
        raise ValueError(f"error tolerance needs at least {window} levels, got {len(p)}")
    if np.count_nonzero(np.diff(p)) <= 1:
        return max(jrd(p), 0)
    for s in range(len(p) - window, -1, -1):
        w = p[s:s + window]
        if w[-1] == 0 and w.sum() <= threshold:
            return s + window - 1
    return 0
