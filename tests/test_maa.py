"""MAA methods and the MAA stage: bounds, padding, loss descent, the meta round, batching,
determinism; the pipeline through Ray with resume and bad input."""

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch import nn

from icm.data import comparable, write_png
from icm.data.ray_io import work_units
from icm.data.readers import FolderReader
from icm.detectors.base import Detector
from icm.maa import LinfBound, Member, aafg, letterbox, meta_round, paste_back, per_image_losses
from icm.maa.canvas import boxes_from_canvas, boxes_to_canvas, crop, to_tensor
from icm.maa.stage import MAAStage
from icm.zoo import build_detector

EPS, ALPHA = 8 / 255, 2 / 255
CLASSES = ["circle", "square", "triangle", "cross"]


class TinyDetector(Detector):
    """A one-conv 'detector' whose loss is easy to differentiate by hand."""

    family = "tiny"

    def __init__(self, seed):
        super().__init__(["x"])
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 2, 3, padding=1)

    def loss(self, images, targets):
        out = self.conv(images)
        per_image = [((out[i] - float(t["labels"][0])) ** 2).mean() for i, t in enumerate(targets)]
        return {"l2": torch.stack(per_image).sum()}


def _canvases(sizes, canvas, seed=0):
    rng = np.random.default_rng(seed)
    placed = [letterbox(to_tensor(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), canvas) for h, w in sizes]
    return torch.stack([c for c, _, _ in placed]), torch.stack([m for _, m, _ in placed]), [p for _, _, p in placed]


def test_meta_round_commits_exactly_the_held_out_step():
    x, mask, _ = _canvases([(20, 24), (24, 16)], 32)
    dets = [TinyDetector(s).freeze() for s in (1, 2, 3)]
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.tensor([lab])} for lab in (0.3, 0.8)]
    groups = [[Member(f"m{i}", d, targets)] for i, d in enumerate(dets)]
    bound = LinfBound(EPS)
    adv_t = (x + 0.01 * torch.randn_like(x) * mask).clamp(0, 1)

    def grad(fn, a):
        a = a.detach().requires_grad_(True)
        fn(a).backward()
        return a.grad

    def L(d, a):
        return d.loss(a, targets)["l2"]

    adv_in = adv_t
    for _ in range(2):
        g = grad(lambda a: L(dets[0], a) + L(dets[2], a), adv_in)
        adv_in = (adv_in - ALPHA * g.sign() * mask).clamp(0, 1)
    g_held = grad(lambda a: L(dets[1], a), adv_in)
    expected = bound.project((adv_t - ALPHA * g_held.sign() * mask).clamp(0, 1), x)

    got = meta_round(adv_t, mask, groups, 1, lambda a: bound.project(a, x), inner_steps=2, alpha=ALPHA, step=0)
    assert torch.equal(got, expected)
    g_at_start = grad(lambda a: L(dets[1], a), adv_t)  # the look-ahead matters: not the plain step
    assert not torch.equal(got, bound.project((adv_t - ALPHA * g_at_start.sign() * mask).clamp(0, 1), x))


def test_linf_and_map_bounds_by_hand():
    from icm.maa.bounds import MapBound, build_bound

    original = torch.tensor([0.0, 0.02, 0.5, 0.99, 1.0, 0.3])
    adv = torch.tensor([-0.5, 0.2, 0.45, 0.9, 1.3, -0.3])
    torch.testing.assert_close(LinfBound(0.03).project(adv, original),
                               torch.tensor([0.0, 0.05, 0.47, 0.96, 1.0, 0.27]))
    # a lower map below 0 (as a user may write it) still gives a pixel in [0, 1]
    lower, upper = torch.tensor([0.0, 0.1, 0.46, 0.95, 0.9, -0.2]), torch.tensor([0.1, 0.15, 0.6, 1.0, 1.2, 0.4])
    torch.testing.assert_close(MapBound().project(adv, original, lower, upper),
                               torch.tensor([0.0, 0.15, 0.46, 0.95, 1.0, 0.0]))
    missing = r"^bound 'map' needs per-pixel lower and upper maps for every image$"
    with pytest.raises(ValueError, match=missing):
        MapBound().project(adv, original, lower, None)
    with pytest.raises(ValueError, match=missing):
        MapBound().project(adv, original, None, upper)
    spec = {"type": "linf", "eps": 0.1}
    assert build_bound(spec).eps == 0.1 and spec == {"type": "linf", "eps": 0.1}   # the spec is left as it was
    assert build_bound(None).eps == 8 / 255 and build_bound({}).eps == 8 / 255
    assert build_bound({"eps": 0.2}).to_dict() == {"type": "linf", "eps": 0.2}
    assert isinstance(build_bound({"type": "map"}), MapBound) and MapBound().to_dict() == {"type": "map"}
    assert (LinfBound().kind, MapBound().kind) == ("linf", "map")
    with pytest.raises(ValueError, match="'box' is not 'linf' or 'map'"):
        build_bound({"type": "box"})


class SeedRecorder(Detector):
    """Records the sampling seed of every image of every loss call; loss = mean of the image."""

    family = "recorder"

    def __init__(self):
        super().__init__(["x"])
        self.seen = []

    def loss(self, images, targets):
        self.seen.append([t["seed"] for t in targets])
        return {"mean": images.mean(dim=(1, 2, 3)).sum()}


class LeftHalfDarkness(Detector):
    """Loss = minus the mean of the image's left 16 columns: descent brightens them, leaves the rest."""

    family = "left-half"

    def __init__(self):
        super().__init__(["x"])

    def loss(self, images, targets):
        return {"dark": -images[..., :16].mean(dim=(1, 2, 3)).sum()}


