"""The data layer through a real local Ray cluster: decoding in workers, a resumable job."""

import shutil
import sys
from pathlib import Path

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


def test_pool_bounds_follow_the_cluster_and_its_node_groups():
    """``workers.actors: auto``: from one actor up to every one that fits the node groups at their
    maximum (``min_workers: 0`` groups included), CPUs per actor bounding a node as much as GPUs."""
    import yaml

    from icm.data.ray_io import launcher_node_groups, pool_bounds

    aws = yaml.safe_load((Path(__file__).resolve().parents[1] / "cluster/aws.yaml").read_text())
    gpu_nodes = sum(t["max_workers"] for t in aws["available_node_types"].values() if t["resources"].get("GPU"))
    assert all(t["resources"] == {"CPU": 8, "GPU": 1} for t in aws["available_node_types"].values()
               if t["resources"].get("GPU"))
    cold = {"nodes": [{"CPU": 0}], "scaling": launcher_node_groups(aws)}     # only the head is up
    # two 0.5-GPU actors of 3 CPUs fit each 8-CPU, 1-GPU node; with 5 CPUs each only one does
    assert pool_bounds("auto", {"CPU": 3, "GPU": 0.5}, cold, 10_000) == {"min": 1, "initial": 1, "max": 2 * gpu_nodes}
    assert pool_bounds("auto", {"CPU": 5, "GPU": 0.5}, cold, 10_000)["max"] == gpu_nodes
    warm = {**cold, "nodes": [{"CPU": 0}] + [{"CPU": 8, "GPU": 1}] * 3}      # three GPU nodes already up
    assert pool_bounds("auto", {"CPU": 3, "GPU": 0.5}, warm, 10_000)["initial"] == 6
    assert pool_bounds("auto", {"CPU": 3, "GPU": 0.5}, warm, 10)["max"] == 10           # never more than units
    assert pool_bounds("auto", {"CPU": 3, "GPU": 0.5}, warm, 10_000, max_actors=4) == {"min": 1, "initial": 4, "max": 4}
    capped = launcher_node_groups({**aws, "max_workers": 40})                    # the cluster-wide cap
    assert pool_bounds("auto", {"CPU": 3, "GPU": 0.5}, {**cold, "scaling": capped}, 10_000)["max"] == 80
    assert pool_bounds(3, {"CPU": 3, "GPU": 0.5}, cold, 10_000) == {"min": 3, "initial": 3, "max": 3}

    laptop = {"nodes": [{"CPU": 2.0, "memory": 8e9}], "scaling": None}       # nothing publishes node groups
    assert pool_bounds("auto", {"CPU": 1, "GPU": 0}, laptop, 16)["initial"] == 2
    assert pool_bounds("auto", {"CPU": 1, "GPU": 0}, laptop, 16)["max"] == 16          # open: Ray Data grows it
    # a coder (0.5 CPU) held back for the stage in front: two 0.75-CPU labellers still fit
    assert pool_bounds("auto", {"CPU": 0.75}, laptop, 6, reserved={"CPU": 0.5})["initial"] == 2
    assert pool_bounds("auto", {"CPU": 1}, laptop, 6, reserved={"CPU": 1})["initial"] == 1


def test_compute_lock_lets_one_unit_write_while_the_next_computes(tmp_path):
    """A unit's queued writes run outside the compute lock (another unit computes meanwhile), its
    shard only after them, and two units never compute at once."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from icm.data.units import UnitStage

    first_writing, second_computed = threading.Event(), threading.Event()
    inside, most = [0], [0]
    lock = threading.Lock()

    class Probe(UnitStage):
        def process_unit(self, refs):
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            if refs[0]["source_id"] == "b":
                assert first_writing.wait(30), "unit a never reached its writes"
                second_computed.set()
            rel = f"out/{refs[0]['source_id']}.txt"

            def write():
                if rel.endswith("a.txt"):
                    first_writing.set()
                    assert second_computed.wait(30), "unit b could not compute while unit a was writing"
                self.storage.write_bytes(rel, b"x")
            self.write_later(write)
            with lock:
                inside[0] -= 1
            return [self.row(ref, status="ok", started_at=0.0, output_path=rel) for ref in refs]

    stage = Probe(str(tmp_path), {})
    units = [{"unit_id": f"unit-{s}", "refs": [{"source_id": s}]} for s in ("a", "b")]
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(stage._run_unit, units[0])
        assert first_writing.wait(30)
        second = pool.submit(stage._run_unit, units[1])
        results = [first.result(60), second.result(60)]
    assert [failure for _, failure in results] == ["", ""] and most[0] == 1
    assert (tmp_path / "out/a.txt").is_file() and (tmp_path / "manifest/unit-a.parquet").is_file()


class _PoolProbe:
    """A stage that records which actor ran each unit, with how many torch threads, and holds each
    unit until its partner unit runs too (so one actor taking both units in turn fails)."""

    def __init__(self, flag_dir: str):
        from icm.maa.stage import claim_worker_share

        import torch
        claim_worker_share(torch.device("cpu"))
        self.flags = Path(flag_dir)

    def __call__(self, batch):
        import json as _json
        import os
        import time as _time

        import torch
        unit = _json.loads(str(batch["unit_json"][0]))
        (self.flags / unit["unit_id"]).touch()
        partner = self.flags / unit["partner"]
        deadline = _time.time() + 120
        while not partner.exists() and _time.time() < deadline:
            _time.sleep(0.1)
        row = {"pid": os.getpid(), "threads": torch.get_num_threads(), "partner_ran": partner.exists()}
        return {"unit_id": np.array([unit["unit_id"]]), "rows_json": np.array([_json.dumps([row])]),
                "failure": np.array([""])}


def test_autoscaling_pool_on_ray_spreads_units_and_gives_each_actor_its_cores(ray_cluster, tmp_path):
    import ray.cloudpickle

    from icm.data.ray_io import run_units

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    units = [{"unit_id": "u1", "partner": "u2", "refs": []}, {"unit_id": "u2", "partner": "u1", "refs": []}]
    two = run_units(units, _PoolProbe, {"flag_dir": str(tmp_path)}, workers={"actors": "auto", "num_cpus": 1})
    rows = [r for res in two for r in res["rows"]]
    assert all(r["partner_ran"] for r in rows), "a unit waited behind a busy actor while another was free"
    assert len({r["pid"] for r in rows}) == 2 and {r["threads"] for r in rows} == {1}

    for f in tmp_path.iterdir():
        f.unlink()
    alone = [{"unit_id": u, "partner": u, "refs": []} for u in ("u1", "u2")]
    one = run_units(alone, _PoolProbe, {"flag_dir": str(tmp_path)}, workers={"actors": "auto", "num_cpus": 2})
    assert {r["threads"] for res in one for r in res["rows"]} == {2}                # one actor, both cores
