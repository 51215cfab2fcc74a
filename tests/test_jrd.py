"""OW-JRD: distortion ladders, the labelling rule, JRD and error tolerance, the label stage on a
case with a known answer, and the Ray pipeline with export, resume and bad input."""

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from icm.data import comparable
from icm.detectors.base import Detector
from icm.jrd.export import export_authors_layout, load_split, read_table
from icm.jrd.labelling import error_tolerant_jrd, is_monotonic, jrd, match_objects, not_recognised_labels
from icm.jrd.ladders import build_ladder
from icm.jrd.stage import LabelStage, LadderStage
from icm.metrics import psnr

CLASSES = ["circle", "square", "triangle", "cross"]


@pytest.fixture(scope="module")
def photo():
    return np.ascontiguousarray(skdata.astronaut()[::4, ::4][:127, :125])  # odd sides on purpose


@pytest.mark.parametrize("spec", [{"type": "jpeg"}, {"type": "webp", "levels": 32}])
def test_pillow_ladders_non_increasing_bytes(photo, spec):
    coded = build_ladder(spec).code_all(photo)
    sizes = [c.num_bytes for c in coded]
    assert len(sizes) == spec.get("levels", 64)
    assert all(a >= b for a, b in zip(sizes, sizes[1:])), sizes
    assert sizes[-1] * 8 < sizes[0]
    assert all(c.decoded.shape == photo.shape and c.decoded.dtype == np.uint8 for c in coded)


def test_hevc_ladder_round_trips_and_falls_in_bytes(photo):
    ladder = build_ladder({"type": "hevc"})
    assert [lv["qp"] for lv in ladder.levels] == list(range(52))
    coded = ladder.code_all(photo)
    sizes = np.array([c.num_bytes for c in coded])
    # x265 spends a few more bytes at QP 1-3 than at QP 0 (its rate control floor); elsewhere the
    # ladder is non-increasing
    assert np.all(np.diff(sizes) <= 0.01 * sizes[:-1]), sizes
    assert sizes[-1] * 5 < sizes[0]
    x = lambda im: torch.from_numpy(im).permute(2, 0, 1)[None].float() / 255  # noqa: E731
    assert all(c.decoded.shape == photo.shape for c in coded)
    assert psnr(x(coded[0].decoded), x(photo)) > 30      # QP 0 in 4:2:0: the chroma subsampling remains
    assert psnr(x(coded[-1].decoded), x(photo)) < psnr(x(coded[26].decoded), x(photo))


def test_learned_ladders_round_trip(photo):
    fixed = build_ladder({"type": "compressai", "arch": "bmshj2018-factorized", "qualities": [2, 1],
                          "weights": "random"})
    vbr = build_ladder({"type": "compressai-vbr", "arch": "bmshj2018-hyperprior-vbr", "levels": 4, "weights": "random"})
    assert [lv["quality"] for lv in fixed.levels] == [2, 1]
    scales = [lv["scale"] for lv in vbr.levels]
    assert len(scales) == 4 and all(a > b for a, b in zip(scales, scales[1:]))
    for ladder in (fixed, vbr):
        for c in ladder.code_all(photo):
            assert c.decoded.shape == photo.shape and c.num_bytes > 0


