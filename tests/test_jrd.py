"""OW-JRD: distortion ladders, the labelling rule, JRD and error tolerance, the label stage on a
case with a known answer, and the Ray pipeline with export, resume and bad input."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from icm.data import comparable
from icm.detectors.base import Detector
from icm.jrd.export import export_authors_layout, load_split, read_table
from icm.jrd.labelling import (error_tolerant_jrd, first_unrecognised, is_monotonic, jrd, match_objects,
                               not_recognised_labels)
from icm.jrd.ladders import build_ladder
from icm.jrd.stage import LEVEL_SCHEMA, OBJECT_SCHEMA, LabelStage, LadderStage, label_categories
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


class _Bits:
    """An H.265 RBSP bit reader (emulation-prevention bytes removed)."""

    def __init__(self, payload: bytes):
        self.data = payload.replace(b"\x00\x00\x03", b"\x00\x00")
        self.pos = 0

    def u(self, n):
        value = 0
        for _ in range(n):
            value = (value << 1) | ((self.data[self.pos // 8] >> (7 - self.pos % 8)) & 1)
            self.pos += 1
        return value

    def ue(self):
        zeros = 0
        while self.u(1) == 0:
            zeros += 1
        return (1 << zeros) - 1 + self.u(zeros)

    def se(self):
        k = self.ue()
        return (k + 1) // 2 if k % 2 else -(k // 2)


def _hevc_nals(stream: bytes) -> list[tuple[int, bytes]]:
    """(nal_unit_type, payload after the 2-byte header) of every NAL unit of an Annex-B stream."""
    starts = [i for i in range(len(stream) - 3) if stream[i:i + 3] == b"\x00\x00\x01"]
    nals = []
    for k, i in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else len(stream)
        nal = stream[i + 3:end].rstrip(b"\x00")
        nals.append(((nal[0] >> 1) & 0x3F, nal[2:]))
    return nals


def _hevc_slice_qp_and_chroma(stream: bytes) -> tuple[int, int]:
    """SliceQpY of the first slice of a one-picture HEVC stream (H.265 §7.3.2.2, §7.3.2.3, §7.3.6)."""
    nals = dict(_hevc_nals(stream)[::-1])          # first NAL of each type wins
    sps = _Bits(nals[33])
    sps.u(4)
    max_sub_layers = sps.u(3)
    sps.u(1)
    assert max_sub_layers == 0
    sps.u(96)                                      # general profile_tier_level
    sps.ue()
    chroma = sps.ue()
    separate_planes = sps.u(1) if chroma == 3 else 0
    sps.ue(), sps.ue()
    if sps.u(1):
        [sps.ue() for _ in range(4)]
    sps.ue(), sps.ue(), sps.ue()
    sps.u(1)
    sps.ue(), sps.ue(), sps.ue()
    [sps.ue() for _ in range(6)]
    assert sps.u(1) == 0                           # no scaling lists
    sps.u(1)
    sao = sps.u(1)
    pps = _Bits(nals[34])
    pps.ue(), pps.ue(), pps.u(1)
    output_flag, extra_bits = pps.u(1), pps.u(3)
    pps.u(1), pps.u(1), pps.ue(), pps.ue()
    init_qp = 26 + pps.se()
    idr = next(t for t in nals if t in (19, 20))
    sl = _Bits(nals[idr])
    assert sl.u(1) == 1                            # first slice segment
    sl.u(1)
    sl.ue()
    sl.u(extra_bits)
    assert sl.ue() == 2                            # I slice
    if output_flag:
        sl.u(1)
    if separate_planes:
        sl.u(2)
    if sao:
        sl.u(1)
        if chroma and not separate_planes:
            sl.u(1)
    return init_qp + sl.se(), chroma


@pytest.mark.parametrize("chroma", ["420", "444"])
def test_hevc_bytes_are_the_picture_and_the_slice_qp_is_the_level(photo, chroma):
    ladder = build_ladder({"type": "hevc", "qps": [0, 1, 2, 3, 22, 51], "chroma": chroma})
    decoded = []
    for level, params in enumerate(ladder.levels):
        stream = ladder.bitstream(photo, level)
        assert params == {"qp": params["qp"], "chroma": chroma}
        types = [t for t, _ in _hevc_nals(stream)]
        assert 39 not in types and 40 not in types, types       # no SEI (x265's info SEI is ~2.3 KB)
        assert _hevc_slice_qp_and_chroma(stream) == (params["qp"], 1 if chroma == "420" else 3)
        coded = ladder.code(photo, level)
        assert coded.num_bytes == len(stream)
        decoded.append(coded.decoded)
    # QP 0..3 are four different pictures now (with x265's I-slice offset they decoded identically)
    assert all(not np.array_equal(decoded[i], decoded[i + 1]) for i in range(3))


def _fake_vvc(bin_dir, rec_bytes):
    """vvencapp/vvdecapp stand-ins: the encoder logs its arguments, the decoder writes ``rec_bytes``."""
    bin_dir.mkdir()
    (bin_dir / "vvencapp").write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/args"\n'
                                      'while [ "$1" != "-o" ]; do shift; done; printf bits > "$2"\n')
    (bin_dir / "vvdecapp").write_text('#!/bin/sh\nwhile [ "$1" != "-o" ]; do shift; done\n'
                                      f'head -c {rec_bytes} /dev/zero > "$2"\n')
    for b in ("vvencapp", "vvdecapp"):
        (bin_dir / b).chmod(0o755)


def test_vvc_fixed_qp_without_adaptation_and_reconstruction_size_checked(tmp_path, monkeypatch):
    image = np.zeros((6, 10, 3), np.uint8)
    _fake_vvc(tmp_path / "ok", 6 * 10 * 3 // 2)
    monkeypatch.setenv("PATH", f"{tmp_path / 'ok'}:/usr/bin:/bin")
    coded = build_ladder({"type": "vvc", "qps": [37]}).code(image, 0)
    args = (tmp_path / "ok" / "args").read_text().split()
    assert args[args.index("-q") + 1] == "37" and args[args.index("--qpa") + 1] == "0"
    assert args[args.index("--additional") + 1] == "IntraQPOffset=0"
    assert coded.num_bytes == 4 and coded.decoded.shape == image.shape
    _fake_vvc(tmp_path / "short", 50)
    monkeypatch.setenv("PATH", f"{tmp_path / 'short'}:/usr/bin:/bin")
    with pytest.raises(RuntimeError, match="50 bytes of reconstruction"):
        build_ladder({"type": "vvc", "qps": [37]}).code(image, 0)


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
    # one to one, as COCO matches: one detection over two overlapping objects recognises one of them
    two = [[0, 0, 10, 10], [0, 0, 10, 12]]
    m = match_objects(two, [1, 1], [[0, 0, 10, 11]], [0.9], [1])
    assert m.recognised.tolist() == [False, True]            # the better overlap (IoU 11/12) claims it
    # a second, weaker detection then recognises the other object; higher scores claim first
    m = match_objects(two, [1, 1], [[0, 0, 10, 11], [0, 0, 10, 10]], [0.6, 0.9], [1, 1])
    assert m.recognised.tolist() == [True, True] and m.score.tolist() == pytest.approx([0.9, 0.6])


def test_both_jrd_conventions():
    mono = not_recognised_labels([True] * 20 + [False] * 44)
    assert jrd(mono) == 19 and first_unrecognised(mono) == 20
    bumpy = np.array([0] * 10 + [1] + [0] * 9 + [1] * 44)
    assert jrd(bumpy) == 19 and first_unrecognised(bumpy) == 10
    assert first_unrecognised([0] * 64) == 64 and jrd([1] * 64) == -1 and first_unrecognised([1] * 64) == 0


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


def _page_shows_the_record(out_dir):
    """The job's results page (python -m icm.report OUT_DIR) against its summary.json."""
    from page_checks import check_page

    from icm.report import write_report

    record = json.loads((out_dir / "summary.json").read_text())
    shown = check_page(write_report([str(out_dir)]))[str((out_dir / "summary.json").resolve())]
    for ladder in record["per_ladder"]:
        assert {f"/per_ladder/{ladder}/{k}" for k in ("objects", "recognised_pristine", "mean_jrd")} <= shown


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
    _page_shows_the_record(full)

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


