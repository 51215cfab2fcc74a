"""Resume semantics every data job shares (issue: resume that never loses an image): "done" is a
property of images, units that fail as a whole are retried by the next run, output paths are
unique per source_id, the guard compares weights by sha256. Run through Ray with the export job
(the cheapest stage) — the same ``run_resumable`` every job uses."""

import hashlib
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from icm.data import ListTxtReader, load_record, write_png
from icm.data.units import output_relpath


def _image(i, h=24, w=30):
    return np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _cfg(src, out, **extra):
    return {"dataset": {"type": "folder", "root": str(src), "name": "ds"}, "out_dir": str(out), "unit_size": 4,
            "workers": {"actors": 1, "num_cpus": 0.5}, **extra}


def _manifest(out):
    return pq.read_table(out / "manifest.parquet").to_pylist()


def _digests(out):
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and (p.suffix == ".png" or p.parent.name == "manifest")}


@pytest.mark.slow
def test_limit_raised_files_added_removed_and_failed_units(ray_cluster, tmp_path):
    import export_dataset

    src, out = tmp_path / "src", tmp_path / "out"
    for i in range(6):
        write_png(src / f"img{i}.png", _image(i))

    first = export_dataset.run(_cfg(src, out, limit=3))
    assert first["images"] == {"done": 3, "failed": 0, "skipped": 0, "not_run": 0}
    before = _digests(out)

    # limit 3 → 6 with units of 4: the old positional units called img3 done; every image gets a row
    raised = export_dataset.run(_cfg(src, out, limit=6))
    assert raised["images"] == {"done": 3, "failed": 0, "skipped": 3, "not_run": 0}
    rows = _manifest(out)
    assert sorted(r["source_id"] for r in rows) == [f"ds/img{i}.png" for i in range(6)]
    after = _digests(out)
    assert all(after[k] == v for k, v in before.items()), "outputs of done images were rewritten"

    # a file added (sorting between done ones) and a file removed: only the new one runs
    write_png(src / "img2b.png", _image(20))
    (src / "img1.png").unlink()
    again = export_dataset.run(_cfg(src, out))
    assert again["images"] == {"done": 1, "failed": 0, "skipped": 5, "not_run": 0}
    assert again["rows_outside_selection"] == 1        # img1's row stays in its shard, not in the manifest
    ids = [r["source_id"] for r in _manifest(out)]
    assert sorted(ids) == sorted(f"ds/{n}" for n in ("img0.png", "img2.png", "img2b.png", "img3.png", "img4.png",
                                                       "img5.png"))
    assert len(ids) == len(set(ids))

    # a unit that fails as a whole (its output path is blocked) writes no shard: the next run retries it
    write_png(src / "img9.png", _image(9))
    blocker = out / output_relpath("ds/img9.png")
    blocker.mkdir(parents=True)
    failed = export_dataset.run(_cfg(src, out))
    assert failed["images"] == {"done": 0, "failed": 0, "skipped": 6, "not_run": 1}
    assert len(failed["failed_units"]) == 1 and "Error" in failed["failed_units"][0]["reason"]
    assert "ds/img9.png" not in {r["source_id"] for r in _manifest(out)}
    with pytest.raises(SystemExit, match="failed as a whole"):
        export_dataset.exit_status(failed)
    blocker.rmdir()
    retried = export_dataset.run(_cfg(src, out))
    assert retried["images"] == {"done": 1, "failed": 0, "skipped": 6, "not_run": 0}
    row = next(r for r in _manifest(out) if r["source_id"] == "ds/img9.png")
    assert np.array_equal(np.asarray(Image.open(out / row["output_path"])), _image(9))


