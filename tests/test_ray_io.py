"""The data layer through a real local Ray cluster: decoding in workers, a resumable job."""

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from icm.data import comparable, write_png
from icm.data.ray_io import records_dataset, work_units
from icm.data.samples import shapes_reader


def _reader(small_shapes):
    return shapes_reader("sketch", "val", root=small_shapes.parent, n_train=24, n_val=12, seed=7)


def test_records_dataset_decodes_in_workers(ray_cluster, small_shapes):
    reader = _reader(small_shapes)
    rows = sorted(records_dataset(reader).take_all(), key=lambda r: r["source_id"])
    local = sorted(reader.records(), key=lambda r: r["source_id"])
    assert [r["source_id"] for r in rows] == [r["source_id"] for r in local]
    for a, b in zip(rows, local):
        assert np.array_equal(a["image"], b["image"]) and np.allclose(a["boxes"], b["boxes"])


def test_work_units_are_fixed():
    from icm.data.readers import Reader

    class Fake(Reader):
        name = "d"

        def refs(self):
            from icm.data.records import ImageRef
            return [ImageRef(f"d/{i}", "d", str(i), "/r", f"{i}.png") for i in (5, 3, 9, 1, 7)]
    units = work_units(Fake(), 2)
    assert [[r["source_id"] for r in u["refs"]] for u in units] == [["d/1", "d/3"], ["d/5", "d/7"], ["d/9"]]
    assert [u["unit_id"] for u in units] == [u["unit_id"] for u in work_units(Fake(), 2)]
    assert len({u["unit_id"] for u in units}) == 3
    rest = work_units(Fake(), 2, done={"d/3", "d/5"})   # done images are never cut into units again
    assert [[r["source_id"] for r in u["refs"]] for u in rest] == [["d/1", "d/7"], ["d/9"]]
    assert not {u["unit_id"] for u in rest} & {u["unit_id"] for u in units[:2]}


def _export_cfg(root, out):
    return {"dataset": {"type": "folder", "root": str(root), "name": "mixed"}, "out_dir": str(out),
            "unit_size": 3, "workers": {"actors": 2, "num_cpus": 0.5}}


def test_export_job_resumes_to_identical_outputs_and_keeps_bad_rows(ray_cluster, small_shapes, tmp_path):
    import export_dataset

    src = tmp_path / "src"
    src.mkdir()
    for i, path in enumerate(sorted((small_shapes / "photo/val").glob("*.png"))[:7]):
        shutil.copy(path, src / f"img{i}.png")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    write_png(src / "sub/nested.png", np.zeros((20, 30, 3), np.uint8))

    full = tmp_path / "full"
    summary = export_dataset.run(_export_cfg(src, full))
    assert summary["images"] == {"done": 8, "failed": 1, "skipped": 0, "not_run": 0}
    manifest = pq.read_table(full / "manifest.parquet").to_pylist()
    bad = [r for r in manifest if r["source_id"] == "mixed/broken.png"][0]
    assert bad["status"] == "error" and "cannot decode" in bad["error"]
    assert all((full / r["output_path"]).is_file() for r in manifest if r["status"] == "ok")

    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    (resumed / "manifest.parquet").unlink()
    shard = sorted((resumed / "manifest").glob("unit-*.parquet"))[1]
    lost = pq.read_table(shard).to_pylist()
    shard.unlink()
    for r in lost:
        if r["output_path"]:
            (resumed / r["output_path"]).unlink()
    again = export_dataset.run(_export_cfg(src, resumed))
    assert again["images"]["skipped"] == 9 - len(lost) and again["images"]["done"] + again["images"]["failed"] == len(lost)
    for r in manifest:
        if r["output_path"]:
            assert (full / r["output_path"]).read_bytes() == (resumed / r["output_path"]).read_bytes()
    a, b = comparable(full / "manifest.parquet"), comparable(resumed / "manifest.parquet")
    assert a.drop(columns=["source_path"]).equals(b.drop(columns=["source_path"]))

    with pytest.raises(SystemExit, match="other parameters"):  # other settings never mix in one out_dir
        export_dataset.run({**_export_cfg(src, resumed), "unit_size": 2})
