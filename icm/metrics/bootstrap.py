"""Bootstrap confidence intervals over images for detection results: mAP@.5 of any resample of
an evaluation's images (repeats allowed), and paired comparisons of two codecs' RD curves.

pycocotools matches each image's detections to its ground truth once (``COCOeval.evaluate``);
its ``accumulate`` then works over the whole image set only. A resample needs the accumulation
over a multiset of images, which neither pycocotools nor torchmetrics offers, so ``ImageMatches``
keeps pycocotools' per-image matches and re-does the accumulation (101-point interpolated AP at
IoU 0.5, all areas, 100 detections per image — the figure ``coco_map`` reports as ``map50``) for
any list of image indices. On the full set it equals pycocotools' own figure (tested).
"""

from __future__ import annotations

import contextlib
import io
from typing import Sequence

import numpy as np

from icm.metrics.rd import bd_metrics


class ImageMatches:
    """pycocotools' per-image matching of one set of detections against its ground truth."""

    def __init__(self, gt: dict, detections: list[dict], max_dets: int = 100):
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        self.images = len(gt["images"])
        self.categories = [c["id"] for c in gt["categories"]]
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = COCO()
            coco_gt.dataset = {**gt, "info": gt.get("info", {})}
            coco_gt.createIndex()
            self.evals: list = [None] * (len(self.categories) * self.images)
            if detections:
                evaluator = COCOeval(coco_gt, coco_gt.loadRes(detections), "bbox")
                evaluator.params.iouThrs = np.array([0.5])
                evaluator.params.areaRng, evaluator.params.areaRngLbl = [[0, 1e10]], ["all"]
                evaluator.params.maxDets = [max_dets]
                evaluator.evaluate()
                self.evals = evaluator.evalImgs   # index: category × image (one area range)
        self.max_dets = max_dets
        self.gt_count = np.zeros((len(self.categories), self.images), dtype=np.int64)
        index = {c: k for k, c in enumerate(self.categories)}
        for ann in gt["annotations"]:
            if not ann.get("iscrowd", 0):
                self.gt_count[index[ann["category_id"]], ann["image_id"] - 1] += 1
        self.rec_thresholds = np.linspace(0.0, 1.00, 101)

    def ap50(self, image_indices: Sequence[int] | None = None) -> float:
        """mAP@.5 over the images at ``image_indices`` (0-based, repeats count twice)."""
        picks = np.arange(self.images) if image_indices is None else np.asarray(image_indices)
        aps = []
        for k in range(len(self.categories)):
            positives = int(self.gt_count[k, picks].sum())
            if positives == 0:
                continue   # pycocotools leaves such a category out of the mean (precision -1)
            found = [self.evals[k * self.images + i] for i in picks]
            found = [e for e in found if e is not None]
            if not found:
                aps.append(0.0)
                continue
            scores = np.concatenate([e["dtScores"][:self.max_dets] for e in found])
            order = np.argsort(-scores, kind="mergesort")
            matched = np.concatenate([e["dtMatches"][0, :self.max_dets] for e in found])[order] > 0
            ignored = np.concatenate([e["dtIgnore"][0, :self.max_dets] for e in found])[order] > 0
            tp = np.cumsum(matched & ~ignored).astype(float)
            fp = np.cumsum(~matched & ~ignored).astype(float)
            if len(tp) == 0:
                aps.append(0.0)
                continue
            recall = tp / positives
            precision = np.maximum.accumulate((tp / (tp + fp + np.spacing(1)))[::-1])[::-1]
            where = np.searchsorted(recall, self.rec_thresholds, side="left")
            q = np.where(where < len(precision), precision[np.minimum(where, len(precision) - 1)], 0.0)
            aps.append(float(q.mean()))
        return float(np.mean(aps)) if aps else 0.0


def interval(values: Sequence[float], confidence: float = 0.95) -> list[float] | None:
    """Percentile interval of bootstrap values (non-finite draws dropped); None when none is left."""
    arr = np.asarray([v for v in values if isinstance(v, (int, float)) and np.isfinite(v)], float)
    if not len(arr):
        return None
    tail = (1 - confidence) / 2 * 100
    return [float(np.percentile(arr, tail)), float(np.percentile(arr, 100 - tail))]


