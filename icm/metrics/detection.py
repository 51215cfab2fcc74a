"""COCO mAP through pycocotools, from records (ground truth) and per-image predictions."""

from __future__ import annotations

import contextlib
import io
from typing import Sequence


def records_to_coco_gt(records: Sequence[dict], classes: Sequence[str]) -> dict:
    """A COCO ground-truth dict from data-layer records (ids are the records' order, from 1)."""
    images, annotations = [], []
    for img_id, rec in enumerate(records, start=1):
        images.append({"id": img_id, "width": int(rec["width"]), "height": int(rec["height"]),
                       "file_name": rec.get("path", "")})
        for box, cls in zip(rec["boxes"], rec["class_ids"]):
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append({"id": len(annotations) + 1, "image_id": img_id, "category_id": int(cls) + 1,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                "iscrowd": 0})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(classes)]}


def detections_to_coco(predictions: Sequence[dict]) -> list[dict]:
    """Per-image ``{"boxes", "scores", "labels"}`` (in ``records`` order) → COCO result list."""
    out = []
    for img_id, pred in enumerate(predictions, start=1):
        for box, score, label in zip(pred["boxes"].tolist(), pred["scores"].tolist(), pred["labels"].tolist()):
            x1, y1, x2, y2 = box
            out.append({"image_id": img_id, "category_id": int(label) + 1,
                        "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    return out


def coco_map(gt: dict, detections: list[dict]) -> dict[str, float]:
    """COCO bbox AP (mAP@[.5:.95]) and AP50 with pycocotools; 0.0 when nothing was detected."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {**gt, "info": gt.get("info", {})}
        coco_gt.createIndex()
        if not detections:
            return {"map": 0.0, "map50": 0.0, "map75": 0.0}
        coco_dt = coco_gt.loadRes(detections)
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats
    return {"map": max(float(stats[0]), 0.0), "map50": max(float(stats[1]), 0.0),
            "map75": max(float(stats[2]), 0.0)}
