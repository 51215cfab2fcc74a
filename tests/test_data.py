"""Readers, records, bad input, paths, manifest contract, writers, sample data."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from icm.data import (CocoReader, FolderReader, ListTxtReader, ManifestReader, PathEscapesRoot, VocReader,
                      comparable, load_record, manifest_row, resolve_under, write_png)
from icm.data.manifest import CONTRACT, VOLATILE, ManifestStore
from icm.data.samples import DOMAINS, SHAPE_CLASSES, shapes, shapes_reader


def _rgb(h=40, w=50, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_resolve_under_refuses_escapes(tmp_path):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    assert resolve_under(root, "a/x.png") == (root / "a" / "x.png").resolve()
    for bad in ("../x.png", "a/../../x.png", "/etc/passwd"):
        with pytest.raises(PathEscapesRoot):
            resolve_under(root, bad)
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(PathEscapesRoot):
        resolve_under(root, "link/outside.png")


def test_coco_reader_matches_annotations(small_shapes):
    reader = shapes_reader("photo", "val", root=small_shapes.parent, n_train=24, n_val=12, seed=7)
    ann = json.loads((small_shapes / "photo/annotations/instances_val.json").read_text())
    records = list(reader.records())
    assert reader.classes == SHAPE_CLASSES and len(records) == len(ann["images"]) == 12
    assert sum(len(r["boxes"]) for r in records) == len(ann["annotations"])
    rec = records[0]
    first = next(a for a in ann["annotations"] if a["image_id"] == int(rec["image_id"]))
    x, y, w, h = first["bbox"]
    np.testing.assert_allclose(rec["boxes"][0], [x, y, x + w, y + h], atol=1e-4)
    assert rec["class_names"][0] == SHAPE_CLASSES[first["category_id"] - 1]
    assert rec["image"].dtype == np.uint8 and rec["image"].shape == (rec["height"], rec["width"], 3)
    assert rec["source_id"] == f"shapes-photo-val/{rec['image_id']}"


def test_coco_unknown_category_dropped_and_noted(tmp_path):
    write_png(tmp_path / "a.png", _rgb())
    (tmp_path / "ann.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": 50, "height": 40}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10], "iscrowd": 0},
                        {"id": 2, "image_id": 1, "category_id": 99, "bbox": [1, 1, 10, 10], "iscrowd": 0}],
        "categories": [{"id": 1, "name": "thing"}]}))
    rec = next(CocoReader(tmp_path / "ann.json", tmp_path).records())
    assert rec["status"] == "ok" and len(rec["boxes"]) == 1
    assert any("unknown category" in n for n in rec["notes"])


def test_voc_reader(tmp_path):
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "ImageSets/Main").mkdir(parents=True)
    Image.fromarray(_rgb(60, 80)).save(tmp_path / "JPEGImages/000001.jpg", quality=95)
    (tmp_path / "Annotations/000001.xml").write_text(
        "<annotation><filename>000001.jpg</filename>"
        "<object><name>dog</name><difficult>0</difficult><bndbox><xmin>11</xmin><ymin>21</ymin>"
        "<xmax>40</xmax><ymax>50</ymax></bndbox></object>"
        "<object><name>unicorn</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax>"
        "</bndbox></object></annotation>")
    (tmp_path / "ImageSets/Main/trainval.txt").write_text("000001\n000002\n")
    records = list(VocReader(tmp_path).records())
    ok, missing = records
    assert ok["status"] == "ok" and ok["class_names"] == ["dog"] and ok["class_ids"].tolist() == [11]
    np.testing.assert_allclose(ok["boxes"][0], [10, 20, 40, 50])
    assert any("not in the class list" in n for n in ok["notes"])
    assert missing["status"] == "error" and "VOC annotation" in missing["error"]


def test_listtxt_reader_and_escape(tmp_path):
    write_png(tmp_path / "imgs/a.png", _rgb())
    (tmp_path / "list.txt").write_text(
        "imgs/a.png 1,2,30,35,0 5,5,9,9,7 junk\n../outside.png 1,1,5,5,0\nimgs/missing.png\n")
    records = {r["image_id"]: r for r in ListTxtReader(tmp_path / "list.txt", classes=["cat", "dog"]).records()}
    a = records["imgs/a.png"]
    assert a["status"] == "ok" and a["class_names"] == ["cat"]
    assert any("unknown class id 7" in n for n in a["notes"]) and any("junk" in n for n in a["notes"])
    assert records["../outside.png"]["status"] == "error" and "escapes" in records["../outside.png"]["error"]
    assert records["imgs/missing.png"]["status"] == "error" and "not found" in records["imgs/missing.png"]["error"]


def test_bad_images_repaired_or_errored(tmp_path):
    rgb = _rgb()
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(tmp_path / "deep.png")
    write_png(tmp_path / "good.png", rgb)
    data = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "corrupt.png").write_bytes(b"not an image at all")
    write_png(tmp_path / "tiny.png", _rgb(4, 4))
    recs = {r["image_id"]: r for r in FolderReader(tmp_path).records(min_side=8)}
    assert recs["gray.png"]["status"] == "ok" and np.array_equal(recs["gray.png"]["image"][..., 2], rgb[..., 0])
    assert recs["rgba.png"]["status"] == "ok" and np.array_equal(recs["rgba.png"]["image"], rgb)
    assert any("alpha" in n for n in recs["rgba.png"]["notes"])
    deep = recs["deep.png"]
    assert deep["status"] == "ok" and deep["image"].dtype == np.uint8
    assert np.abs(deep["image"][..., 0].astype(int) - rgb[..., 0]).max() <= 1
    assert any("16-bit" in n for n in deep["notes"])
    for bad in ("truncated.png", "corrupt.png"):
        assert recs[bad]["status"] == "error" and "cannot decode" in recs[bad]["error"]
    assert recs["tiny.png"]["status"] == "error" and "smaller than the minimum" in recs["tiny.png"]["error"]


def test_boxes_clipped_and_degenerate_dropped(tmp_path):
    write_png(tmp_path / "a.png", _rgb(40, 50))
    ref = {"source_id": "t/a", "dataset": "t", "image_id": "a", "root": str(tmp_path), "path": "a.png",
           "boxes": [[-5, -5, 20, 20], [10, 10, 10, 30], [45, 30, 80, 90], [60, 60, 70, 70]],
           "class_ids": [0, 1, 2, 3], "class_names": ["a", "b", "c", "d"]}
    rec = load_record(ref)
    np.testing.assert_allclose(rec["boxes"], [[0, 0, 20, 20], [45, 30, 50, 40]])
    assert rec["class_names"] == ["a", "c"] and rec["class_ids"].tolist() == [0, 2]
    assert any("clipped" in n for n in rec["notes"]) and any("degenerate" in n for n in rec["notes"])


def test_png_writer_lossless_and_deterministic(tmp_path):
    img = _rgb(33, 47, seed=3)
    write_png(tmp_path / "a.png", img)
    write_png(tmp_path / "b.png", img)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), img)


def test_manifest_contract_and_comparison(tmp_path):
    store = ManifestStore(tmp_path)
    common = dict(source_path="/x", params={"b": 1, "a": 2}, models=[{"name": "m"}], seed=3)
    store.write_unit("unit-1", [manifest_row(source_id="d/2", status="ok", output_path="o2.png",
                                             started_at=1.0, duration_s=2.0, node_id="n1", **common)])
    store.write_unit("unit-0", [manifest_row(source_id="d/1", status="error", error="bad",
                                             started_at=5.0, duration_s=1.0, node_id="n2", **common)])
    assert store.done_units() == {"unit-0", "unit-1"} and store.done_source_ids() == {"d/1", "d/2"}
    table = pq.read_table(store.consolidate())
    assert table.schema.names[: len(CONTRACT)] == CONTRACT.names
    assert table.column("source_id").to_pylist() == ["d/1", "d/2"]
    assert table.column("params").to_pylist()[0] == '{"a":2,"b":1}'
    other = table.set_column(table.schema.get_field_index("node_id"), "node_id",
                             [["elsewhere", "elsewhere"]])
    assert comparable(table).equals(comparable(other))
    assert not set(VOLATILE) & set(comparable(table).columns)
    assert list(comparable(table).columns) == [c for c in CONTRACT.names if c not in VOLATILE]
    # a difference in any column that is not volatile is a difference
    for column, value in (("status", "error"), ("error", "other"), ("output_path", "o9.png"), ("params", "{}"),
                          ("models", "[]"), ("source_path", "/y"), ("seed", 4)):
        i = table.schema.get_field_index(column)
        changed = table.set_column(i, column, pa.array([table.column(column)[0].as_py(), value],
                                                       table.schema.field(column).type))
        assert not comparable(table).equals(comparable(changed)), column
    reordered = pa.concat_tables([table.slice(1), table.slice(0, 1)])
    assert comparable(reordered).equals(comparable(table))             # rows compared by source_id
    assert comparable(table).equals(comparable(store.storage.display("manifest.parquet")))
    with pytest.raises(ValueError, match="status"):
        manifest_row(source_id="x", source_path="", status="done", params={}, models=[], seed=0,
                     started_at=0, duration_s=0)
    # only the job's current images are consolidated; nothing to consolidate is an error
    store.consolidate("some.parquet", source_ids={"d/2", "d/9"})
    assert pq.read_table(tmp_path / "some.parquet").column("source_id").to_pylist() == ["d/2"]
    store.consolidate("none.parquet", source_ids=set())
    assert pq.read_table(tmp_path / "none.parquet").num_rows == 0
    with pytest.raises(FileNotFoundError, match=f"no manifest shards under {tmp_path / 'empty' / 'manifest'}"):
        ManifestStore(tmp_path / "empty").consolidate()
    (tmp_path / "manifest" / "unit-9.parquet.tmp").write_bytes(b"half")      # an interrupted write
    assert store.done_units() == {"unit-0", "unit-1"}
    assert table.column("models").to_pylist()[0] == '[{"name":"m"}]'


def test_manifest_store_keeps_job_columns_and_joins_shards_of_other_schemas(tmp_path):
    extra = pa.schema([("width", pa.int64())])
    store = ManifestStore(tmp_path, extra)
    common = dict(source_path="", status="ok", params={}, models=[], seed=0, started_at=0, duration_s=0)
    store.write_unit("unit-a", [manifest_row(source_id="d/1", width=7, **common)])
    assert pq.read_table(tmp_path / "manifest" / "unit-a.parquet").column("width").to_pylist() == [7]
    ManifestStore(tmp_path).write_unit("unit-b", [manifest_row(source_id="d/2", **common)])   # an older job's shard
    table = pq.read_table(store.consolidate())
    assert table.column("source_id").to_pylist() == ["d/1", "d/2"] and table.column("width").to_pylist() == [7, None]


def test_manifest_rows_and_tables():
    from icm.data.manifest import current_node_id, model_provenance, to_table

    assert model_provenance("m", "fam", "random:1", "random:1") == {"name": "m", "family": "fam",
                                                                   "weights": "random:1", "sha256": "random:1"}
    row = manifest_row(source_id="d/1", source_path="/s", status="skipped", params='{"kept": "as is"}',
                       models='[]', seed=np.int64(7), started_at=1, duration_s=2, runtime={"b": 1, "a": 2},
                       extra_col=5)
    assert row["params"] == '{"kept": "as is"}' and row["models"] == "[]" and row["runtime"] == '{"a":2,"b":1}'
    assert row["node_id"] == current_node_id() and row["extra_col"] == 5 and row["output_path"] == ""
    assert row["error"] == ""
    plain = manifest_row(source_id="d/1", source_path="", status="ok", params={}, models=[{"b": 1}], seed=0,
                         started_at=0, duration_s=0, runtime='{"as": "given"}')
    assert plain["models"] == '[{"b":1}]' and plain["runtime"] == '{"as": "given"}'
    assert manifest_row(source_id="d/1", source_path="", status="ok", params={}, models=[], seed=0, started_at=0,
                        duration_s=0)["runtime"] == ""
    assert isinstance(row["seed"], int) and row["started_at"] == 1.0 and isinstance(row["duration_s"], float)
    assert manifest_row(source_id="d/1", source_path="", status="ok", params={}, models=[], seed=0, started_at=0,
                        duration_s=0, node_id="n7")["node_id"] == "n7"
    table = to_table([row], pa.schema([("extra_col", pa.int32()), ("source_id", pa.int64())]))
    assert table.schema.names == CONTRACT.names + ["extra_col"] and table.schema.field("extra_col").type == pa.int32()
    assert table.schema.field("source_id").type == pa.string()          # the contract's type wins
    assert to_table([row]).schema.names == CONTRACT.names
    with pytest.raises(ValueError, match=r"miss contract columns \['status', 'seed'\]"):
        to_table([{k: v for k, v in row.items() if k not in ("status", "seed")}])


def test_unit_stage_retries_a_failed_unit_and_writes_its_shard_last(tmp_path, capsys):
    import time

    from icm.data.units import UnitStage

    class Flaky(UnitStage):
        """Fails its first ``failures`` attempts at a unit as a whole."""

        def __init__(self, out_dir, failures, retries=1):
            super().__init__(out_dir, {"b": 1, "a": [2]}, models=[{"name": "m"}], seed=5, unit_retries=retries)
            self.failures, self.calls = failures, 0

        def process_unit(self, refs):
            self.calls += 1
            assert not self.store.done_units()           # the shard comes after the rows
            if self.calls <= self.failures:
                raise OSError("disk gone")
            return [self.row(refs[0], status="ok", started_at=time.time(), output_path="o.png"),
                    self.row(refs[1], status="ok", started_at=time.time(), seed=9),
                    self.error_row(refs[2], "bad image", time.time())]

    refs = [{"source_id": "d/1", "root": "/data", "path": "x/1.png"}, {"source_id": "d/2"},
            {"source_id": "d/3", "root": "s3://b/r", "path": "3.png"}]
    unit = {"unit_id": "unit-a", "refs": refs}
    stage = Flaky(tmp_path / "once", failures=1)
    rows = stage.run_unit(unit)
    assert stage.calls == 2 and stage.failure == "" and "attempt 1 of 2" in capsys.readouterr().out
    assert [r["source_path"] for r in rows] == ["/data/x/1.png", ".", "s3://b/r/3.png"]
    assert [(r["status"], r["error"], r["seed"]) for r in rows] == [("ok", "", 5), ("ok", "", 9), ("error", "bad image", 5)]
    assert rows[0]["params"] == '{"a":[2],"b":1}' and rows[0]["models"] == '[{"name":"m"}]'
    assert rows[0]["output_path"] == "o.png" and rows[1]["output_path"] == ""
    assert pq.read_table(tmp_path / "once" / "manifest" / "unit-a.parquet").column("source_id").to_pylist() == \
        ["d/1", "d/2", "d/3"]

    broken = Flaky(tmp_path / "twice", failures=2)
    assert broken.run_unit(unit) is None and broken.calls == 2 and broken.failure == "OSError: disk gone"
    assert not (tmp_path / "twice" / "manifest").exists()
    patient = Flaky(tmp_path / "patient", failures=2, retries=2)
    assert patient.run_unit(unit) is not None and patient.calls == 3
    assert Flaky(tmp_path / "never", failures=1, retries=0).run_unit(unit) is None

    # the Ray Data interface: one unit per batch row, rows back as JSON (numpy values included)
    class Numpy(Flaky):
        def process_unit(self, refs):
            return [self.row(r, status="ok", started_at=0.0, seed=np.int64(3), boxes=np.arange(2)) for r in refs]

    batch = {"unit_json": np.array([json.dumps({"unit_id": "unit-b", "refs": refs[:1]})])}
    out = Numpy(tmp_path / "batch", failures=0)(batch)
    assert out["unit_id"].tolist() == ["unit-b"] and out["failure"].tolist() == [""]
    (row,) = json.loads(out["rows_json"][0])
    assert row["seed"] == 3 and row["boxes"] == [0, 1] and row["source_id"] == "d/1"
    failed = Flaky(tmp_path / "batch-failed", failures=5)(
        {"unit_json": np.array([json.dumps({"unit_id": "unit-c", "refs": refs})])})
    assert json.loads(failed["rows_json"][0]) == [] and failed["failure"].tolist() == ["OSError: disk gone"]

    class Unserialisable(Flaky):
        def process_unit(self, refs):
            return [self.row(refs[0], status="ok", started_at=0.0, handle=object())]

    with pytest.raises(TypeError, match="^not JSON serialisable: object$"):
        Unserialisable(tmp_path / "odd", failures=0)({"unit_json": np.array([json.dumps(unit)])})

    # defaults: seed 0, one retry, no runtime; the decode (prepare_unit) is handed to process_unit,
    # queued writes go to the stage's storage after process_unit, outside the compute lock, before
    # the shard; extra columns keep the stage's schema; a stage's own runtime goes into its rows
    events = []

    class Overlapped(UnitStage):
        extra_schema = pa.schema([("score", pa.float32())])
        runtime = {"device": "cpu"}

        def prepare_unit(self, unit):
            events.append(("prepare", unit["unit_id"], self._compute.locked()))
            return [len(r["source_id"]) for r in unit["refs"]]

        def process_unit(self, refs):
            events.append(("process", self.prepared, self._compute.locked()))
            if len(events) == 2:
                raise OSError("first attempt lost")
            data = b"bytes of " + refs[0]["source_id"].encode()
            self.write_later(lambda: events.append(("write", self.storage.write_bytes("out/a.bin", data),
                                                    self._compute.locked(), sorted(self.store.done_units()))))
            return [self.row(r, status="ok", started_at=time.time(), score=0.5) for r in refs]

    assert UnitStage(tmp_path / "fresh", {}).failure == ""
    stage = Overlapped(tmp_path / "overlapped", {})
    assert stage.prepared is None
    rows = stage.run_unit({"unit_id": "unit-o", "refs": refs[:2]})
    assert events[:3] == [("prepare", "unit-o", False), ("process", [3, 3], True), ("prepare", "unit-o", False)]
    assert events[3] == ("process", [3, 3], True) and events[4][2:] == (False, [])     # the write: unlocked, no shard yet
    assert (tmp_path / "overlapped/out/a.bin").read_bytes() == b"bytes of d/1" and stage.prepared is None
    assert [(r["seed"], r["runtime"]) for r in rows] == [(0, '{"device":"cpu"}')] * 2
    assert all(0 <= r["duration_s"] < 60 for r in rows)
    shard = pq.read_table(tmp_path / "overlapped/manifest/unit-o.parquet")
    assert shard.schema.field("score").type == pa.float32() and shard.column("score").to_pylist() == [0.5, 0.5]
    assert Flaky(tmp_path / "plain", failures=0).run_unit(unit)[0]["runtime"] == ""
    attempts = []

    class AlwaysFails(UnitStage):
        def process_unit(self, refs):
            attempts.append(1)
            raise OSError("still gone")

    assert AlwaysFails(tmp_path / "fails", {}).run_unit(unit) is None and len(attempts) == 2   # one retry


def test_manifest_reader_keeps_ids_and_root(tmp_path):
    write_png(tmp_path / "out/images/a.png", _rgb())
    store = ManifestStore(tmp_path / "out")
    store.write_unit("u", [manifest_row(source_id="ds/7", source_path="/src", output_path="images/a.png",
                                        status="ok", params={}, models=[], seed=0, started_at=0, duration_s=0),
                           manifest_row(source_id="ds/8", source_path="/src", output_path="../../x.png",
                                        status="ok", params={}, models=[], seed=0, started_at=0, duration_s=0)])
    recs = {r["source_id"]: r for r in ManifestReader(store.consolidate()).records()}
    assert recs["ds/7"]["status"] == "ok" and recs["ds/7"]["dataset"] == "ds"
    assert recs["ds/8"]["status"] == "error" and "escapes" in recs["ds/8"]["error"]


def test_shapes_deterministic_two_domains(tmp_path, small_shapes):
    again = shapes(tmp_path, n_train=24, n_val=12, seed=7)
    for domain in DOMAINS:
        for split in ("train", "val"):
            a = (small_shapes / domain / "annotations" / f"instances_{split}.json").read_text()
            assert a == (again / domain / "annotations" / f"instances_{split}.json").read_text()
    first = sorted((small_shapes / "photo/train").glob("*.png"))[0]
    assert first.read_bytes() == (again / "photo/train" / first.name).read_bytes()

    def saturation(domain):
        recs = list(shapes_reader(domain, "train", root=small_shapes.parent, n_train=24, n_val=12, seed=7).records())
        return np.mean([np.ptp(r["image"].astype(int), axis=2).mean() for r in recs])
    assert saturation("photo") > 4 * saturation("sketch")  # colour photos vs gray sketches
    sizes = [(r["width"], r["height"]) for r in
             shapes_reader("sketch", "train", root=small_shapes.parent, n_train=24, n_val=12, seed=7).records()]
    assert all(128 <= w <= 256 and 128 <= h <= 256 for w, h in sizes)


def test_shapes_objects_are_separate_and_visible(small_shapes):
    """Version 2 of the set: no object occludes another (a label no detector can learn), and each
    object's colour stands out from the background around it (photo domain)."""
    for domain in DOMAINS:
        for rec in shapes_reader(domain, "train", root=small_shapes.parent, n_train=24, n_val=12, seed=7).records():
            boxes = np.asarray(rec["boxes"]).reshape(-1, 4)
            assert len(boxes) >= 1
            for i in range(len(boxes)):
                for j in range(i + 1, len(boxes)):
                    a, b = boxes[i], boxes[j]
                    assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (rec["source_id"], a, b)
            if domain == "photo":
                img = rec["image"].astype(float)
                for x1, y1, x2, y2 in boxes.astype(int):
                    cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
                    inside = img[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3).mean(0)
                    ring = np.concatenate([img[max(0, y1 - 3):y1, x1:x2].reshape(-1, 3),
                                           img[y2:y2 + 3, x1:x2].reshape(-1, 3)])
                    if len(ring):
                        assert np.linalg.norm(inside - ring.mean(0)) > 40, rec["source_id"]