def _synthetic_run(run_dir, image_ids, levels=4, recognised_pristine=lambda i, k: True, shards=2):
    """A JRD run's shards written directly: two objects per image, ``levels`` JPEG levels."""
    from icm.data.storage import Storage
    from icm.data.writers import png_bytes

    store = Storage(run_dir)
    crop = png_bytes(np.zeros((4, 4, 3), np.uint8))
    per_shard = [image_ids[s::shards] for s in range(shards)]
    for s, ids in enumerate(per_shard):
        objects, level_rows = [], []
        for image_id in ids:
            for k in range(2):
                key = {"source_id": f"coco/{image_id}", "image_id": image_id, "object_index": k, "category_id": 3,
                       "CategoryId": 2, "class_name": "car", "box": [0.0, 0.0, 4.0, 4.0], "area": 16.0,
                       "ladder": "jpeg"}
                labels = [0] * (k + 2) + [1] * (levels - k - 2)
                objects.append({**key, "reference": "gt", "levels": levels,
                                "recognised_pristine": recognised_pristine(image_id, k), "jrd": jrd(labels),
                                "first_unrecognised": first_unrecognised(labels), "jrd_tolerant": jrd(labels),
                                "monotonic": True, "original_png": crop})
                level_rows += [{**key, "level": lv, "codec_params": "{}", "bytes": 100 - lv, "bpp": 1.0,
                                "recognised": not lab, "label": lab, "best_iou": 0.9, "score": 0.9, "crop_png": crop}
                               for lv, lab in enumerate(labels)]
        store.write_table(f"objects/unit-{s}.parquet", pa.Table.from_pylist(objects, schema=OBJECT_SCHEMA))
        store.write_table(f"levels/unit-{s}.parquet", pa.Table.from_pylist(level_rows, schema=LEVEL_SCHEMA))