@pytest.mark.slow
def test_output_paths_unique_and_bad_files_named(ray_cluster, tmp_path):
    import export_dataset

    src, out = tmp_path / "src", tmp_path / "out"
    images = {"img.png": _image(1), "a b.png": _image(2), "a_b.png": _image(3)}
    for name, img in images.items():
        write_png(src / name, img)
    images["img.jpg"] = _image(4)
    Image.fromarray(images["img.jpg"]).save(src / "img.jpg", quality=100)
    (src / "empty.png").write_bytes(b"")
    (src / "notes.png").write_text("this is text, not pixels\n")

    summary = export_dataset.run(_cfg(src, out))
    assert summary["images"]["done"] == 4 and summary["images"]["failed"] == 2
    rows = {r["source_id"].split("/", 1)[1]: r for r in _manifest(out)}
    paths = [rows[n]["output_path"] for n in images]
    assert len(set(paths)) == 4
    for name, img in images.items():
        written = np.asarray(Image.open(out / rows[name]["output_path"]))
        expected = np.asarray(Image.open(src / name).convert("RGB"))
        assert np.array_equal(written, expected)
    assert "empty file" in rows["empty.png"]["error"]
    assert "not an image" in rows["notes.png"]["error"] and "pi_heif" not in rows["notes.png"]["error"]


def test_output_relpath_keeps_extension_and_separates_sanitised_names():
    assert output_relpath("ds/img.jpg") != output_relpath("ds/img.png")
    assert output_relpath("ds/a b.png") != output_relpath("ds/a_b.png")
    assert output_relpath("ds/a_b.png") == "images/ds/a_b.png.png"
    for evil in ("ds/../../etc/passwd", "/abs/x.png", "ds/./x", "ds//x"):
        rel = output_relpath(evil)
        assert ".." not in rel.split("/") and not rel.startswith("/")
    import hashlib

    def tag(source_id):   # the first 10 hex digits of the id's SHA-1, appended when the name was changed
        return hashlib.sha1(source_id.encode()).hexdigest()[:10]
    assert output_relpath("ds/a b.png") == f"images/ds/a_b.png-{tag('ds/a b.png')}.png"
    assert output_relpath("ds/../x") == f"images/ds/_/x-{tag('ds/../x')}.png"
    assert output_relpath("/abs/./x.png") == f"images/abs/x.png-{tag('/abs/./x.png')}.png"
    assert output_relpath("ds/é~$.png") == f"images/ds/_.png-{tag('ds/é~$.png')}.png"
    assert output_relpath("") == f"images/_-{tag('')}.png" and output_relpath("..") == f"images/_-{tag('..')}.png"
    assert output_relpath("d/x-1_2.A", ".json", "objects") == "objects/d/x-1_2.A.json"


def test_list_file_naming_a_path_twice_gives_two_rows(tmp_path):
    write_png(tmp_path / "a.png", _image(0))
    (tmp_path / "list.txt").write_text("a.png 1,1,10,10,0\na.png 2,2,20,20,1\n")
    refs = ListTxtReader(tmp_path / "list.txt", classes=["x", "y"]).refs()
    assert [r.source_id for r in refs] == ["list/a.png", "list/a.png#2"]
    assert [load_record(r)["class_names"] for r in refs] == [["x"], ["y"]]


def test_guard_compares_weights_by_sha256_and_keeps_the_resolved_config(ray_cluster, tmp_path, monkeypatch):
    import common
    import export_dataset

    weights = tmp_path / "trained" / "det.pth"
    weights.parent.mkdir()
    weights.write_bytes(b"first training")
    params = {"detectors": [{"name": "yolov8n", "weights": str(weights)}]}
    out = tmp_path / "out"
    common.guard_params(out, params)
    common.guard_params(out, params)              # same file: resumable
    weights.write_bytes(b"second training")      # retrained under the same name
    with pytest.raises(SystemExit, match="weights_sha256"):
        common.guard_params(out, params)

    src = tmp_path / "src"
    write_png(src / "a.png", _image(0))
    job = tmp_path / "job"
    export_dataset.run(_cfg(src, job))
    resolved = (job / "config.resolved.yaml").read_text()
    with pytest.raises(SystemExit, match="other parameters"):
        export_dataset.run(_cfg(src, job, unit_size=2))
    assert (job / "config.resolved.yaml").read_text() == resolved
    shutil.rmtree(job)