def test_aafg_is_masked_sign_descent_projected_each_step():
    x, mask, _ = _canvases([(20, 24), (24, 16)], 32)
    det = TinyDetector(1).freeze()
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.tensor([lab])} for lab in (0.3, 0.8)]
    eps = 3 / 255
    got = aafg(x, mask, [Member("t", det, targets)], lambda a: LinfBound(eps).project(a, x), steps=3, alpha=ALPHA)
    adv = x.clone()
    for _ in range(3):
        a = adv.detach().requires_grad_(True)
        det.loss(a, targets)["l2"].backward()
        adv = (adv - ALPHA * a.grad.sign() * mask).clamp(0, 1)
        adv = torch.minimum(torch.maximum(adv, x - eps), x + eps).clamp(0, 1)
    assert torch.equal(got, adv) and not torch.equal(got, x)
    assert torch.equal(aafg(x, mask, [Member("t", det, targets)], lambda a: a, steps=0), x)

    # seeds: image seed s at step k samples with (s·1000003 + k) mod 2^31; no seeds: the step
    rec = SeedRecorder()
    aafg(x, mask, [Member("r", rec, targets, seeds=[3000, 2 ** 31 - 1])], lambda a: a, steps=2)
    # 3000·1000003 = 3 000 009 000 wraps once past 2^31 (and is below 2^32)
    assert rec.seen == [[852_525_352, (2 ** 31 - 1) * 1_000_003 % 2 ** 31],
                        [852_525_353, ((2 ** 31 - 1) * 1_000_003 + 1) % 2 ** 31]]
    # a mean loss falls under each descent step: every unmasked pixel goes down by α
    one = aafg(x, mask, [Member("r", SeedRecorder(), targets)], lambda a: a, steps=1, alpha=ALPHA)
    torch.testing.assert_close(one, (x - ALPHA * mask).clamp(0, 1))
    # ascent where the loss says so, and no step where it has no gradient: a loss on the left half
    # only, that wants it brighter; pixels near white stop at 1
    up = aafg(x, mask, [Member("u", LeftHalfDarkness(), targets)], lambda a: a, steps=1, alpha=ALPHA)
    left = (x + ALPHA * mask)[..., :16]
    assert (left > 1).any()
    torch.testing.assert_close(up[..., :16], left.clamp(0, 1))
    assert torch.equal(up[..., 16:], x[..., 16:])
    # the manifest's losses: one call per image, each with its own seed at step 0
    rec = SeedRecorder()
    losses = per_image_losses(Member("r", rec, targets, seeds=[5, 7]), x)
    assert losses == pytest.approx([float(x[0].mean()), float(x[1].mean())], rel=1e-6)
    assert rec.seen == [[5 * 1_000_003], [7 * 1_000_003]]
    rec = SeedRecorder()
    per_image_losses(Member("r", rec, targets), x)
    assert rec.seen == [[0], [0]]
    # the authors' defaults: 10 steps of α = 2/255
    rec = SeedRecorder()
    torch.testing.assert_close(aafg(x, mask, [Member("r", rec, targets)], lambda a: a), (x - 20 / 255 * mask).clamp(0, 1))
    assert [s for s, _ in rec.seen] == list(range(10))


def test_meta_aafg_rounds_and_their_steps():
    """Two groups, T = 2, two inner steps: each round's inner steps use the other group, the
    commit the held-out one, at steps (t·groups + h)·(inner + 1) + k."""
    from icm.maa.methods import meta_aafg

    x, mask, _ = _canvases([(20, 24)], 32)
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.tensor([0])}]
    recorders = [SeedRecorder(), SeedRecorder()]
    groups = [[Member(f"g{i}", r, targets)] for i, r in enumerate(recorders)]
    out = meta_aafg(x, mask, groups, lambda a: a, outer=2, inner_steps=2, alpha=ALPHA)
    # rounds start at steps 0, 3, 6, 9: inner steps at +0, +1 on the other group, the commit at +2
    assert [s for (s,) in recorders[0].seen] == [2, 3, 4, 8, 9, 10]
    assert [s for (s,) in recorders[1].seen] == [0, 1, 5, 6, 7, 11]
    torch.testing.assert_close(out, (x - 4 * ALPHA * mask).clamp(0, 1))     # 2 outer × 2 committed steps
    with pytest.raises(ValueError, match="at least 2 groups"):
        meta_aafg(x, mask, groups[:1], lambda a: a)
    # the authors' defaults: T = 10 rounds per group, 8 inner steps, α = 2/255 (20 commits)
    recorders = [SeedRecorder(), SeedRecorder()]
    out = meta_aafg(x, mask, [[Member(f"g{i}", r, targets)] for i, r in enumerate(recorders)], lambda a: a)
    assert [len(r.seen) for r in recorders] == [10 * (8 + 1)] * 2
    torch.testing.assert_close(out, (x - 20 * 2 / 255 * mask).clamp(0, 1))


