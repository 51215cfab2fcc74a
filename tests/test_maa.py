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
from icm.maa.canvas import to_tensor
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


def test_paste_back_keeps_bound_when_downscaled():
    original = to_tensor(np.random.default_rng(3).integers(0, 256, (90, 150, 3), dtype=np.uint8))
    canvas, mask, placement = letterbox(original, 64)
    assert placement.resized and (placement.placed_h, placement.placed_w) == (38, 64)
    adv = LinfBound(EPS).project(canvas + EPS * torch.sign(torch.randn_like(canvas)) * mask, canvas)
    out = paste_back(original, adv, canvas, placement)
    assert out.shape == original.shape
    assert (out - original).abs().max() <= EPS + 1e-6


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


def _loss_of_png(stage, label, path, row, box):
    """A detector's loss on a written PNG, letterboxed again, with the row's seed."""
    from icm.detectors.base import map_targets
    from icm.maa.canvas import boxes_to_canvas

    det, class_map = next((d, m) for g in stage.groups for lab, d, m in g if lab == label)
    canvas, _, p = letterbox(to_tensor(np.asarray(Image.open(path))), stage.canvas)
    target = map_targets(boxes_to_canvas(np.asarray([box]), p), [CLASSES[1]], det.classes, class_map)
    return per_image_losses(Member(label, det, [target], [row["seed"]]), canvas[None])[0]


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
        after = json.loads(r["loss_after"])
        for label in ("cn", "yolo"):
            got = _loss_of_png(stage, label, tmp_path / "out" / r["output_path"], r, [12.0, 10.0, 40.0, 36.0])
            assert got == after[label]           # the very image written, bit for bit
            src = tmp_path / "src" / r["source_id"].split("/", 1)[1]
            assert _loss_of_png(stage, label, src, r, [12.0, 10.0, 40.0, 36.0]) == pytest.approx(
                json.loads(r["loss_before"])[label], rel=1e-6, abs=1e-9)


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
    assert _loss_of_png(stage, "mapped", tmp_path / "src/img0.png", row, [12.0, 10.0, 40.0, 36.0]) == pytest.approx(
        json.loads(row["loss_before"])["mapped"], rel=1e-6)

    no_gt = {**params, "detectors": params["detectors"][:1] + [
        {"label": "stranger", "name": "yolov8n", "weights": "random:3", "classes": ["car", "person"]}]}
    with pytest.raises(ValueError, match="stranger.*no ground truth"):
        check_detectors(no_gt, CLASSES)
    twice = {**params, "detectors": [params["detectors"][0], {**params["detectors"][0], "weights": "random:5"}]}
    with pytest.raises(ValueError, match="unique"):
        check_detectors(twice, CLASSES)


def test_deterministic_setting_and_auto_batch_on_cpu(tmp_path):
    from icm.maa.stage import largest_batch

    MAAStage(str(tmp_path / "a"), {**_params(), "deterministic": False}, CLASSES)
    assert not torch.are_deterministic_algorithms_enabled()
    MAAStage(str(tmp_path / "b"), _params(), CLASSES)          # default: deterministic
    assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
    assert largest_batch(_params(), CLASSES) == 8               # memory is not the limit on a CPU


def test_auto_batch_size_is_kept_for_a_resumed_job(tmp_path, monkeypatch):
    """On GPU an image's result depends on its batch neighbours, so a resumed job (perhaps on
    another GPU type, where the probe would pick another size) must cut its units the same way."""
    import maa_augment

    from icm.data.storage import Storage

    probes = iter([16, 4])
    monkeypatch.setattr(maa_augment, "run_on_worker", lambda *a, **k: next(probes))
    storage = Storage(str(tmp_path / "out"))
    cfg = {"batch_size": "auto"}
    assert maa_augment.resolve_batch_size(cfg, _params(), CLASSES, storage) == 16
    assert maa_augment.resolve_batch_size(cfg, _params(), CLASSES, storage) == 16   # not the new probe's 4
    assert maa_augment.resolve_batch_size({"batch_size": 2}, _params(), CLASSES, storage) == 2