def test_export_names_sort_both_ways_and_keeps_objects_recognised_in_the_pristine_image(tmp_path):
    import re

    ids = ["139", "1000", "285", "2"]
    _synthetic_run(tmp_path / "run", ids, recognised_pristine=lambda i, k: not (i == "285" and k == 1))
    info = export_authors_layout(tmp_path / "run", "jpeg", tmp_path / "export", fractions={"train": 1})
    assert info["objects"] == 7 and info["objects_left_out_unrecognised_pristine"] == 1
    assert "64" in info["note"]                      # 4 levels: the authors' predictor assumes 64
    infos = json.loads((tmp_path / "export/objects_infos.json").read_text())
    names = list(infos)
    natural = sorted(names, key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)])
    assert sorted(names) == natural
    assert [infos[n]["image_id"] for n in sorted(names)][::2] == ["2", "139", "285", "1000"]
    first = infos[sorted(names)[1]]                  # object 1 of image 2: labels 0 0 0 1
    assert first["jrd"] == 2 and first["first_unrecognised"] == 3
    train = json.loads((tmp_path / "export/train.json").read_text())
    assert len(train["paths"]) == 7 * 4 and train["paths"] == sorted(train["paths"])
    assert all((tmp_path / "export" / p).is_file() for p in train["paths"])
    assert not any("285" in n and n.endswith("_0001") for n in train["names"])


def test_reference_detector_on_a_dataset_without_classes(tmp_path):
    from icm.data.readers import FolderReader

    (tmp_path / "imgs").mkdir()
    reader = FolderReader(tmp_path / "imgs", name="f")
    with pytest.raises(ValueError, match="no class list.*reference: detector"):
        label_categories({"detector": {"name": "yolov8n"}, "reference": "gt"}, reader)
    with pytest.raises(ValueError, match="detector.classes"):
        label_categories({"detector": {"name": "yolov8n"}, "reference": "detector"}, reader)
    classes, ids = label_categories({"detector": {"name": "yolov8n", "classes": CLASSES}, "reference": "detector"},
                                    reader)
    assert classes == CLASSES and ids == [0, 1, 2, 3]


def test_label_stage_with_detector_reference_labels_its_own_detections(photo, tmp_path):
    image = np.ascontiguousarray(photo[:96, :96])
    box = [10.0, 20.0, 60.0, 70.0]
    ladders = [{"type": "jpeg", "levels": 8}]
    params = {"ladders": ladders, "detector": {"name": "yolov8n", "weights": "random", "classes": CLASSES},
              "canvas": 96, "reference": "detector", "score_threshold": 0.5, "iou_threshold": 0.5}
    stage = LabelStage(str(tmp_path), params, CLASSES, list(range(4)))
    stage.det = OracleDetector(image, box, 150.0, 96)
    record = {"source_id": "f/img", "image_id": "img", "image": image, "boxes": np.zeros((0, 4)),
              "class_ids": np.zeros(0, int), "class_names": [], "width": 96, "height": 96, "notes": [],
              "status": "ok"}
    levels, objects, _ = stage.label_image(record, LadderStage(ladders).code_record(record)["coded"])
    assert len(objects) == 1 and objects[0]["class_name"] == "square" and objects[0]["box"] == box
    assert objects[0]["recognised_pristine"] and len(levels) == 8
