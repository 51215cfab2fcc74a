"""Metrics against known answers."""

import json
import math

import numpy as np

import pytest
import torch

from icm.metrics import bd_metrics, code_image, coco_map, detections_to_coco, ms_ssim, psnr, records_to_coco_gt, top1
from icm.metrics.bitstream import pad_to_multiple
from icm.zoo import build_codec


def test_bitstream_decode_equals_forward_and_bpp_counts_bytes():
    """bpp from the bytes CompressAI's own ``compress`` writes for the padded image (70x90 is
    padded by 29 rows and 19 columns on each side to 128x128), over the 70·90 original pixels."""
    torch.manual_seed(0)
    model = build_codec("bmshj2018-hyperprior", 1, weights="random:0").eval()
    model.update(force=True)
    x = torch.rand(1, 3, 70, 90)
    coded = code_image(model, x)
    padded, pad = pad_to_multiple(x, 64)
    assert pad == (19, 19, 29, 29) and padded.shape[-2:] == (128, 128)
    assert torch.equal(padded, torch.nn.functional.pad(x, (19, 19, 29, 29)))
    with torch.no_grad():
        direct = model.compress(padded)
        decoded = model.decompress(direct["strings"], direct["shape"])["x_hat"][..., 29:99, 19:109].clamp(0, 1)
        forward = model(padded)["x_hat"][..., 29:99, 19:109].clamp(0, 1)
    nbytes = sum(len(s) for group in direct["strings"] for s in group)
    assert nbytes > 0 and coded.strings == direct["strings"] and coded.num_bytes == nbytes
    assert coded.bpp == 8 * nbytes / 6300
    assert coded.pad == (19, 19, 29, 29) and coded.x_hat.shape == x.shape
    assert torch.equal(coded.x_hat, decoded)
    torch.testing.assert_close(coded.x_hat, forward, atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="one image"):
        code_image(model, torch.rand(2, 3, 64, 64))


def test_psnr_msssim_known_answers():
    a = torch.rand(1, 3, 64, 64)
    b = (a + 0.1).clamp(max=10)
    assert psnr(a, b) == pytest.approx(20.0, abs=1e-6)
    assert psnr(a, a) == math.inf
    assert ms_ssim(a, a) == pytest.approx(1.0, abs=1e-6)
    assert ms_ssim(torch.rand(1, 3, 200, 200), torch.rand(1, 3, 200, 200)) < 0.2


def test_top1():
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert top1(logits, torch.tensor([1, 0, 0])) == pytest.approx(2 / 3)


def test_coco_map_ground_truth_is_perfect_and_shifted_is_not():
    records = [{"width": 100, "height": 100, "boxes": [[10, 10, 50, 50], [60, 60, 90, 95]], "class_ids": [0, 1]},
               {"width": 80, "height": 80, "boxes": [[5, 5, 40, 30]], "class_ids": [1]}]
    gt = records_to_coco_gt(records, ["a", "b"])
    perfect = [{"boxes": torch.tensor(r["boxes"], dtype=torch.float32), "scores": torch.ones(len(r["boxes"])),
                "labels": torch.tensor(r["class_ids"])} for r in records]
    assert coco_map(gt, detections_to_coco(perfect)) == {"map": pytest.approx(1.0), "map50": pytest.approx(1.0),
                                                         "map75": pytest.approx(1.0)}
    shifted = [dict(p, boxes=p["boxes"] + 6) for p in perfect]
    worse = coco_map(gt, detections_to_coco(shifted))
    assert worse["map"] < 0.9
    wrong_class = [dict(p, labels=1 - p["labels"]) for p in perfect]
    assert coco_map(gt, detections_to_coco(wrong_class))["map50"] == 0.0
    assert coco_map(gt, []) == {"map": 0.0, "map50": 0.0, "map75": 0.0}
    # no ground truth for any category: pycocotools' -1 is reported as 0
    empty_gt = records_to_coco_gt([{"width": 10, "height": 10, "boxes": [], "class_ids": []}], ["a"])
    assert coco_map(empty_gt, detections_to_coco([perfect[1]])) == {"map": 0.0, "map50": 0.0, "map75": 0.0}