def test_aafg_lowers_loss_keeps_bound_and_padding():
    det = build_detector("centernet_resnet18", CLASSES, weights="random:0", image_size=64).freeze()
    x, mask, _ = _canvases([(40, 56), (64, 30)], 64, seed=1)
    targets = [{"boxes": torch.tensor([[10.0, 14.0, 40.0, 44.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[20.0, 5.0, 44.0, 30.0]]), "labels": torch.tensor([2])}]
    member = Member("cn", det, targets, seeds=[1, 2])
    bound = LinfBound(EPS)
    adv = aafg(x, mask, [member], lambda a: bound.project(a, x), steps=5, alpha=ALPHA)
    assert (adv - x).abs().max() <= EPS + 1e-6
    assert torch.equal(adv[mask.expand_as(adv) == 0], x[mask.expand_as(x) == 0])
    before, after = per_image_losses(member, x), per_image_losses(member, adv)
    assert all(b > a for b, a in zip(before, after)), (before, after)


def test_letterbox_and_boxes_round_trip_on_images_larger_than_the_canvas():
    """Placement by hand: a tall and a wide image, both larger than the 64 px canvas, a small one
    pasted unresized, and two one pixel thin; boxes go onto the canvas and back to the image's own
    pixels."""
    cases = [  # (h, w) → (top, left, placed_h, placed_w), a box on the image, the same box on the canvas
        ((150, 90), (0, 13, 64, 38), [9.0, 30.0, 45.0, 120.0], [9 * 38 / 90 + 13, 30 * 64 / 150, 45 * 38 / 90 + 13,
                                                                 120 * 64 / 150]),
        ((90, 150), (13, 0, 38, 64), [30.0, 9.0, 120.0, 45.0], [30 * 64 / 150, 9 * 38 / 90 + 13, 120 * 64 / 150,
                                                                 45 * 38 / 90 + 13]),
        ((40, 56), (12, 4, 40, 56), [3.0, 5.0, 50.0, 33.0], [7.0, 17.0, 54.0, 45.0]),
        ((2, 200), (31, 0, 1, 64), [50.0, 0.0, 150.0, 2.0], [16.0, 31.0, 48.0, 32.0]),    # 2·0.32 rounds to 1 row
        ((200, 2), (0, 31, 64, 1), [0.0, 50.0, 2.0, 150.0], [31.0, 16.0, 32.0, 48.0]),
    ]
    for (h, w), (top, left, ph, pw), box, on_canvas in cases:
        pixels = np.random.default_rng(h).integers(0, 256, (h, w, 3), dtype=np.uint8)
        image = to_tensor(pixels)
        canvas, mask, p = letterbox(image, 64)
        assert (p.height, p.width, p.top, p.left, p.placed_h, p.placed_w) == (h, w, top, left, ph, pw)
        resized = h > 64 or w > 64
        assert p.to_dict() == {"top": top, "left": left, "placed_h": ph, "placed_w": pw, "height": h, "width": w,
                               "resized": resized}
        assert p.resized == resized and canvas.shape == (3, 64, 64) and canvas.dtype == mask.dtype == torch.float32
        inside = torch.zeros(64, 64, dtype=torch.bool)
        inside[top:top + ph, left:left + pw] = True
        assert torch.equal(mask[0] == 1, inside) and torch.all(mask[0][~inside] == 0)
        assert torch.all(canvas[:, ~inside] == 128 / 255)               # the gray padding
        assert crop(canvas, p).shape == (3, ph, pw)
        if resized and min(ph, pw) > 1:   # downscaled with antialiasing, as PIL's bilinear resize does (to
            # its 8-bit rounding; at a one-pixel output the two place their single sample apart)
            pil = np.asarray(Image.fromarray(pixels).resize((pw, ph), Image.BILINEAR), np.float32) / 255
            torch.testing.assert_close(crop(canvas, p), torch.from_numpy(pil).permute(2, 0, 1), rtol=0, atol=1 / 255)
        elif not resized:
            assert torch.equal(crop(canvas, p), image)
        two = np.asarray([box, [0.0, 0.0, 0.0, 0.0]])                   # several boxes at once, and none
        got = boxes_to_canvas(two, p)
        torch.testing.assert_close(got, torch.tensor([on_canvas, [left, top, left, top]], dtype=torch.float32),
                                   rtol=0, atol=1e-4)
        back = boxes_from_canvas(got, p)
        torch.testing.assert_close(back, torch.tensor(two, dtype=torch.float32), rtol=0, atol=1e-4)
        assert boxes_to_canvas(np.zeros((0, 4)), p).shape == boxes_from_canvas(torch.zeros(0, 4), p).shape == (0, 4)
        # a box over the whole canvas is clipped to the image: the padding holds no image pixels
        torch.testing.assert_close(boxes_from_canvas(torch.tensor([[0.0, 0.0, 64.0, 64.0]]), p),
                                   torch.tensor([[0.0, 0.0, float(w), float(h)]]), rtol=0, atol=1e-4)
    # 8-bit values to [0, 1] floats, from read-only arrays too (Ray Data gives those)
    values = np.array([[[0, 128, 255]]], np.uint8)
    values.flags.writeable = False
    as_float = to_tensor(values)
    assert as_float.dtype == torch.float32 and as_float.shape == (3, 1, 1)
    assert as_float.flatten().tolist() == [0.0, np.float32(128 / 255), 1.0]
    # a white image downscaled stays within [0, 1] (the resampling overshoots 1 by rounding)
    white, _, _ = letterbox(torch.ones(3, 150, 90), 64)
    assert white.max() == 1.0
    canvas64, mask64, _ = letterbox(torch.ones(3, 20, 30, dtype=torch.float64), 64)    # the image's dtype is kept
    assert canvas64.dtype == mask64.dtype == torch.float64


def test_paste_back_keeps_bound_when_downscaled():
    original = to_tensor(np.random.default_rng(3).integers(0, 256, (90, 150, 3), dtype=np.uint8))
    canvas, mask, placement = letterbox(original, 64)
    assert placement.resized and (placement.placed_h, placement.placed_w) == (38, 64)
    adv = LinfBound(EPS).project(canvas + EPS * torch.sign(torch.randn_like(canvas)) * mask, canvas)
    out = paste_back(original, adv, canvas, placement)
    assert out.shape == original.shape
    assert (out - original).abs().max() <= EPS + 1e-6
    # by hand: a 2×4 image on a 2 px canvas sits in the top row (1×2); the canvas perturbation
    # (+0.08, −0.04) is upsampled to 4 columns at half-pixel centres (0.08, 0.05, −0.01, −0.04),
    # added to the original and clamped to [0, 1]
    small = torch.tensor([[0.5, 0.5, 0.5, 0.02], [0.95, 0.5, 0.5, 0.5]]).expand(3, 2, 4)
    clean, _, p = letterbox(small, 2)
    assert (p.top, p.left, p.placed_h, p.placed_w) == (0, 0, 1, 2)
    perturbed = clean.clone()
    perturbed[:, 0, 0] += 0.08
    perturbed[:, 0, 1] -= 0.04
    expected = torch.tensor([[0.58, 0.55, 0.49, 0.0], [1.0, 0.55, 0.49, 0.46]]).expand(3, 2, 4)
    torch.testing.assert_close(paste_back(small, perturbed, clean, p), expected, rtol=0, atol=1e-6)
    # unresized: the perturbation lands where the image sits on the canvas
    image = torch.full((3, 3, 2), 0.5)
    clean, _, p = letterbox(image, 5)
    perturbed = clean.clone()
    perturbed[:, p.top, p.left] += 0.1
    out = paste_back(image, perturbed, clean, p)
    assert (p.top, p.left) == (1, 1) and out[:, 0, 0].tolist() == pytest.approx([0.6] * 3)
    assert torch.equal(out.flatten(1)[:, 1:], image.flatten(1)[:, 1:])


def _folder(tmp_path, sizes):
    rng = np.random.default_rng(5)
    for i, (h, w) in enumerate(sizes):
        img = np.full((h, w, 3), 90, np.uint8)
        img[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = rng.integers(0, 256, 3, dtype=np.uint8)
        img = np.clip(img.astype(int) + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)
        write_png(tmp_path / f"img{i}.png", img)
    return tmp_path


class BoxedFolder(FolderReader):
    """A folder reader that gives every image one centred box of class 1."""

    def refs(self):
        refs = super().refs()
        for r in refs:
            r.boxes, r.class_ids, r.class_names = [[12.0, 10.0, 40.0, 36.0]], [1], [CLASSES[1]]
        return refs


def _params(method="meta_model", canvas=64):
    return {"method": method, "canvas": canvas, "outer": 1, "inner_steps": 1, "steps": 2, "alpha": "2/255",
            "bound": {"type": "linf", "eps": "8/255"}, "device": "cpu", "seed": 0,
            "detectors": [{"label": "cn", "name": "centernet_resnet18", "weights": "random:0"},
                          {"label": "yolo", "name": "yolov8n", "weights": "random:1"}]}


def test_stage_batch_vs_alone_and_rerun_identical(tmp_path):
    reader = BoxedFolder(_folder(tmp_path / "src", [(48, 56), (50, 50), (60, 44), (52, 64)]), name="f")
    stage = MAAStage(str(tmp_path / "batch"), _params(), CLASSES)
    (unit,) = work_units(reader, 4)
    rows = stage.run_unit(unit)
    assert [r["status"] for r in rows] == ["ok"] * 4
    alone = MAAStage(str(tmp_path / "alone"), _params(), CLASSES)
    for single in work_units(reader, 1):
        alone.run_unit(single)
    rerun = MAAStage(str(tmp_path / "rerun"), _params(), CLASSES)
    rerun.run_unit(unit)
    same = total = 0
    for r in rows:
        a = np.asarray(Image.open(tmp_path / "batch" / r["output_path"]))
        b = np.asarray(Image.open(tmp_path / "alone" / r["output_path"]))
        same, total = same + (a == b).sum(), total + a.size
        assert (tmp_path / "batch" / r["output_path"]).read_bytes() == (tmp_path / "rerun" / r["output_path"]).read_bytes()
        orig = np.asarray(Image.open(tmp_path / "src" / r["source_id"].split("/", 1)[1]))
        assert np.abs(a.astype(int) - orig.astype(int)).max() <= 8
        assert r["linf"] * 255 <= 8 + 1e-9
    assert same / total >= 0.99
    before, after = json.loads(rows[0]["loss_before"]), json.loads(rows[0]["loss_after"])
    assert set(before) == set(after) == {"cn", "yolo"}


FRCNN = {"label": "frcnn", "name": "fasterrcnn_mobilenet_v3_large_fpn", "weights": "random:0",
         "rpn_pre_nms_top_n_train": 100, "rpn_post_nms_top_n_train": 50, "rpn_batch_size_per_image": 64,
         "box_batch_size_per_image": 32}


def test_seeded_detector_output_independent_of_batch_neighbours_and_position(tmp_path):
    """Faster R-CNN samples anchors and ROIs at random: each image's sample is seeded from its
    own id, so the image written is the same whichever unit it is in, beside which images and at
    which position (its seed would change with its position were it taken from there)."""
    reader = BoxedFolder(_folder(tmp_path / "src", [(48, 56), (100, 70), (60, 44)]), name="f")
    a, b, c = [r for u in work_units(reader, 3) for r in u["refs"]]
    params = {**_params("aafg"), "steps": 1, "detectors": [FRCNN]}
    layouts = {"together": [[a, b, c]], "apart": [[c, a], [b]]}      # every image elsewhere, beside others
    rows = {}
    for name, units in layouts.items():
        stage = MAAStage(str(tmp_path / name), params, CLASSES)
        for k, refs in enumerate(units):
            rows[name] = rows.get(name, []) + stage.run_unit({"unit_id": f"{name}-{k}", "refs": refs})
    seeds = {name: {r["source_id"]: r["seed"] for r in rs} for name, rs in rows.items()}
    assert seeds["together"] == seeds["apart"] and len(set(seeds["together"].values())) == 3
    for r in rows["together"]:
        assert r["status"] == "ok", r["error"]
        together = np.asarray(Image.open(tmp_path / "together" / r["output_path"]))
        apart = np.asarray(Image.open(tmp_path / "apart" / r["output_path"]))
        source = np.asarray(Image.open(tmp_path / "src" / r["source_id"].split("/", 1)[1]))
        assert (together != source).mean() > 0.2                      # the step changed the image
        # float reductions at another batch size may flip the sign of a near-zero gradient
        # component (TRAPS.md); another sample of anchors and ROIs changes far more
        assert (together == apart).mean() >= 0.99, r["source_id"]


def test_bound_after_rounding_to_8_bits_holds_on_the_written_png(tmp_path):
    """ε = 3.5/255: a float result may sit 3.5 levels from the original, which rounds to 4; the
    written PNG stays within floor(ε·255) = 3 levels of the source, also for an image larger
    than the canvas (its perturbation upsampled from the canvas)."""
    reader = BoxedFolder(_folder(tmp_path / "src", [(48, 56), (100, 140)]), name="f")
    params = {**_params("aafg"), "steps": 2, "bound": {"type": "linf", "eps": "7/510"},
              "detectors": _params()["detectors"][:1]}
    rows = MAAStage(str(tmp_path / "out"), params, CLASSES).run_unit(work_units(reader, 2)[0])
    assert [r["resized"] for r in rows] == [False, True]
    for r in rows:
        out = np.asarray(Image.open(tmp_path / "out" / r["output_path"])).astype(int)
        source = np.asarray(Image.open(tmp_path / "src" / r["source_id"].split("/", 1)[1])).astype(int)
        assert out.shape == source.shape
        assert np.abs(out - source).max() == 3, r["source_id"]       # reached, and never 4
        assert r["linf"] == pytest.approx(3 / 255)


def _pipeline_cfg(src, out):
    params = _params()
    for spec in params["detectors"]:
        spec["classes"] = CLASSES  # a plain folder has no class list of its own
    return {**params, "dataset": {"type": "folder", "root": str(src), "name": "mixed"}, "out_dir": str(out),
            "batch_size": 2, "workers": {"actors": 2, "num_cpus": 0.5}, "figure_images": 2}


@pytest.mark.slow
def test_pipeline_resume_bad_input_through_ray(ray_cluster, tmp_path):
    import maa_augment

    src = _folder(tmp_path / "src", [(48, 56), (50, 50), (60, 44), (52, 64), (100, 140)])
    (src / "img9_broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    full = tmp_path / "full"
    summary = maa_augment.run(_pipeline_cfg(src, full))
    assert summary["images"] == {"done": 5, "failed": 1, "skipped": 0, "not_run": 0}
    assert summary["resized_to_fit_canvas"] == 1 and summary["max_linf_255"] <= 8
    assert (full / "summary.png").is_file()
    manifest = pq.read_table(full / "manifest.parquet").to_pylist()
    bad = [r for r in manifest if r["status"] == "error"]
    assert len(bad) == 1 and "cannot decode" in bad[0]["error"] and bad[0]["source_id"] == "mixed/img9_broken.png"
    big = [r for r in manifest if r["source_id"] == "mixed/img4.png"][0]
    assert big["resized"] and json.loads(big["placement"])["width"] == 140
    assert json.loads(manifest[0]["models"])[0]["sha256"] == "random:0"
    assert {json.loads(r["runtime"])["threads"] for r in manifest if r["status"] == "ok"} == {1}   # 0.5 CPU each
    _page_shows_the_record(full)

    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shard = sorted((resumed / "manifest").glob("unit-*.parquet"))[1]
    lost = pq.read_table(shard).to_pylist()
    shard.unlink()
    for r in lost:
        (resumed / r["output_path"]).unlink()
    again = maa_augment.run(_pipeline_cfg(src, resumed))
    assert again["images"]["skipped"] == 6 - len(lost) and again["images"]["done"] == len(lost) == 2
    for r in manifest:
        if r["output_path"]:
            assert (full / r["output_path"]).read_bytes() == (resumed / r["output_path"]).read_bytes()
    assert comparable(full / "manifest.parquet").equals(comparable(resumed / "manifest.parquet"))


def _page_shows_the_record(out_dir):
    """The job's results page (python -m icm.report OUT_DIR) against its summary.json."""
    from page_checks import check_page, page_commands

    from icm.report import write_report

    page = write_report([str(out_dir)])
    assert page == (out_dir / "index.html").resolve()
    record = json.loads((out_dir / "summary.json").read_text())
    shown = check_page(page)[str((out_dir / "summary.json").resolve())]
    assert {"/images/done", "/images/failed", "/max_linf_255"} <= shown
    assert {f"/mean_loss_change/{d}" for d in record["mean_loss_change"]} <= shown
    assert page_commands(page) == [record["command"]]
    assert "summary.png" in page.read_text()                           # its figure, linked in place


def test_map_bound_holds_per_pixel(tmp_path):
    src = _folder(tmp_path / "src", [(40, 48), (44, 40)])
    reader = BoxedFolder(src, name="f")
    for ref in reader.refs():
        orig = np.asarray(Image.open(src / ref.image_id)).astype(int)
        write_png(tmp_path / "lower" / "f" / ref.image_id, np.clip(orig - 3, 0, 255).astype(np.uint8))
        write_png(tmp_path / "upper" / "f" / ref.image_id, np.clip(orig + 1, 0, 255).astype(np.uint8))
    params = {**_params("aafg"), "steps": 3,
              "bound": {"type": "map", "lower_dir": str(tmp_path / "lower"), "upper_dir": str(tmp_path / "upper")}}
    rows = MAAStage(str(tmp_path / "out"), params, CLASSES).run_unit(work_units(reader, 2)[0])
    for r in rows:
        assert r["status"] == "ok", r["error"]
        out = np.asarray(Image.open(tmp_path / "out" / r["output_path"])).astype(int)
        orig = np.asarray(Image.open(src / r["source_id"].split("/", 1)[1])).astype(int)
        diff = out - orig
        assert diff.min() >= -3 and diff.max() <= 1 and (diff != 0).any()


def test_stage_writes_overlapped_with_compute_write_the_same_bytes(tmp_path):
    """Two units at once on one stage (as Ray Data runs an ``overlap_io`` GPU actor: one decodes
    and writes while the other computes) write what one unit at a time writes, byte for byte."""
    from concurrent.futures import ThreadPoolExecutor

    reader = BoxedFolder(_folder(tmp_path / "src", [(48, 56), (50, 50), (60, 44), (52, 64)]), name="f")
    units = work_units(reader, 2)
    batches = [{"unit_json": np.array([json.dumps(u)])} for u in units]
    serial = MAAStage(str(tmp_path / "serial"), _params(), CLASSES)
    for batch in batches:
        serial(batch)
    overlapped = MAAStage(str(tmp_path / "overlapped"), _params(), CLASSES)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(overlapped, batches))
    assert all(not r["failure"][0] for r in results)
    for unit in units:
        for ref in unit["refs"]:
            rel = json.loads(next(str(r["rows_json"][0]) for r in results if r["unit_id"][0] == unit["unit_id"]))
            path = next(row["output_path"] for row in rel if row["source_id"] == ref["source_id"])
            assert (tmp_path / "serial" / path).read_bytes() == (tmp_path / "overlapped" / path).read_bytes()
        a = comparable(tmp_path / "serial/manifest" / f"{unit['unit_id']}.parquet")
        b = comparable(tmp_path / "overlapped/manifest" / f"{unit['unit_id']}.parquet")
        assert a.equals(b)



def _loss_of_png(stage, label, path, row, canvas_box, label_index):
    """A detector's loss on a written PNG, letterboxed again, with the row's seed: the target
    (the box on the canvas, the class index in the detector's classes) is given by hand."""
    from icm.detectors.base import total

    det = next(d for g in stage.groups for lab, d, _ in g if lab == label)
    canvas, _, _ = letterbox(to_tensor(np.asarray(Image.open(path))), stage.canvas)
    target = {"boxes": torch.tensor([canvas_box], dtype=torch.float32), "labels": torch.tensor([label_index])}
    target = det.prepare_targets([target], (stage.canvas, stage.canvas))[0]
    with torch.no_grad():   # Member.loss's per-step seed at step 0
        return float(total(det.loss(canvas[None], [dict(target, seed=row["seed"] * 1_000_003 % 2 ** 31)])))


# The box [12, 10, 40, 36] of BoxedFolder on the 64 px canvas: a 48x56 image sits unscaled at
# top 8, left 4; a 100x140 one is scaled by 64/140 to 46x64 at top 9 (46 = round(100·64/140)).
CANVAS_BOX = {(48, 56): [16.0, 18.0, 44.0, 44.0],
              (100, 140): [12 * 64 / 140, 10 * 46 / 100 + 9, 40 * 64 / 140, 36 * 46 / 100 + 9]}


def test_losses_are_measured_on_the_written_png(tmp_path):
    # the second image is larger than the canvas: what was optimised (a downscaled canvas) is not
    # what was written (the full-size image with the upsampled perturbation, rounded to 8 bits)
    reader = BoxedFolder(_folder(tmp_path / "src", [(48, 56), (100, 140)]), name="f")
    stage = MAAStage(str(tmp_path / "out"), _params(), CLASSES)
    rows = stage.run_unit(work_units(reader, 2)[0])
    for r in rows:
        runtime = json.loads(r["runtime"])        # where and how it was computed, in every row
        assert runtime["deterministic"] is True and runtime["torch"] == torch.__version__
        assert runtime["device"] == "cpu" and runtime["batch"] == 2
        after, before = json.loads(r["loss_after"]), json.loads(r["loss_before"])
        box = CANVAS_BOX[(r["height"], r["width"])]
        for label in ("cn", "yolo"):     # "square" is class 1 of both
            got = _loss_of_png(stage, label, tmp_path / "out" / r["output_path"], r, box, 1)
            if r["resized"]:                 # the scaled box is exact to float32 rounding only
                assert got == pytest.approx(after[label], rel=1e-6, abs=1e-9)
            else:
                assert got == after[label]   # the very image written, bit for bit
            src = tmp_path / "src" / r["source_id"].split("/", 1)[1]
            assert _loss_of_png(stage, label, src, r, box, 1) == pytest.approx(before[label], rel=1e-6, abs=1e-9)


def test_precision_is_recorded_in_rows_and_guards_a_resume(tmp_path, monkeypatch):
    """A precision setting reaches every row's runtime and the job parameters the resume guard
    compares (resolved: absent keys equal their defaults); another precision refuses to resume."""
    import maa_augment

    reader = BoxedFolder(_folder(tmp_path / "src", [(48, 56), (50, 50)]), name="f")
    precision = {"fold_bn": True, "channels_last": True}
    stage = MAAStage(str(tmp_path / "out"), {**_params(), "precision": precision}, CLASSES)
    rows = stage.run_unit(work_units(reader, 2)[0])
    assert [r["status"] for r in rows] == ["ok", "ok"]
    for r in rows:
        assert json.loads(r["runtime"])["precision"] == {"tf32": False, "autocast": None, "channels_last": True,
                                                         "fold_bn": True}

    class GuardPassed(Exception):
        pass

    def stop(*_a, **_k):
        raise GuardPassed
    monkeypatch.setattr(maa_augment, "start_ray", stop)
    cfg = {**_pipeline_cfg(tmp_path / "src", tmp_path / "job"), "precision": precision}
    with pytest.raises(GuardPassed):
        maa_augment.run(cfg)
    with pytest.raises(GuardPassed):   # the same setting spelled out in full
        maa_augment.run({**cfg, "precision": {**precision, "tf32": False, "autocast": "off"}})
    with pytest.raises(SystemExit, match="changed: .*'precision'"):
        maa_augment.run({**cfg, "precision": {**precision, "tf32": True}})


def test_per_detector_class_maps_and_label_checks(tmp_path):
    from icm.maa.stage import check_detectors

    reader = BoxedFolder(_folder(tmp_path / "src", [(48, 56)]), name="f")   # one "square" per image
    params = _params()
    params["detectors"] = [
        {"label": "cn", "name": "centernet_resnet18", "weights": "random:0"},
        {"label": "mapped", "name": "yolov8n", "weights": "random:1", "classes": ["box", "circle"],
         "class_map": {"square": "box"}},
        {"label": "unmapped", "name": "yolov8n", "weights": "random:2", "classes": ["box", "circle"]}]
    stage = MAAStage(str(tmp_path / "out"), params, CLASSES)
    (row,) = stage.run_unit(work_units(reader, 1)[0])
    assert row["status"] == "ok"
    dropped = [n for n in row["notes"] if "left out of its loss" in n]
    assert dropped == ["unmapped: 1 object(s) of classes outside its label space left out of its loss"]
    # "square" → "box", index 0 of the mapped detector's classes
    assert _loss_of_png(stage, "mapped", tmp_path / "src/img0.png", row, CANVAS_BOX[(48, 56)], 0) == pytest.approx(
        json.loads(row["loss_before"])["mapped"], rel=1e-6)

    no_gt = {**params, "detectors": params["detectors"][:1] + [
        {"label": "stranger", "name": "yolov8n", "weights": "random:3", "classes": ["car", "person"]}]}
    with pytest.raises(ValueError, match="stranger.*no ground truth"):
        check_detectors(no_gt, CLASSES)
    twice = {**params, "detectors": [params["detectors"][0], {**params["detectors"][0], "weights": "random:5"}]}
    with pytest.raises(ValueError, match="unique"):
        check_detectors(twice, CLASSES)


def test_meta_domain_groups_and_class_map_precedence(tmp_path):
    """Groups per method, and each detector's class map: the top-level map, then its domain's,
    then its own, the later winning key by key."""
    from icm.maa.stage import check_detectors, detector_groups

    top = {"circle": "ball", "square": "box"}
    cfg = {"method": "meta_domain", "class_map": top, "domains": [
        {"name": "photo", "class_map": {"square": "crate", "triangle": "wedge"},
         "detectors": [{"label": "a", "name": "yolov8n", "class_map": {"triangle": "tri"}},
                       {"label": "b", "name": "yolov8n"}]},
        {"name": "sketch", "detectors": [{"label": "c", "name": "yolov8n"}]}]}
    groups = detector_groups(cfg)
    assert [g["name"] for g in groups] == ["photo", "sketch"]
    assert [[d["label"] for d in g["detectors"]] for g in groups] == [["a", "b"], ["c"]]
    maps = {d["label"]: d["class_map"] for g in groups for d in g["detectors"]}
    assert maps == {"a": {"circle": "ball", "square": "crate", "triangle": "tri"},
                    "b": {"circle": "ball", "square": "crate", "triangle": "wedge"},
                    "c": {"circle": "ball", "square": "box"}}
    assert groups[0]["detectors"][0]["name"] == "yolov8n"          # the rest of the entry is kept
    # the precedence decides which detectors get ground truth at all
    only = {"a": ["tri"], "b": ["crate"], "c": ["box"]}
    ok = {**cfg, "domains": [{**d, "detectors": [{**s, "classes": only[s["label"]]} for s in d["detectors"]]}
                             for d in cfg["domains"]]}
    assert len(check_detectors(ok, CLASSES)) == 2
    wrong = {**ok, "domains": [{**ok["domains"][0], "detectors": [{**ok["domains"][0]["detectors"][1],
                                                                   "classes": ["box"]}]}, ok["domains"][1]]}
    with pytest.raises(ValueError, match="'b'.*no ground truth"):  # photo's square is a crate, not a box
        check_detectors(wrong, CLASSES)
    assert [g["name"] for g in detector_groups({**_params("meta_model"), "class_map": top})] == ["cn", "yolo"]
    (aafg,) = detector_groups({**_params("aafg"), "class_map": top})
    assert aafg["name"] == "aafg" and [d["class_map"] for d in aafg["detectors"]] == [top, top]
    assert detector_groups(_params("aafg"))[0]["detectors"][0]["class_map"] is None
    for bad, message in ((dict(cfg, domains=cfg["domains"][:1]), "at least 2 entries under 'domains'"),
                         (dict(cfg, domains=[cfg["domains"][0], {"name": "again", "detectors": [{"name": "yolov8n",
                                                                                                 "label": "a"}]}]),
                          r"unique.*\['a'\]"),
                         (dict(_params("meta_model"), detectors=_params()["detectors"][:1]), "meta_model needs"),
                         ({"method": "aafg", "detectors": []}, "aafg needs"),
                         ({"method": "pgd"}, "not one of")):
        with pytest.raises(ValueError, match=message):
            detector_groups(bad)

    # a meta_domain run: one leave-one-out round per domain, each detector's loss in its row
    reader = BoxedFolder(_folder(tmp_path / "src", [(48, 56)]), name="f")
    run = {**_params("meta_domain"), "domains": [
        {"name": "photo", "detectors": [{"label": "cn", "name": "centernet_resnet18", "weights": "random:0"}]},
        {"name": "sketch", "class_map": {"square": "box"},
         "detectors": [{"label": "y", "name": "yolov8n", "weights": "random:1", "classes": ["box"]}]}]}
    stage = MAAStage(str(tmp_path / "out"), run, CLASSES)
    assert [[lab for lab, _, _ in g] for g in stage.groups] == [["cn"], ["y"]]
    (row,) = stage.run_unit(work_units(reader, 1)[0])
    assert row["status"] == "ok" and not [n for n in row["notes"] if "left out" in n]
    assert [m["group"] for m in json.loads(row["models"])] == ["photo", "sketch"]
    before, after = json.loads(row["loss_before"]), json.loads(row["loss_after"])
    assert set(before) == set(after) == {"cn", "y"}


def test_deterministic_setting_and_auto_batch_on_cpu(tmp_path, monkeypatch):
    """On a CPU ``batch_size: auto`` times the heaviest step per image and keeps doubling only
    while that pays (≥ 10 % less time per image); it measures each size after a warm-up there."""
    import time

    import icm.maa.stage as maa_stage

    MAAStage(str(tmp_path / "a"), {**_params(), "deterministic": False}, CLASSES)
    assert not torch.are_deterministic_algorithms_enabled()
    MAAStage(str(tmp_path / "b"), _params(), CLASSES)          # default: deterministic
    assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark

    real = maa_stage.largest_batch(_params(), CLASSES)          # the real step, timed
    tried = {int(k): v for k, v in real["seconds_per_image"].items()}
    assert real["device"] == "cpu" and real["batch_size"] in tried and real["threads"] == torch.get_num_threads()
    assert all(tried[2 * b] <= 0.9 * tried[b] for b in tried if 2 * b <= real["batch_size"])
    assert 2 * real["batch_size"] not in tried or tried[2 * real["batch_size"]] > 0.9 * tried[real["batch_size"]]

    calls = []

    def step_costing(seconds_per_image):                         # a model of the step's cost per size
        def step(stage, size):
            calls.append(size)
            time.sleep(seconds_per_image[size] * size)
        return step
    monkeypatch.setattr(maa_stage, "_heaviest_step", step_costing({1: 0.4, 2: 0.2, 4: 0.19, 8: 0.01}))
    assert maa_stage.largest_batch(_params(), CLASSES)["batch_size"] == 2   # 4 gains 5 %, not 10: stop at 2
    assert calls == [1, 1, 2, 2, 4, 4]                                      # warm-up, then timed, per size
    monkeypatch.setattr(maa_stage, "_heaviest_step", step_costing({1: 0.05, 2: 0.06, 4: 0.001, 8: 0.001}))
    assert maa_stage.largest_batch(_params(), CLASSES)["batch_size"] == 1   # batching buys nothing: per image


def test_auto_batch_size_is_kept_for_a_resumed_job(tmp_path, monkeypatch):
    """On GPU an image's result depends on its batch neighbours, so a resumed job (perhaps on
    another GPU type, where the probe would pick another size) must cut its units the same way."""
    import maa_augment

    from icm.data.storage import Storage

    probes = iter([{"batch_size": 16, "device": "NVIDIA H100", "how": "memory probe"},
                   {"batch_size": 4, "device": "NVIDIA L4", "how": "memory probe"}])
    monkeypatch.setattr(maa_augment, "run_on_worker", lambda *a, **k: next(probes))
    storage = Storage(str(tmp_path / "out"))
    cfg = {"batch_size": "auto"}
    assert maa_augment.resolve_batch_size(cfg, _params(), CLASSES, storage) == 16
    assert maa_augment.resolve_batch_size(cfg, _params(), CLASSES, storage) == 16   # not the new probe's 4
    assert json.loads(storage.read_text(maa_augment.AUTO_BATCH_FILE))["device"] == "NVIDIA H100"   # how it was chosen
    assert maa_augment.resolve_batch_size({"batch_size": 2}, _params(), CLASSES, storage) == 2
