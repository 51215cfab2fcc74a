"""Evaluate a detector on data-layer records: mean training loss and COCO mAP, on the same
letterboxed canvases the MAA stage and the detector trainer use."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from icm.detectors.base import Detector, map_targets, total
from icm.maa.canvas import boxes_from_canvas, boxes_to_canvas, letterbox, to_tensor
from icm.metrics.detection import coco_map, detections_to_coco, records_to_coco_gt


@torch.no_grad()
def detect_images(det: Detector, images: Sequence, canvas: int, score_threshold: float = 0.01,
                  batch_size: int = 8, device: str | torch.device = "cpu") -> list[dict[str, np.ndarray]]:
    """Detections on HxWx3 uint8 images of any size (letterboxed to ``canvas``), as numpy
    ``{"boxes" (xyxy px of the image), "scores", "labels" (detector class ids)}``."""
    out = []
    for i in range(0, len(images), batch_size):
        placed = [letterbox(to_tensor(im), canvas) for im in images[i:i + batch_size]]
        x = torch.stack([c for c, _, _ in placed]).to(device)
        for pred, (_, _, p) in zip(det.predict(x, score_threshold=score_threshold), placed):
            out.append({"boxes": boxes_from_canvas(pred["boxes"].cpu(), p).numpy(),
                        "scores": pred["scores"].cpu().numpy(), "labels": pred["labels"].cpu().numpy()})
    return out


@torch.no_grad()
def evaluate_detector(det: Detector, records: Sequence[dict], canvas: int, batch_size: int = 8,
                      class_map: dict | None = None, device: str | torch.device = "cpu") -> dict[str, float]:
    """``records`` with status ok; labels are mapped into the detector's classes by name."""
    records = [r for r in records if r["status"] == "ok"]
    mapped = []
    for rec in records:
        t = map_targets(torch.as_tensor(rec["boxes"]).reshape(-1, 4), list(rec["class_names"]), det.classes, class_map)
        mapped.append({**rec, "boxes": t["boxes"].numpy(), "class_ids": t["labels"].numpy()})
    predictions, losses = [], []
    for i in range(0, len(mapped), batch_size):
        chunk = mapped[i:i + batch_size]
        placed = [letterbox(to_tensor(r["image"]), canvas) for r in chunk]
        x = torch.stack([c for c, _, _ in placed]).to(device)
        targets = [{"boxes": boxes_to_canvas(r["boxes"], p).to(device),
                    "labels": torch.as_tensor(r["class_ids"], dtype=torch.int64, device=device), "seed": 0}
                   for r, (_, _, p) in zip(chunk, placed)]
        for j in range(len(chunk)):
            losses.append(float(total(det.loss(x[j:j + 1], targets[j:j + 1]))))
        for pred, (_, _, p) in zip(det.predict(x, score_threshold=0.01), placed):
            predictions.append({"boxes": boxes_from_canvas(pred["boxes"].cpu(), p), "scores": pred["scores"].cpu(),
                                "labels": pred["labels"].cpu()})
    result = coco_map(records_to_coco_gt(mapped, det.classes), detections_to_coco(predictions))
    return {"loss": sum(losses) / max(len(losses), 1), **result}
