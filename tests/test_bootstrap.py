"""mAP on the shapes set against pycocotools called directly; the bootstrap's resampled mAP against
pycocotools on the explicitly resampled image set (ground truth without pixels: matching needs
none), and its comparisons of curves and points by hand."""

import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from icm.data.samples import SHAPE_CLASSES, shapes_reader
from icm.metrics.bootstrap import ImageMatches, interval, paired_curve_comparison
from icm.metrics.detection import coco_map, detections_to_coco, records_to_coco_gt


def _noisy_detections(records, seed=0):
    """Ground-truth boxes jittered, some relabelled or dropped, plus false positives, with
    random scores: a detector of middling quality."""
    rng = np.random.default_rng(seed)
    out = []
    for rec in records:
        boxes, scores, labels = [], [], []
        for box, cls in zip(np.asarray(rec["boxes"]).reshape(-1, 4), rec["class_ids"]):
            if rng.random() < 0.2:
                continue
            boxes.append(box + rng.normal(0, 3, 4))
            scores.append(rng.uniform(0.3, 1.0))
            labels.append(int(cls) if rng.random() < 0.85 else int(rng.integers(len(SHAPE_CLASSES))))
        for _ in range(int(rng.integers(0, 3))):
            x, y = rng.uniform(0, 100, 2)
            boxes.append([x, y, x + rng.uniform(10, 40), y + rng.uniform(10, 40)])
            scores.append(rng.uniform(0.01, 0.6))
            labels.append(int(rng.integers(len(SHAPE_CLASSES))))
        out.append({"boxes": np.asarray(boxes, float).reshape(-1, 4), "scores": np.asarray(scores, float),
                    "labels": np.asarray(labels, int)})
    return out