# --- object storage: faults are not content errors, writes make no directory markers ---------

@pytest.fixture(scope="module")
def fake_s3():
    """moto's S3 server behind the fault-injecting proxy of tests/s3_fake.py, as this process's S3."""
    import os

    from s3_fake import FakeS3

    with FakeS3() as s3:
        saved = {k: os.environ.get(k) for k in s3.env}
        os.environ.update(s3.env)
        yield s3
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _voc_on(storage, ids, missing=()):
    storage.write_text("ImageSets/Main/trainval.txt", "".join(f"{i}\n" for i in ids))
    for i in ids:
        if i not in missing:
            storage.write_text(f"Annotations/{i}.xml", f"<annotation><filename>{i}.jpg</filename><object><name>dog"
                               "</name><bndbox><xmin>2</xmin><ymin>2</ymin><xmax>9</xmax><ymax>9</ymax></bndbox>"
                               "</object></annotation>")


def test_a_storage_fault_is_never_an_image_error(fake_s3):
    """403 (a missing grant, or a missing key without s3:ListBucket) and 503 (SlowDown) raise
    StorageUnavailable; only what the storage answers about the file itself — 404, 0 bytes,
    undecodable, too small — is the image's error row."""
    from icm.data.storage import Storage, StorageUnavailable

    root = "s3://icm/faults/ds"
    store = Storage(root)
    png = io.BytesIO()
    Image.fromarray(_rgb()).save(png, "PNG")
    store.write_bytes("good.png", png.getvalue())
    store.write_bytes("empty.png", b"")
    store.write_bytes("corrupt.png", b"not an image")
    store.write_text("list.txt", "good.png\nmissing.png\nempty.png\ncorrupt.png\n")
    refs = {r.image_id: r for r in ListTxtReader(f"{root}/list.txt").refs()}
    rows = {k: load_record(r, min_side=1) for k, r in refs.items()}
    assert rows["good.png"]["status"] == "ok" and rows["good.png"]["image"].shape == (40, 50, 3)
    assert "not found" in rows["missing.png"]["error"] and "empty" in rows["empty.png"]["error"]
    assert "cannot decode" in rows["corrupt.png"]["error"]
    assert "smaller than the minimum" in load_record(refs["good.png"], min_side=64)["error"]
    for status in (403, 503):
        for target in ("good", "missing"):      # a refused HEAD says nothing about the file
            fake_s3.faults([{"path": rf"/ds/{target}\.png$", "status": status}])
            with pytest.raises(StorageUnavailable, match=f"{target}.png"):
                load_record(refs[f"{target}.png"])
    fake_s3.faults([{"path": r"/ds/good\.png$", "method": "GET", "status": 403}])   # HEAD passes, GET refused
    with pytest.raises(StorageUnavailable):
        load_record(refs["good.png"])
    fake_s3.faults([{"path": r"/ds/good\.png$", "status": 503, "times": 2}])        # brief throttling: retried
    assert load_record(refs["good.png"])["status"] == "ok"
    fake_s3.faults([])