def paired_curve_comparison(curves: dict[str, list[dict]], pairs: list[tuple[str, str]], detector: str,
                            draws: np.ndarray, confidence: float = 0.95) -> dict:
    """Compare test curves against reference curves for one detector, paired over images.

    ``curves[name]`` is a list of rate points, each ``{"bpp": per-image bpp array, "matches":
    {detector: ImageMatches}}`` over the same images in the same order; ``pairs`` are
    (reference, test) curve names (one pair per seed); ``draws`` are image-index resamples (one row
    per draw), the same for every curve so each draw compares the codecs on the same images.

    Per draw and pair: ΔmAP@.5 at each rate point (test − reference; the points share λ, so bpp
    are close — their Δbpp is reported too), BD-mAP (mean mAP change at equal rate) and BD-rate on
    the mAP axis (rate change at equal mAP; "n/a" where mAP does not rise with rate). Figures are
    means over the pairs (seeds); intervals are bootstrap percentiles of those means."""

    def stats(indices):
        out = []
        for ref, test in pairs:
            rows = {}
            for name in (ref, test):
                pts = curves[name]
                rows[name] = ([float(np.mean(p["bpp"][indices])) for p in pts],
                              [p["matches"][detector].ap50(indices) for p in pts])
            (rb, rq), (tb, tq) = rows[ref], rows[test]
            bd = bd_metrics(rb, rq, tb, tq)
            out.append({"delta_map50": np.subtract(tq, rq), "delta_bpp": np.subtract(tb, rb),
                        "bd_map50": bd["bd_quality"] if isinstance(bd["bd_quality"], float) else np.nan,
                        "bd_rate": bd["bd_rate_percent"] if isinstance(bd["bd_rate_percent"], float) else np.nan,
                        "ref_map50": rq, "test_map50": tq, "ref_bpp": rb, "test_bpp": tb,
                        "bd_reason": bd.get("bd_quality_reason", "")})
        return out

    full = stats(np.arange(len(next(iter(curves.values()))[0]["bpp"])))
    boot = [stats(d) for d in draws]

    def mean_over_pairs(per_pair, key):
        values = [p[key] for p in per_pair]
        return np.nanmean(values, axis=0) if not all(np.all(np.isnan(v)) for v in values) else np.nan

    result = {"detector": detector, "pairs": [list(p) for p in pairs], "draws": len(draws)}
    for key in ("delta_map50", "delta_bpp", "bd_map50", "bd_rate"):
        estimate = mean_over_pairs(full, key)
        samples = np.asarray([mean_over_pairs(b, key) for b in boot], float)
        if np.ndim(estimate):
            result[key] = [float(v) for v in estimate]
            result[f"{key}_ci"] = [interval(samples[:, j], confidence) for j in range(samples.shape[1])]
        else:
            result[key] = float(estimate) if np.isfinite(estimate) else "n/a"
            result[f"{key}_ci"] = interval(samples, confidence)
            result[f"{key}_defined_share"] = float(np.mean(np.isfinite(samples)))
    result["per_pair"] = [{"pair": list(p), "bd_map50": s["bd_map50"] if np.isfinite(s["bd_map50"]) else "n/a",
                           "bd_reason": s["bd_reason"], "ref_map50": list(s["ref_map50"]),
                           "test_map50": list(s["test_map50"]), "ref_bpp": list(s["ref_bpp"]),
                           "test_bpp": list(s["test_bpp"])} for p, s in zip(pairs, full)]
    return result


def _quality(point: dict, axis: str, indices: np.ndarray) -> float:
    """A rate point's quality on one axis over the images at ``indices``: ``psnr`` (mean of the
    per-image PSNR, as the RD points are) or a detector label (its mAP@.5)."""
    return float(np.mean(point["psnr"][indices])) if axis == "psnr" else point["matches"][axis].ap50(indices)


def bd_rate_against_anchor(anchor: list[dict], test: list[dict], axis: str, draws: np.ndarray,
                           confidence: float = 0.95, span: str = "union") -> dict:
    """BD-rate (%) of the ``test`` curve against the ``anchor`` curve on one quality axis
    (``"psnr"`` or a detector's mAP@.5), with a bootstrap interval over images.

    Each curve is a list of rate points ``{"bpp", "psnr": per-image arrays, "matches": {detector:
    ImageMatches}}`` over the same images in the same order; ``draws`` are image-index resamples,
    the same for both curves. The figure is ``bd_metrics`` on all images ("n/a" with its reason
    where it cannot be trusted; ``span`` as there); the interval is over the resamples where it
    is defined, whose share is reported."""
    def curves(indices):
        return ([float(np.mean(p["bpp"][indices])) for p in anchor], [_quality(p, axis, indices) for p in anchor],
                [float(np.mean(p["bpp"][indices])) for p in test], [_quality(p, axis, indices) for p in test])

    everything = np.arange(len(anchor[0]["bpp"]))
    ra, qa, rt, qt = curves(everything)
    full = bd_metrics(ra, qa, rt, qt, span=span)
    samples = []
    for indices in draws:
        value = bd_metrics(*curves(indices), span=span)["bd_rate_percent"]
        samples.append(value if isinstance(value, float) else np.nan)
    samples = np.asarray(samples, float)
    return {"axis": axis, "bd_rate": full["bd_rate_percent"], "reason": full.get("bd_rate_percent_reason", ""),
            "ci": interval(samples, confidence), "defined_share": float(np.mean(np.isfinite(samples))) if len(draws) else 0.0,
            "anchor_bpp": ra, "anchor_quality": qa, "test_bpp": rt, "test_quality": qt}


def paired_point_deltas(ref: dict, test: dict, detectors: list[str], draws: np.ndarray,
                        confidence: float = 0.95) -> dict:
    """Two codecs' rate points on the same images (``ref``, ``test``: ``{"bpp", "psnr",
    "matches"}`` as for ``bd_rate_against_anchor``): test − ref in mAP@.5 per detector, in PSNR
    (dB) and in bpp (%), each on all images with a paired bootstrap interval (the same resampled
    images for both)."""
    def deltas(indices):
        out = {f"map50/{d}": test["matches"][d].ap50(indices) - ref["matches"][d].ap50(indices) for d in detectors}
        out["psnr"] = float(np.mean(test["psnr"][indices]) - np.mean(ref["psnr"][indices]))
        out["bpp_percent"] = float(100 * (np.mean(test["bpp"][indices]) / np.mean(ref["bpp"][indices]) - 1))
        return out

    everything = np.arange(len(ref["bpp"]))
    full, boot = deltas(everything), [deltas(d) for d in draws]
    result = {"bpp_ref": float(np.mean(ref["bpp"])), "bpp_test": float(np.mean(test["bpp"])),
              "psnr_ref": float(np.mean(ref["psnr"])), "psnr_test": float(np.mean(test["psnr"])),
              "map50_ref": {d: ref["matches"][d].ap50() for d in detectors},
              "map50_test": {d: test["matches"][d].ap50() for d in detectors}}
    for key, value in full.items():
        result[f"delta_{key}"] = value
        result[f"delta_{key}_ci"] = interval([b[key] for b in boot], confidence)
    return result