def test_vvc_ladder_names_the_missing_binaries(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(FileNotFoundError, match="vvencapp and vvdecapp"):
        build_ladder({"type": "vvc"})
    with pytest.raises(ValueError, match="ladder type 'vp9'"):
        build_ladder({"type": "vp9"})


def test_labelling_rule_edges():
    ref = [[0, 0, 10, 10]]
    # IoU of [0,0,10,10] with [0,0,10,20] is exactly 0.5; with [0,0,10,21] it is below
    m = match_objects(ref, [1], [[0, 0, 10, 20]], [0.5], [1])
    assert m.recognised[0] and m.best_iou[0] == pytest.approx(0.5) and m.score[0] == pytest.approx(0.5)
    assert not match_objects(ref, [1], [[0, 0, 10, 21]], [0.9], [1]).recognised[0]
    assert not match_objects(ref, [1], [[0, 0, 10, 10]], [0.49], [1]).recognised[0]      # score below s
    assert not match_objects(ref, [1], [[0, 0, 10, 10]], [0.99], [2]).recognised[0]      # wrong class
    assert not match_objects(ref, [1], np.zeros((0, 4)), [], []).recognised[0]           # no detections
    # the best *eligible* detection counts: a perfect box of another class does not
    m = match_objects(ref + [[20, 20, 30, 30]], [1, 2], [[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]],
                      [0.9, 0.8, 0.3], [2, 1, 2], iou_threshold=0.5, score_threshold=0.5)
    assert m.recognised.tolist() == [True, False]
    assert m.best_iou[0] == pytest.approx(0.81) and m.score[0] == pytest.approx(0.8)
    m = match_objects(ref, [1], [[0, 0, 10, 10]], [0.3], [1], score_threshold=0.25, iou_threshold=0.9)
    assert m.recognised[0]


def test_jrd_and_error_tolerance_64_levels():
    labels = not_recognised_labels([True] * 20 + [False] * 44)
    assert jrd(labels) == 19 and is_monotonic(labels) and error_tolerant_jrd(labels) == 19
    assert jrd([1] * 64) == -1 and error_tolerant_jrd([1] * 64) == 0
    assert error_tolerant_jrd([0] * 64) == 63
    p = np.array([0] * 40 + [1] * 24)
    p[10] = 1                      # one spurious miss early: the first window from the top that
    assert not is_monotonic(p)     # ends in 0 with ≤ 5 misses is s = 32 → JRD 39
    assert jrd(p) == 39 and error_tolerant_jrd(p) == 39
    q = np.array([0] * 40 + [1] * 24)
    q[45] = 0                      # a spurious hit at 45: window p[38:46] = 0 0 1 1 1 1 1 0 (sum 5)
    assert jrd(q) == 45 and error_tolerant_jrd(q) == 45
    q[44] = 0
    q[45] = 1
    q[46] = 0                      # hits at 44 and 46 → window p[39:47] sums 5 and ends in 0
    assert error_tolerant_jrd(q) == 46
    r = np.array([0] * 30 + [1] * 34)
    r[[50, 52]] = 0                # windows ending at 50/52 hold ≥ 6 misses → back to p[22:30] → 29
    assert error_tolerant_jrd(r) == 29
    assert error_tolerant_jrd([0, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1]) == 7   # L = 16


class OracleDetector(Detector):
    """Detects a fixed box, with a score that falls with the decoded image's error against the
    pristine image: the object is recognised while MSE ≤ ``tolerance``."""

    family = "oracle"

    def __init__(self, pristine, box, tolerance, canvas):
        super().__init__(CLASSES)
        from icm.maa.canvas import letterbox, to_tensor

        self.pristine = letterbox(to_tensor(pristine), canvas)[0]
        self.box, self.tolerance = torch.tensor([box], dtype=torch.float32), tolerance

    def predict(self, images, score_threshold=0.05):
        out = []
        for im in images:
            mse = float(((im - self.pristine) ** 2).mean()) * 255 ** 2
            score = torch.tensor([0.9 if mse <= self.tolerance else 0.1])
            keep = score >= score_threshold
            out.append({"boxes": self.box[keep], "scores": score[keep], "labels": torch.tensor([1])[keep]})
        return out


def test_label_stage_known_jrd(photo, tmp_path, monkeypatch):
    image = np.ascontiguousarray(photo[:96, :96])
    box = [10.0, 20.0, 60.0, 70.0]
    ladders = [{"type": "jpeg", "levels": 16}, {"type": "webp", "levels": 12}]
    params = {"ladders": ladders, "detector": {"name": "yolov8n", "weights": "random"}, "canvas": 96,
              "reference": "gt", "score_threshold": 0.5, "iou_threshold": 0.5, "detect_batch": 5}
    stage = LabelStage(str(tmp_path), params, CLASSES, [11, 12, 13, 14])
    tolerance = 150.0   # JPEG levels 0-5 and WebP levels 0-8 stay within it
    stage.det = OracleDetector(image, box, tolerance, 96)
    record = {"source_id": "t/img", "image_id": "img", "image": image, "boxes": np.array([box]),
              "class_ids": np.array([1]), "class_names": ["square"], "width": 96, "height": 96, "notes": [],
              "status": "ok"}
    entry = LadderStage(ladders).code_record(record)
    levels, objects, notes = stage.label_image(record, entry["coded"])
    assert notes == [] and len(objects) == 2 and len(levels) == 16 + 12
    for obj in objects:
        mses = [float(((c[1].astype(float) - image) ** 2).mean()) for c in entry["coded"][obj["ladder"]]]
        expected = max(i for i, m in enumerate(mses) if m <= tolerance)
        assert obj["jrd"] == expected, (obj["ladder"], mses)
        assert obj["category_id"] == 12 and obj["CategoryId"] == 1 and obj["class_name"] == "square"
        assert obj["recognised_pristine"] and obj["area"] == 2500
    rows = [r for r in levels if r["ladder"] == "jpeg"]
    assert [r["level"] for r in rows] == list(range(16))
    assert all(r["label"] == int(not r["recognised"]) for r in rows)
    assert json.loads(rows[3]["codec_params"]) == {"type": "jpeg", "quality": 80}
    crop = np.asarray(Image.open(__import__("io").BytesIO(rows[0]["crop_png"])))
    assert crop.shape == (50, 50, 3)


def _list_dataset(root, shapes_root, n=5):
    """A list-txt dataset of shapes images plus a missing and a corrupt file."""
    src = root / "src"
    src.mkdir(parents=True)
    ann = json.loads((shapes_root / "photo" / "annotations" / "instances_val.json").read_text())
    cats = {c["id"]: i for i, c in enumerate(ann["categories"])}
    lines = []
    for img in sorted(ann["images"], key=lambda i: i["file_name"])[:n]:
        name = img["file_name"].rsplit("/", 1)[-1]
        shutil.copy(shapes_root / "photo" / img["file_name"], src / name)
        boxes = [a for a in ann["annotations"] if a["image_id"] == img["id"]]
        objs = " ".join(f"{b['bbox'][0]:.1f},{b['bbox'][1]:.1f},{b['bbox'][0] + b['bbox'][2]:.1f},"
                        f"{b['bbox'][1] + b['bbox'][3]:.1f},{cats[b['category_id']]}" for b in boxes)
        lines.append(f"{name} {objs}")
    (src / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    lines += ["zz_broken.png 1,1,20,20,0", "missing.png 1,1,20,20,0"]
    (src / "list.txt").write_text("\n".join(lines) + "\n")
    return src / "list.txt"


def _jrd_cfg(list_file, out):
    return {"dataset": {"type": "listtxt", "list_file": str(list_file), "name": "shp", "classes": CLASSES},
            "out_dir": str(out), "ladders": [{"type": "jpeg", "levels": 8}, {"type": "hevc", "levels": 8}],
            "detector": {"label": "y", "name": "yolov8n", "weights": "random:3"}, "reference": "gt",
            "iou_threshold": 0.5, "score_threshold": 0.0, "canvas": 128, "detect_batch": 8, "batch_size": 2,
            "seed": 0, "device": "cpu", "coders": {"actors": 1, "num_cpus": 0.5},
            "workers": {"actors": 1, "num_cpus": 0.5},
            "export": {"fractions": {"train": 0.6, "val": 0.2, "test": 0.2}, "include_unrecognised": True}}


@pytest.mark.slow
def test_jrd_pipeline_export_resume_bad_input(ray_cluster, small_shapes, tmp_path):
    import jrd_dataset

    list_file = _list_dataset(tmp_path, small_shapes)
    full = tmp_path / "full"
    summary = jrd_dataset.run(_jrd_cfg(list_file, full))
    assert summary["images"] == {"done": 5, "failed": 2, "skipped": 0, "not_run": 0}
    manifest = pq.read_table(full / "manifest.parquet").to_pylist()
    errors = {r["source_id"]: r["error"] for r in manifest if r["status"] == "error"}
    assert "cannot decode" in errors["shp/zz_broken.png"] and "not found" in errors["shp/missing.png"]
    objects = read_table(full, "objects")
    levels = read_table(full, "levels")
    n_obj = sum(r["objects"] for r in manifest)
    assert n_obj > 0 and objects.num_rows == 2 * n_obj and levels.num_rows == 2 * 8 * n_obj
    assert (full / "jrd.png").is_file()
    for ladder in ("jpeg", "hevc"):
        rows = [r for r in levels.to_pylist() if r["ladder"] == ladder and r["object_index"] == 0]
        first = [r["bytes"] for r in rows if r["source_id"] == rows[0]["source_id"]]
        assert len(first) == 8 and first[0] > first[-1]

    export = full / "export" / "jpeg"
    splits = {s: load_split(export, s) for s in ("train", "val", "test")}
    assert sum(len(v) for v in splits.values()) == 8 * n_obj
    by_split = {s: {e["name"] for e in v} for s, v in splits.items()}
    assert not (by_split["train"] & by_split["test"]) and not (by_split["train"] & by_split["val"])
    sample = splits["train"][0]
    assert Image.open(sample["original"]).size == Image.open(sample["distorted"]).size
    infos = json.loads((export / "objects_infos.json").read_text())
    assert set(infos) == set(json.loads((export / "JRD_info.json").read_text()))
    assert all(0 <= v["CategoryId"] < 4 for v in infos.values())

    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    unit = sorted((resumed / "manifest").glob("unit-*.parquet"))[1].name
    lost = pq.read_table(resumed / "manifest" / unit).num_rows
    for kind in ("manifest", "levels", "objects"):
        (resumed / kind / unit).unlink()
    again = jrd_dataset.run(_jrd_cfg(list_file, resumed))
    assert again["images"]["skipped"] == 7 - lost and again["images"]["done"] + again["images"]["failed"] == lost
    assert comparable(full / "manifest.parquet").equals(comparable(resumed / "manifest.parquet"))
    assert read_table(full, "levels").equals(read_table(resumed, "levels"))
    assert read_table(full, "objects").equals(read_table(resumed, "objects"))
    other = export_authors_layout(resumed, "hevc", tmp_path / "again", fractions={"train": 1}, seed=1,
                                  include_unrecognised=True)
    assert other["crops"] == {"train": 8 * n_obj, "val": 0, "test": 0}