def test_voc_annotations_listed_once_in_parallel_and_faults_fail_the_listing(fake_s3):
    from icm.data.storage import Storage, StorageUnavailable

    root = "s3://icm/faults/voc"
    ids = [f"{i:06d}" for i in range(12)]
    _voc_on(Storage(root), ids, missing={"000003"})
    reader = VocReader(root, classes=["cat", "dog"])
    fake_s3.reset_log()
    refs = reader.refs()
    assert [r.image_id for r in refs] == ids
    assert refs[3].error and "000003" in refs[3].error and not refs[4].error and refs[4].class_names == ["dog"]
    gets = [p for m, p in fake_s3.requests() if m == "GET" and "/Annotations/" in p]
    assert len(gets) == len(ids) - 1
    assert [r.to_dict() for r in reader.refs()] == [r.to_dict() for r in refs]
    assert len([p for m, p in fake_s3.requests() if "/Annotations/" in p and m == "GET"]) == len(gets)  # listed once
    for status in (403, 503):
        fake_s3.faults([{"path": r"/Annotations/000005\.xml$", "status": status}])
        with pytest.raises(StorageUnavailable, match="000005"):
            VocReader(root, classes=["cat", "dog"]).refs()
    fake_s3.faults([])


def test_one_write_and_one_read_are_their_own_requests_only(fake_s3):
    """No HEAD bucket, no directory-marker PUTs: pyarrow 20 uploads in 3 requests (create, part,
    complete), pyarrow ≥ 21 with allow_delayed_open in 1 PUT; nothing else, and no key ends in '/'.
    A read is a HEAD and one GET, whatever the size (a stream would GET 256 KiB at a time)."""
    import pyarrow as pa

    from icm.data.storage import Storage

    store = Storage("s3://icm/writes/icm/outputs/maa")
    assert store.fs is Storage("s3://icm/writes/other").fs      # one filesystem (and region lookup) per bucket
    fake_s3.reset_log()
    store.write_bytes("images/voc/000001.png", b"x")
    requests = fake_s3.requests()
    key = "/icm/writes/icm/outputs/maa/images/voc/000001.png"
    assert all(path.split("?")[0] == key for _, path in requests), requests
    single_put = int(pa.__version__.split(".")[0]) >= 21
    assert [m for m, _ in requests] == (["PUT"] if single_put else ["POST", "PUT", "POST"]), requests
    assert store.read_bytes("images/voc/000001.png") == b"x"
    assert not [k for k in fake_s3.keys() if k.endswith("/")]
    big = bytes(range(256)) * 4096 * 3                          # 3 MiB
    store.write_bytes("weights/w.pth", big)
    fake_s3.reset_log()
    assert store.read_bytes("weights/w.pth") == big
    assert [m for m, _ in fake_s3.requests()] == ["HEAD", "GET"]