def _records(n=24, seed=7):
    """Ground truth of ``n`` images, as data-layer records without pixels (matching needs none):
    one to four objects of the shapes classes, 10–40 px, in 100–160 px images."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w, h = (int(v) for v in rng.integers(100, 161, 2))
        k = int(rng.integers(1, 5))
        size = rng.uniform(10, 40, (k, 2))
        x1, y1 = rng.uniform(0, w - size[:, 0]), rng.uniform(0, h - size[:, 1])
        out.append({"width": w, "height": h, "boxes": np.stack([x1, y1, x1 + size[:, 0], y1 + size[:, 1]], 1),
                    "class_ids": [int(c) for c in rng.integers(0, len(SHAPE_CLASSES), k)]})
    return out


def test_map_on_the_shapes_set_matches_pycocotools_on_its_annotation_file(small_shapes):
    reader = shapes_reader("photo", "val", root=small_shapes.parent, n_train=24, n_val=12, seed=7)
    records = list(reader.records())
    predictions = _noisy_detections(records)
    ours = coco_map(records_to_coco_gt(records, SHAPE_CLASSES), detections_to_coco(predictions))

    ann_file = small_shapes / "photo/annotations/instances_val.json"
    ann = json.loads(ann_file.read_text())
    by_name = {Path(img["file_name"]).name: img["id"] for img in ann["images"]}
    results = []
    for rec, pred in zip(records, predictions):
        image_id = by_name[Path(rec["path"]).name]
        for box, score, label in zip(pred["boxes"], pred["scores"], pred["labels"]):
            results.append({"image_id": image_id, "category_id": int(label) + 1, "score": float(score),
                            "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]})
    gt = COCO(str(ann_file))
    evaluator = COCOeval(gt, gt.loadRes(results), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert 0.2 < ours["map50"] < 0.95
    assert abs(ours["map50"] - evaluator.stats[1]) < 1e-9
    assert abs(ours["map"] - evaluator.stats[0]) < 1e-9


def test_resampled_map50_equals_pycocotools_on_the_resampled_set():
    records = _records()
    predictions = _noisy_detections(records, seed=1)
    # scores rounded to 0.1: many ties, ranked as pycocotools ranks them (stable, image order)
    tied = [dict(p, scores=np.round(p["scores"], 1)) for p in predictions]
    # the first image's true detections below 100 confident false ones of their class: the
    # 100-detection cut per image and class decides what counts
    crowded = [dict(p) for p in predictions]
    first = crowded[0]
    cls = int(first["labels"][0])
    first.update(boxes=np.concatenate([first["boxes"], np.tile([[0.0, 0.0, 2.0, 2.0]], (100, 1))]),
                 scores=np.concatenate([first["scores"], np.full(100, 0.995)]),
                 labels=np.concatenate([first["labels"], np.full(100, cls)]))
    rng = np.random.default_rng(3)
    draws = [rng.integers(0, len(records), len(records)) for _ in range(3)]     # with repeats
    draws += [[i] for i in range(6)]     # single images: classes with one object, one detection, or none
    for preds in (predictions, tied, crowded):
        matches = ImageMatches(records_to_coco_gt(records, SHAPE_CLASSES), detections_to_coco(preds))
        full = coco_map(records_to_coco_gt(records, SHAPE_CLASSES), detections_to_coco(preds))["map50"]
        assert 0.05 < full < 0.95 and abs(matches.ap50() - full) < 1e-9
        for picks in draws:
            direct = coco_map(records_to_coco_gt([records[i] for i in picks], SHAPE_CLASSES),
                              detections_to_coco([preds[i] for i in picks]))["map50"]
            assert abs(matches.ap50(picks) - direct) < 1e-9
    assert ImageMatches(records_to_coco_gt(records, SHAPE_CLASSES), detections_to_coco(crowded)).ap50() < \
        ImageMatches(records_to_coco_gt(records, SHAPE_CLASSES), detections_to_coco(predictions)).ap50()
    # a crowd region is no object to find, and a detection inside it no false one (pycocotools
    # ignores both); an object under one pixel in area still counts; an image with no objects
    # has no AP to average (0, as pycocotools' -1 is reported); no detections at all score 0
    gt = records_to_coco_gt(records + [{"width": 50, "height": 50, "boxes": np.zeros((0, 4)), "class_ids": []}],
                            SHAPE_CLASSES)
    gt["annotations"] += [
        {"id": len(gt["annotations"]) + 1, "image_id": 2, "category_id": 1, "bbox": [0.0, 0.0, 50.0, 50.0],
         "area": 2500.0, "iscrowd": 1},
        {"id": len(gt["annotations"]) + 2, "image_id": 3, "category_id": 2, "bbox": [60.0, 60.0, 0.5, 0.5],
         "area": 0.25, "iscrowd": 0}]
    results = detections_to_coco(predictions) + [
        {"image_id": 2, "category_id": 1, "bbox": [5.0, 5.0, 20.0, 20.0], "score": 0.999},
        {"image_id": 3, "category_id": 2, "bbox": [60.0, 60.0, 0.5, 0.5], "score": 0.999},
        {"image_id": len(records) + 1, "category_id": 3, "bbox": [1.0, 1.0, 20.0, 20.0], "score": 0.5}]
    special = ImageMatches(gt, results)
    assert abs(special.ap50() - coco_map(gt, results)["map50"]) < 1e-9
    assert special.gt_count.sum() == sum(len(r["class_ids"]) for r in records) + 1
    assert special.ap50([len(records)]) == 0.0
    assert ImageMatches(gt, []).ap50() == 0.0 == ImageMatches(gt, []).ap50([0, 0, 1])


def test_paired_comparison_finds_a_real_difference_and_its_interval_covers_it():
    records = _records()
    gt = records_to_coco_gt(records, SHAPE_CLASSES)
    n = len(records)
    good = [ImageMatches(gt, detections_to_coco(_noisy_detections(records, seed=s))) for s in (10, 11)]
    bad = []
    for s in (20, 21):   # the same detector with most true boxes dropped: clearly worse
        preds = _noisy_detections(records, seed=s)
        for p in preds:
            keep = np.arange(len(p["scores"])) % 4 == 0
            p.update(boxes=p["boxes"][keep], scores=p["scores"][keep], labels=p["labels"][keep])
        bad.append(ImageMatches(gt, detections_to_coco(preds)))
    bpp = np.random.default_rng(0).uniform(0.1, 0.2, n)
    curves = {"ref": [{"bpp": bpp * k, "matches": {"d": m}} for k, m in zip((1, 2), bad)],
              "test": [{"bpp": bpp * k * 1.05, "matches": {"d": m}} for k, m in zip((1, 2), good)]}   # 5 % dearer
    draws = np.random.default_rng(0).integers(0, n, (40, n))
    result = paired_curve_comparison(curves, [("ref", "test")], "d", draws)
    assert all(d > 0.1 for d in result["delta_map50"])
    assert result["bd_map50"] > 0.1 and result["bd_map50_ci"][0] > 0
    # Δbpp at each rate point: 5 % of the reference's mean bpp there, on the full set and per draw
    assert result["delta_bpp"] == pytest.approx([0.05 * bpp.mean(), 0.05 * 2 * bpp.mean()], rel=1e-9)
    for k, (lo, hi) in enumerate(result["delta_bpp_ci"], start=1):
        per_draw = sorted(0.05 * k * bpp[d].mean() for d in draws)
        assert per_draw[0] <= lo <= hi <= per_draw[-1] and lo < hi
    assert result["per_pair"][0]["test_bpp"] == pytest.approx([1.05 * bpp.mean(), 2.1 * bpp.mean()], rel=1e-9)
    assert result["per_pair"][0]["ref_bpp"] == pytest.approx([bpp.mean(), 2 * bpp.mean()], rel=1e-9)
    assert result["per_pair"][0]["ref_map50"] == pytest.approx([m.ap50() for m in bad], rel=1e-9)
    lo, hi = result["delta_map50_ci"][0]
    assert lo <= result["delta_map50"][0] <= hi
    assert interval([1.0, float("nan"), 2.0, 3.0], 0.5) == [1.5, 2.5]
    assert interval([1, 2, 3, 4, 5]) == pytest.approx([1.1, 4.9])      # 95 %: the 2.5th and 97.5th percentiles
    assert interval([float("nan"), "n/a"]) is None


class LevelPlusOffsets:
    """Stands in for ``ImageMatches`` (only ``ap50`` is called): a rate point's mAP@.5 on the picked
    images is its level plus the mean of their per-image offsets, so every figure is known by hand."""

    def __init__(self, level, offsets):
        self.level, self.offsets = level, np.asarray(offsets, float)

    def ap50(self, image_indices=None):
        picks = np.arange(len(self.offsets)) if image_indices is None else np.asarray(image_indices)
        return self.level + float(self.offsets[picks].mean())


def test_bd_rate_against_anchor_by_hand():
    from icm.metrics.bootstrap import bd_rate_against_anchor

    spread = np.array([0.5, 1.0, 1.5])            # each image's bpp relative to the point's mean
    offsets = np.array([-1.0, 0.0, 1.0])          # each image's quality relative to the point's mean

    def curve(rates, qualities, lift=np.zeros(3)):
        return [{"bpp": r * spread, "psnr": q + offsets + lift,
                 "matches": {"d": LevelPlusOffsets(q / 100, (offsets + lift) / 100)}} for r, q in zip(rates, qualities)]

    rates, qualities = [0.2, 0.4, 0.8, 1.6], [28.0, 31.0, 34.0, 37.0]
    anchor, cheaper = curve(rates, qualities), curve([0.9 * r for r in rates], qualities)
    draws = np.array([[0, 0, 0], [2, 2, 2], [0, 1, 1], [0, 1, 2]])
    for axis in ("psnr", "d"):
        got = bd_rate_against_anchor(anchor, cheaper, axis, draws)
        assert got["axis"] == axis and got["reason"] == "" and got["defined_share"] == 1.0
        # 10 % fewer bits at every quality, on all images and on every resample
        assert got["bd_rate"] == pytest.approx(-10.0, abs=0.05)
        assert got["ci"] == pytest.approx([-10.0, -10.0], abs=0.05)
        assert got["anchor_bpp"] == pytest.approx(rates) and got["test_bpp"] == pytest.approx([0.18, 0.36, 0.72, 1.44])
        scale = 1 if axis == "psnr" else 1 / 100
        assert got["anchor_quality"] == pytest.approx([q * scale for q in qualities])
        assert got["test_quality"] == pytest.approx([q * scale for q in qualities])
    # the second and third images 1 dB (or 0.01 mAP) better at 10 % fewer bits, the first only cheaper:
    # quality rises 3 dB per doubling of rate, so 1 dB is worth 2^(-1/3) of the rate. Each draw
    # of one image repeated gives that image's own BD-rate
    better = curve([0.9 * r for r in rates], qualities, lift=np.array([0.0, 1.0, 1.0]))
    alone = [[0, 0, 0], [1, 1, 1], [2, 2, 2]]
    per_draw = [-10.0, 100 * (0.9 * 2 ** (-1 / 3) - 1), 100 * (0.9 * 2 ** (-1 / 3) - 1)]
    for axis in ("psnr", "d"):
        got = bd_rate_against_anchor(anchor, better, axis, np.array(alone), confidence=0.5)
        assert got["ci"] == pytest.approx([np.percentile(per_draw, 25), np.percentile(per_draw, 75)], abs=0.05)
        assert got["bd_rate"] < -20          # on all images: 2/3 dB better on average, and cheaper
    # quality that stalls: no BD-rate, and none on any resample
    stalled = bd_rate_against_anchor(anchor, curve(rates, [28.0, 31.0, 31.0, 37.0]), "psnr", draws)
    assert stalled["bd_rate"] == "n/a" and stalled["reason"].startswith("quality does not rise strictly")
    assert stalled["ci"] is None and stalled["defined_share"] == 0.0
    # no resamples: the figure on all images, no interval
    none = bd_rate_against_anchor(anchor, cheaper, "psnr", np.zeros((0, 3), int))
    assert none["ci"] is None and none["defined_share"] == 0.0 and none["bd_rate"] == pytest.approx(-10.0, abs=0.05)


def test_paired_point_deltas_by_hand():
    from icm.metrics.bootstrap import paired_point_deltas

    ref = {"bpp": np.array([0.1, 0.2, 0.3]), "psnr": np.array([30.0, 31.0, 35.0]),
           "matches": {"d": LevelPlusOffsets(0.5, [0.0, 0.1, 0.2])}}
    test = {"bpp": np.array([0.12, 0.24, 0.36]), "psnr": np.array([31.0, 31.0, 36.0]),
            "matches": {"d": LevelPlusOffsets(0.6, [0.0, -0.1, 0.2])}}
    draws = np.array([[0, 0, 0], [1, 1, 1], [2, 2, 2], [0, 1, 2]])
    got = paired_point_deltas(ref, test, ["d"], draws)
    assert got["bpp_ref"] == pytest.approx(0.2) and got["bpp_test"] == pytest.approx(0.24)
    assert got["psnr_ref"] == pytest.approx(32.0) and got["psnr_test"] == pytest.approx(98 / 3)
    assert got["map50_ref"] == {"d": pytest.approx(0.6)} and got["map50_test"] == {"d": pytest.approx(0.6 + 0.1 / 3)}
    # per image, test − ref: PSNR +1, 0, +1 dB; mAP@.5 +0.1, −0.1, +0.1; bpp +20 % everywhere
    assert got["delta_psnr"] == pytest.approx(2 / 3) and got["delta_map50/d"] == pytest.approx(1 / 30)
    assert got["delta_bpp_percent"] == pytest.approx(20.0)
    per_draw_psnr, per_draw_map = [1.0, 0.0, 1.0, 2 / 3], [0.1, -0.1, 0.1, 1 / 30]
    assert got["delta_psnr_ci"] == pytest.approx([np.percentile(per_draw_psnr, 2.5), np.percentile(per_draw_psnr, 97.5)])
    assert got["delta_map50/d_ci"] == pytest.approx([np.percentile(per_draw_map, 2.5), np.percentile(per_draw_map, 97.5)])
    assert got["delta_bpp_percent_ci"] == pytest.approx([20.0, 20.0])
    assert set(got) == {"bpp_ref", "bpp_test", "psnr_ref", "psnr_test", "map50_ref", "map50_test",
                        *(f"delta_{k}{ci}" for k in ("map50/d", "psnr", "bpp_percent") for ci in ("", "_ci"))}
    half = paired_point_deltas(ref, test, ["d"], draws, confidence=0.5)
    assert half["delta_psnr_ci"] == pytest.approx([np.percentile(per_draw_psnr, 25), np.percentile(per_draw_psnr, 75)])


def test_paired_curve_comparison_by_hand():
    """A reference curve, a test curve 10 % cheaper with the second and third images 0.01 mAP
    better, and one at 100× the rate (no common rate range: no BD-mAP). mAP rises 0.03 per doubling
    of rate, so 10 % fewer bits are worth 0.03·log2(1/0.9) mAP and 0.01 mAP 2^(-1/3) of the rate."""
    spread, offsets = np.array([0.5, 1.0, 1.5]), np.array([-0.01, 0.0, 0.01])
    rates, levels = np.array([0.2, 0.4, 0.8, 1.6]), np.array([0.28, 0.31, 0.34, 0.37])

    def curve(scale, lift):
        return [{"bpp": r * scale * spread, "matches": {"d": LevelPlusOffsets(q, offsets + lift)}}
                for r, q in zip(rates, levels)]

    lift = np.array([0.0, 0.01, 0.01])
    curves = {"ref": curve(1, 0), "test": curve(0.9, lift), "apart": curve(100, 0)}
    draws = np.array([[0, 0, 0], [1, 1, 1], [2, 2, 2]])            # each draw: one image, three times
    cheaper = 0.03 * np.log2(1 / 0.9)

    got = paired_curve_comparison(curves, [("ref", "test")], "d", draws, confidence=0.5)
    assert {k: got[k] for k in ("detector", "pairs", "draws")} == {"detector": "d", "pairs": [["ref", "test"]], "draws": 3}
    assert got["delta_map50"] == pytest.approx([0.02 / 3] * 4)
    np.testing.assert_allclose(got["delta_map50_ci"], [[np.percentile(lift, 25), np.percentile(lift, 75)]] * 4)
    assert got["delta_bpp"] == pytest.approx(list(-0.1 * rates))
    np.testing.assert_allclose(got["delta_bpp_ci"], [[np.percentile(-0.1 * r * spread, 25),
                                                       np.percentile(-0.1 * r * spread, 75)] for r in rates])
    assert got["bd_map50"] == pytest.approx(cheaper + 0.02 / 3, abs=1e-6)
    assert got["bd_map50_ci"] == pytest.approx([np.percentile(cheaper + lift, 25), np.percentile(cheaper + lift, 75)],
                                               abs=1e-6)
    per_image_rate = [-10.0, 100 * (0.9 * 2 ** (-1 / 3) - 1), 100 * (0.9 * 2 ** (-1 / 3) - 1)]
    assert got["bd_rate"] == pytest.approx(100 * (0.9 * 2 ** (-2 / 9) - 1), abs=0.01)
    assert got["bd_rate_ci"] == pytest.approx([np.percentile(per_image_rate, 25), np.percentile(per_image_rate, 75)],
                                              abs=0.01)
    assert got["bd_map50_defined_share"] == got["bd_rate_defined_share"] == 1.0
    (pair,) = got["per_pair"]
    assert pair == {"pair": ["ref", "test"], "bd_map50": pytest.approx(cheaper + 0.02 / 3, abs=1e-6), "bd_reason": "",
                    "ref_map50": pytest.approx(list(levels)), "test_map50": pytest.approx(list(levels + 0.02 / 3)),
                    "ref_bpp": pytest.approx(list(rates)), "test_bpp": pytest.approx(list(0.9 * rates))}

    # two pairs (seeds): the means over them; BD-mAP over the pairs where it is defined
    both = paired_curve_comparison(curves, [("ref", "test"), ("ref", "apart")], "d", draws, confidence=0.5)
    assert both["delta_map50"] == pytest.approx([0.01 / 3] * 4)
    assert both["bd_map50"] == pytest.approx(got["bd_map50"], abs=1e-9)
    assert both["bd_rate"] == pytest.approx((got["bd_rate"] + 100 * (100 - 1)) / 2, rel=1e-6)   # 100× the bits
    assert both["per_pair"][1]["bd_map50"] == "n/a"
    assert both["per_pair"][1]["bd_reason"] == "the curves do not overlap on the log-rate axis"
    # no pair with a BD-mAP: "n/a", no interval, defined on no resample
    apart = paired_curve_comparison(curves, [("ref", "apart")], "d", draws)
    assert apart["bd_map50"] == "n/a" and apart["bd_map50_ci"] is None and apart["bd_map50_defined_share"] == 0.0
    assert apart["bd_rate"] == pytest.approx(9900, rel=1e-6) and apart["bd_rate_defined_share"] == 1.0