def test_coco_conversions_by_hand():
    records = [{"width": 100.0, "height": 80, "path": "d/a.png", "boxes": [[10, 20, 50, 60]], "class_ids": [1]},
               {"width": 30, "height": 40, "boxes": np.zeros((0, 4)), "class_ids": []},
               {"width": 30, "height": 40, "boxes": [[1.5, 2.5, 4.5, 10.5], [0, 0, 3, 3]], "class_ids": [0, 1]}]
    assert records_to_coco_gt(records, ["a", "b"]) == {
        "images": [{"id": 1, "width": 100, "height": 80, "file_name": "d/a.png"},
                   {"id": 2, "width": 30, "height": 40, "file_name": ""},
                   {"id": 3, "width": 30, "height": 40, "file_name": ""}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 2, "bbox": [10.0, 20.0, 40.0, 40.0], "area": 1600.0, "iscrowd": 0},
            {"id": 2, "image_id": 3, "category_id": 1, "bbox": [1.5, 2.5, 3.0, 8.0], "area": 24.0, "iscrowd": 0},
            {"id": 3, "image_id": 3, "category_id": 2, "bbox": [0.0, 0.0, 3.0, 3.0], "area": 9.0, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    predictions = [{"boxes": torch.tensor([[10.0, 20.0, 50.0, 60.0]]), "scores": torch.tensor([0.5]),
                    "labels": torch.tensor([1])},
                   {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, int)},
                   {"boxes": np.array([[1.0, 2.0, 4.0, 10.0]]), "scores": np.array([0.25]), "labels": np.array([0])}]
    assert detections_to_coco(predictions) == [
        {"image_id": 1, "category_id": 2, "bbox": [10.0, 20.0, 40.0, 40.0], "score": 0.5},
        {"image_id": 3, "category_id": 1, "bbox": [1.0, 2.0, 3.0, 8.0], "score": 0.25}]
    result = coco_map(records_to_coco_gt(records, ["a", "b"]), detections_to_coco(predictions))
    # class a: its one object found at IoU 18.75 / 29.25 = 0.64 (AP 1 at IoU .5, .55, .6; 0 from .65
    # on); class b: one of two, exactly (precision 1 to recall 0.5: 51 of COCO's 101 recall points)
    assert set(result) == {"map", "map50", "map75"} and result["map50"] == pytest.approx((1 + 51 / 101) / 2)
    assert result["map75"] == pytest.approx((0 + 51 / 101) / 2)
    assert result["map"] == pytest.approx((3 / 10 + 51 / 101) / 2)


def test_bd_rate_known_answer_and_na():
    rate = [0.2, 0.4, 0.8, 1.6]
    quality = [28.0, 31.0, 34.0, 37.0]
    same = bd_metrics(rate, quality, rate, quality)
    assert same["bd_rate_percent"] == pytest.approx(0.0, abs=1e-6)
    assert same["bd_quality"] == pytest.approx(0.0, abs=1e-9) and same["method"] == "akima"
    assert same["points"] == [4, 4] and same["bd_rate_percent_overlap"] == same["bd_quality_overlap"] == 1.0
    cheaper = bd_metrics(rate, quality, [r * 0.9 for r in rate], quality)
    assert cheaper["bd_rate_percent"] == pytest.approx(-10.0, abs=0.05)
    better = bd_metrics(rate, quality, rate, [q + 1.5 for q in quality])      # 1.5 dB more at every rate
    assert better["bd_quality"] == pytest.approx(1.5, abs=1e-9) and better["bd_rate_percent_overlap"] == 0.714
    # points in any order, non-positive or non-finite ones left out; the method passed through
    shuffled = bd_metrics(rate[::-1] + [0.0, float("nan")], quality[::-1] + [20.0, 30.0],
                          [r * 0.9 for r in rate], quality, method="pchip")
    assert shuffled["points"] == [4, 4] and shuffled["method"] == "pchip"
    assert shuffled["bd_rate_percent"] == pytest.approx(-10.0, abs=0.05)
    uneven = bd_metrics(rate, quality[:3], rate, quality)
    assert uneven["bd_rate_percent"] == uneven["bd_quality"] == "n/a"
    assert uneven["bd_rate_percent_reason"] == "the anchor curve has 4 rates but 3 quality values"
    assert bd_metrics(rate, quality, rate[:3], quality)["bd_quality_reason"] == \
        "the test curve has 3 rates but 4 quality values"
    no_overlap = bd_metrics(rate, quality, rate[:2], [10.0, 11.0])
    assert no_overlap["bd_rate_percent"] == "n/a" and no_overlap["bd_rate_percent_reason"]


def test_bd_metrics_edges():
    import warnings

    import bjontegaard as bd

    rate, quality = [0.2, 0.4, 0.8, 1.6], [28.0, 31.0, 34.0, 37.0]
    # exactly 75 % overlap (quality [0, 7] against [1, 8]) is enough; +1 at every rate is BD +1
    edge = bd_metrics([1, 2], [0, 7], [1, 2], [1, 8])
    assert edge["bd_rate_percent_overlap"] == 0.75 and isinstance(edge["bd_rate_percent"], float)
    assert edge["bd_quality"] == pytest.approx(1.0, abs=1e-9)
    # curves of different point counts, as the package computes them
    fewer = bd_metrics(rate, quality, [0.2, 0.5, 1.6], [29.0, 32.5, 38.0])
    assert fewer["points"] == [4, 3] and fewer["bd_rate_percent_overlap"] == 0.8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        direct = bd.bd_rate(rate, quality, [0.2, 0.5, 1.6], [29.0, 32.5, 38.0], method="akima",
                            require_matching_points=False)
    assert fewer["bd_rate_percent"] == pytest.approx(direct, rel=1e-12)
    # a quality that stalls on either curve: no BD-rate (rate cannot be read off quality); BD-quality still
    stalls = "quality does not rise strictly with rate on both curves (rate cannot be read off quality)"
    for anchor_q, test_q in ((quality, [28.0, 31.0, 31.0, 37.0]), ([28.0, 28.0, 34.0, 37.0], quality),
                             (quality, [28.0, 31.0, 30.0, 37.0])):
        flat = bd_metrics(rate, anchor_q, rate, test_q)
        assert flat["bd_rate_percent"] == "n/a" and flat["bd_rate_percent_reason"] == stalls
        assert isinstance(flat["bd_quality"], float)
    small_steps = bd_metrics([1, 2, 4], [0.3, 0.4, 0.5], [1, 2, 4], [0.32, 0.41, 0.52])   # mAP-like values
    assert isinstance(small_steps["bd_rate_percent"], float) and small_steps["bd_quality"] == pytest.approx(
        0.04 / 3, abs=0.005)
    # unusable points (None as a lossless PSNR is written, ±inf, NaN, rate ≤ 0) are left out
    messy = bd_metrics(rate + [float("inf"), 0.5, 0.7, -1.0, None], quality + [40.0, None, float("nan"), 30.0, 33.0],
                       [0.2, 0.4, 0.8, 1.6, 0.9], quality + [float("inf")])
    assert messy["points"] == [4, 4] and messy["bd_rate_percent"] == pytest.approx(0.0, abs=1e-9)
    # one rate for every point: no log-rate range to integrate over
    constant = bd_metrics([0.5, 0.5], [1.0, 2.0], [0.5, 0.5], [1.0, 2.0])
    assert constant["bd_quality"] == "n/a" and "do not overlap on the log-rate axis" in constant["bd_quality_reason"]
    assert constant["bd_quality_overlap"] == 0.0
    # the package's own refusal is reported with its type and message
    wrong = bd_metrics(rate, quality, rate, quality, method="nosuch")
    assert wrong["bd_rate_percent"] == wrong["bd_quality"] == "n/a"
    assert wrong["bd_quality_reason"].startswith("ValueError: Invalid interpolation method 'nosuch'")
    cheaper = bd_metrics(rate, quality, [r * 0.9 for r in rate], quality)
    shift = math.log10(1 / 0.9)                      # on log-rate, the ranges are 8x wide and shifted
    assert cheaper["bd_quality"] > 0
    assert cheaper["bd_quality_overlap"] == round((math.log10(8) - shift) / (math.log10(8) + shift), 3)


def test_bd_rate_over_the_test_curve_s_range_against_a_wider_anchor():
    """``span="test"``: an anchor sampled past both ends of the test curve (a long JPEG ladder)
    gives a BD figure over all of the test curve, where the package's union rule refuses it; the
    anchor's points outside the bracketing stretch (a stall above the test's range) do not count."""
    anchor_r = [0.05 * 2 ** k for k in range(7)]                       # 0.05 … 3.2 bpp
    anchor_q = [10 * math.log10(r) + 30 for r in anchor_r]
    test_r = [0.2, 0.3, 0.45, 0.6]
    test_q = [10 * math.log10(r) + 33 for r in test_r]                 # 3 dB better at every rate: half the bits
    union = bd_metrics(anchor_r, anchor_q, test_r, test_q)
    assert union["bd_rate_percent"] == "n/a" and "of the quality range, below 75%" in union["bd_rate_percent_reason"]
    over_test = bd_metrics(anchor_r, anchor_q, test_r, test_q, span="test")
    assert over_test["bd_rate_percent_overlap"] == 1.0
    assert over_test["bd_rate_percent"] == pytest.approx(100 * (10 ** -0.3 - 1), abs=0.5)
    stalled = bd_metrics(anchor_r + [6.4], anchor_q + [anchor_q[-1]], test_r, test_q, span="test")
    assert stalled["bd_rate_percent"] == pytest.approx(over_test["bd_rate_percent"], abs=1e-9)
    assert bd_metrics(anchor_r + [6.4], anchor_q + [anchor_q[-1]], test_r, test_q)["bd_rate_percent"] == "n/a"
    # the anchor still has to cover the test curve: above its top, only part of the test's range counts
    higher = [q + 8 for q in test_q]
    short = bd_metrics(anchor_r, anchor_q, test_r, higher, span="test")
    assert short["bd_rate_percent"] == "n/a"
    assert "of the test curve's quality range, below 75%" in short["bd_rate_percent_reason"]
    with pytest.raises(ValueError, match="span must be one of"):
        bd_metrics(anchor_r, anchor_q, test_r, test_q, span="anchor")


def _kodak():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "shared" / "anchors" / "kodak"
    if not root.is_dir():
        pytest.skip(f"the published Kodak curves are not at {root}")
    return {p.stem: json.loads(p.read_text()) for p in sorted(root.glob("*.json"))}


def test_bd_table_on_the_published_kodak_curves_matches_bjontegaard():
    import warnings

    import bjontegaard as bd

    curves = _kodak()
    computed = 0
    for (name, curve), anchor in ((item, a["results"]) for item in curves.items() for a in curves.values()):
        test = curve["results"]
        for axis, fn, key in (("psnr-rgb", bd.bd_rate, "bd_rate_percent"), ("psnr-rgb", bd.bd_psnr, "bd_quality"),
                              ("ms-ssim-rgb", bd.bd_rate, "bd_rate_percent")):
            ours = bd_metrics(anchor["bpp"], anchor[axis], test["bpp"], test[axis])
            assert ours[key] == "n/a" or np.isfinite(ours[key])
            if ours[key] == "n/a":
                assert ours[f"{key}_reason"] and ours[f"{key}_overlap"] < 0.75
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                direct = fn(anchor["bpp"], anchor[axis], test["bpp"], test[axis], method="akima",
                            require_matching_points=False)
            assert ours[key] == pytest.approx(direct, rel=1e-9), (name, key)
            computed += 1
    assert computed >= 20                # curves of 6, 8 and 19 points against each other
    anchor = curves["jpeg"]["results"]
    hyper = bd_metrics(anchor["bpp"], anchor["psnr-rgb"], curves["compressai-bmshj2018-hyperprior_mse_cuda"]
                       ["results"]["bpp"], curves["compressai-bmshj2018-hyperprior_mse_cuda"]["results"]["psnr-rgb"])
    assert hyper["bd_rate_percent"] < -30  # a learned codec spends far fewer bits than JPEG on Kodak
    assert hyper["points"] == [19, 8]


def test_bd_metrics_say_why_instead_of_nan():
    rate, quality = [0.2, 0.4, 0.8, 1.6], [28.0, 31.0, 34.0, 37.0]
    apart = bd_metrics(rate, quality, [3.0, 6.0], [40.0, 42.0])          # no overlap on either axis
    for key, axis in (("bd_rate_percent", "quality"), ("bd_quality", "log-rate")):
        assert apart[key] == "n/a" and apart[f"{key}_overlap"] == 0
        assert apart[f"{key}_reason"] == f"the curves do not overlap on the {axis} axis"
    little = bd_metrics(rate, quality, [1.2, 2.4], [36.0, 38.5])         # overlaps a sliver: 1 of 10.5 dB
    assert little["bd_rate_percent"] == "n/a"
    assert little["bd_rate_percent_reason"] == "the curves overlap on 10% of the quality range, below 75%"
    # qualities whose range overflows a float: the package gives NaN, reported with the reason
    huge = bd_metrics([1, 2], [-1.7e308, 1.7e308], [1, 2], [-1.6e308, 1.75e308])
    assert huge["bd_rate_percent"] == "n/a" and huge["bd_rate_percent_reason"] == "the interpolation gave nan"
    assert 0 < little["bd_rate_percent_overlap"] < 0.75
    one = bd_metrics(rate, quality, [0.5], [32.0])
    assert one["bd_rate_percent"] == "n/a" and "at least 2" in one["bd_rate_percent_reason"]
    flat = bd_metrics(rate, quality, [0.2, 0.4, 0.8], [0.5, 0.5, 0.6])     # a mAP curve that stalls
    assert flat["bd_rate_percent"] == "n/a"
    assert all(v == "n/a" or np.isfinite(v) for k, v in flat.items() if k in ("bd_rate_percent", "bd_quality"))