def test_image_ref_to_dict_is_asdict():
    """``to_dict`` is written out for speed: it must stay ``dataclasses.asdict``, field for field."""
    from dataclasses import asdict

    from icm.data.records import ImageRef

    ref = ImageRef("d/1", "d", "1", "/r", "a.png", [[1.0, 2.0, 3.0, 4.0]], [1], ["dog"], ["note"], "")
    as_dict = ref.to_dict()
    assert as_dict == asdict(ref) and list(as_dict) == list(asdict(ref))
    as_dict["boxes"][0][0] = 9.0
    assert ref.boxes[0][0] == 1.0                 # copies, as asdict makes


def test_manifest_status_counts_and_first_error(tmp_path):
    from icm.data.manifest import status_counts

    def row(sid, status, error=""):
        return manifest_row(source_id=sid, source_path="", status=status, error=error, params={}, models=[], seed=0,
                            started_at=0, duration_s=0)

    store = ManifestStore(tmp_path / "out")
    store.write_unit("u0", [row("d/1", "ok"), row("d/2", "error", "decode failed"), row("d/3", "error", "empty file"),
                            row("d/4", "ok"), row("d/5", "ok")])
    (tmp_path / "out" / "manifest" / "notes.txt").write_text("not a shard")     # only .parquet files are shards
    assert store.done_units() == {"u0"}
    assert status_counts(store.consolidate()) == ({"ok": 3, "error": 2}, "d/2: decode failed")
    clean = ManifestStore(tmp_path / "clean")
    clean.write_unit("u0", [row("d/1", "ok")])
    assert status_counts(clean.consolidate()) == ({"ok": 1}, "")
