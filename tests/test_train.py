"""The shared training harness: the stream is a function of (seed, epoch) and resumes inside an
epoch; the detector loop learns and resumes to the same weights as an uninterrupted run; on Ray
Train a worker failure restarts from the checkpoint to the uninterrupted run's weights."""

import sys
from dataclasses import replace

import pytest
import torch

from icm.data.ray_io import select_refs
from icm.data.samples import shapes_reader
from icm.train.codec import train_codec_loop
from icm.train.detectors import train_detector_loop
from icm.train.session import LocalSession
from icm.train.stream import Stream, local_rows


def _config(epochs):
    return {"name": "centernet_resnet18", "classes": ["circle", "square", "triangle", "cross"], "canvas": 64,
            "epochs": epochs, "batch_size": 4, "lr": 2e-3, "seed": 3}


@pytest.fixture(scope="module")
def train_records(small_shapes):
    return list(shapes_reader("photo", "train", root=small_shapes.parent, n_train=24, n_val=12, seed=7).records())[:12]


def test_loss_goes_down_and_resume_equals_uninterrupted(tmp_path, train_records):
    full = LocalSession({"train": train_records}, tmp_path / "full")
    train_detector_loop(_config(3), full)
    losses = [r["loss"] for r in full.reports]
    assert losses[-1] < losses[0], losses

    class Killed(Exception):
        pass

    class DiesAfterEpoch1(LocalSession):
        def report(self, metrics, state=None):
            super().report(metrics, state)
            if metrics["epoch"] == 1:
                raise Killed

    with pytest.raises(Killed):
        train_detector_loop(_config(3), DiesAfterEpoch1({"train": train_records}, tmp_path / "part"))
    before = LocalSession({"train": train_records}, tmp_path / "part").restore()["train_s"]
    resumed = LocalSession({"train": train_records}, tmp_path / "part")
    train_detector_loop(_config(3), resumed)          # same run started again
    assert [r["epoch"] for r in resumed.reports] == [2]
    a, b = full.restore(), resumed.restore()
    assert a["step"] == b["step"] == 9
    # the run's training time spans both sessions: epochs 0-1, then epoch 2 on top
    assert 0 < before < b["train_s"] == resumed.reports[-1]["train_s"]
    train_detector_loop(_config(3), finished := LocalSession({"train": train_records}, tmp_path / "part"))
    assert finished.reports == [] and finished.restore()["train_s"] == b["train_s"]   # found finished: unchanged
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def _numbered(n):
    return [{"id": i} for i in range(n)]


def test_stream_order_is_a_function_of_seed_and_epoch():
    """Each epoch every item reaches exactly one of the workers, in an order drawn from (seed,
    epoch) alone; rows of a window are shuffled together; a start position skips what was
    consumed without decoding it."""
    def ids(stream, epoch, rank=0, world=1, start=(0, 0)):
        return [row["id"] for _, _, row in local_rows(stream, epoch, rank, world, start)]

    stream = Stream(items=_numbered(40), seed=5)
    shares = [ids(stream, 0, r, 2) for r in (0, 1)]
    assert sorted(shares[0] + shares[1]) == list(range(40)) and len(shares[0]) == len(shares[1]) == 20
    assert ids(stream, 0) != ids(stream, 1) and sorted(ids(stream, 1)) == list(range(40))
    assert ids(Stream(items=_numbered(40), seed=5), 1) == ids(stream, 1)       # rebuilt: the same order
    assert ids(Stream(items=_numbered(40), seed=6), 1) != ids(stream, 1)
    assert ids(Stream(items=_numbered(40), shuffle=False), 3) == list(range(40))

    decoded = []

    def decode(raw, epoch):
        decoded.append(raw["id"])
        return None if raw["id"] % 7 == 3 else raw          # bad input: dropped, still counted in positions

    # windows of 4 items, each expanding to 3 raw rows, shuffled together inside the window
    expanding = Stream(items=_numbered(12), expand=lambda item, epoch: [{"id": item["id"] * 3 + j} for j in range(3)],
                       decode=decode, window=4, seed=1)
    full = list(local_rows(expanding, 2, 0, 1))
    assert sorted(r["id"] for _, _, r in full) == [i for i in range(36) if i % 7 != 3]
    first_window = [r["id"] // 3 for w, _, r in full if w == 0]
    assert len(set(first_window)) == 4 and first_window != sorted(first_window)   # rows of 4 items mixed
    w, k, _ = full[15]
    decoded.clear()
    assert list(local_rows(expanding, 2, 0, 1, (w, k + 1))) == full[16:]
    assert len(decoded) == 36 - (12 * w + k + 1)                               # the consumed rows were skipped

    # 3 items of very different sizes over 2 workers: with the sizes known, equal spans of rows
    sizes = [5, 20, 7]
    big = Stream(items=_numbered(3), expand=lambda item, epoch: [{"id": (item["id"], j)} for j in range(sizes[item["id"]])],
                 sizes=sizes, window=2, seed=4)
    shares = [ids(big, 0, r, 2) for r in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 16
    assert sorted(shares[0] + shares[1]) == sorted((i, j) for i in range(3) for j in range(sizes[i]))
    dealt = [ids(replace(big, sizes=None), 0, r, 2) for r in (0, 1)]            # without sizes: whole items dealt
    assert sorted(len(d) for d in dealt) != [16, 16]
    with pytest.raises(ValueError, match="expands to 20 rows where its listed size is 19"):
        ids(replace(big, sizes=[5, 19, 7]), 0, 0, 1)


def test_session_resumes_inside_an_epoch_at_every_workers_position(tmp_path):
    """A checkpoint taken inside an epoch carries the stream position; the restored session
    continues with the batch the uninterrupted one trained on next."""
    stream = Stream(items=_numbered(30), seed=2)
    uninterrupted = LocalSession({"train": stream}, tmp_path / "a")
    reference = [[r["id"] for r in b] for e in (0, 1) for b in uninterrupted.batches("train", e, 4)]
    assert len(reference) == 14                                               # 7 full batches per epoch

    first = LocalSession({"train": stream}, tmp_path / "b")
    batches = first.batches("train", 1, 4)
    for _ in range(3):
        next(batches)
    first.report({"step": 10}, {"step": 10, "epoch": 1})
    resumed = LocalSession({"train": stream}, tmp_path / "b")
    state = resumed.restore()
    assert state["stream"]["train"] == {"epoch": 1, "world_size": 1, "positions": [[11, 1]]}
    assert state["resumed_at"] == [] and resumed.restore()["resumed_at"] == []
    rest = [[r["id"] for r in b] for b in resumed.batches("train", 1, 4)]
    assert rest == reference[7 + 3:]
    resumed.report({"step": 14}, {"step": 14, "epoch": 1})
    assert LocalSession({"train": stream}, tmp_path / "b").restore()["resumed_at"] == [10]


def test_empty_epoch_names_the_batch_size(tmp_path):
    with pytest.raises(RuntimeError, match="no batch of 8"):
        next(LocalSession({"train": _numbered(5)}, tmp_path).batches("train", 0, 8))


def _codec_cfg(refs_root, steps, **extra):
    return {"codec": {"name": "bmshj2018-hyperprior", "quality": 1, "channels": [16, 24], "weights": "random:0"},
            "loss": {"type": "rd", "lmbda": 0.01}, "steps": steps, "batch_size": 4, "lr": 1e-3, "checkpoint_every": 4,
            "log_every": 2, "seed": 0, "threads": 1, "crop": 64, **extra}


def _dies_once_after_a_checkpoint(config, session):
    """The codec loop, whose worker 1 dies (its process exits) right after the first checkpoint
    is registered — once: the restarted workers find the marker and live on."""
    import json
    import os
    import time
    from pathlib import Path

    marker, snapshot = Path(config["marker"]), Path(config["run_dir"]) / "checkpoint_manager_snapshot.json"
    report = session.report

    def registered():   # (conftest.registered_checkpoint: Ray workers cannot import tests/)
        try:
            return json.loads(snapshot.read_text()).get("latest_checkpoint_result")
        except (FileNotFoundError, ValueError):
            return None

    def report_then_die(metrics, state=None):
        report(metrics, state)
        if session.rank == 1 and metrics["step"] % config["checkpoint_every"] == 0 and not marker.exists():
            deadline = time.time() + 120
            while time.time() < deadline and registered() is None:
                time.sleep(0.2)   # the controller has registered rank 0's checkpoint: now a failure restarts from it
            marker.write_text(str(metrics["step"]))
            os._exit(1)

    session.report = report_then_die
    train_codec_loop(config, session)


@pytest.mark.slow
def test_ray_train_harness_resumes_from_checkpoint(ray_cluster, small_shapes, tmp_path):
    """Through Ray Train with 2 DDP workers and the codec stream through Ray Data: a worker dies
    after the checkpoint at step 4 (inside epoch 1: 24 images, 3 batches of 4 per worker and
    epoch), Ray Train restarts the workers from it (max_failures), and the finished weights equal
    an uninterrupted run's bit for bit; only steps 5-9 ran again."""
    from ray import cloudpickle

    from icm.train.codec_job import codec_stream
    from icm.train.ray_trainer import final_state, fit

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/
    refs = select_refs(shapes_reader("photo", "train", root=small_shapes.parent, n_train=24, n_val=12, seed=7), None)
    cfg = _codec_cfg(small_shapes, 9)
    stream = codec_stream(refs, {**cfg, "data": {"num_cpus": 0.5}}, {})

    def run(loop, name, **extra):
        result = fit(loop, {**cfg, **extra}, name=name, storage_path=tmp_path, streams={"train": stream}, num_workers=2,
                     cpus_per_worker=0.5, max_failures=1)
        assert result.error is None, result.error
        return final_state(result)

    reference = run(train_codec_loop, "straight")
    restarted = run(_dies_once_after_a_checkpoint, "restarted", marker=str(tmp_path / "died"),
                    run_dir=str(tmp_path / "restarted"))
    assert (tmp_path / "died").read_text() == "4"
    assert reference["step"] == restarted["step"] == 9 and reference["resumed_at"] == []
    assert restarted["resumed_at"] == [4]           # restored from the step-4 checkpoint, not from scratch
    assert restarted["stream"] == reference["stream"]
    for key, value in reference["model"].items():
        assert torch.equal(value, restarted["model"][key]), key


@pytest.mark.slow
def test_detector_driver_resumes_the_same_run(ray_cluster, small_shapes, tmp_path, monkeypatch, preempted):
    """pipelines/train_detectors.py with a harness-trained detector on 2 DDP workers, preempted
    after an epoch's checkpoint and run again: it resumes that run, and the cached weights equal
    an uninterrupted run's bit for bit."""
    import hashlib
    import json

    import yaml

    import train_detectors

    spec = {"label": "cn", "name": "centernet_resnet18", "domain": "photo", "trainer": "ray", "epochs": 8,
            "batch_size": 4, "lr": 2e-3}
    cfg = {"dataset": {"type": "shapes", "n_train": 24, "n_val": 12, "seed": 7}, "canvas": 64, "seed": 0,   # = small_shapes
           "cross_domain": False, "workers": {"num_workers": 2, "cpus_per_worker": 0.5, "threads": 1}, "detectors": [spec]}

    def run(name):
        monkeypatch.setenv("ICM_WEIGHTS_DIR", str(tmp_path / name / "weights"))
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump({**cfg, "out_dir": str(tmp_path / name)}))
        monkeypatch.setattr(sys, "argv", ["train_detectors.py", "--config", str(config)])
        train_detectors.main()
        info = json.loads((tmp_path / name / "weights" / "trained" / "cn.json").read_text())
        return info, hashlib.sha256((tmp_path / name / "weights" / "trained" / "cn.pth").read_bytes()).hexdigest()

    straight, straight_sha = run("straight")
    assert straight["resumed_at"] == [] and straight["sha256"] == straight_sha
    monkeypatch.setenv("ICM_WEIGHTS_DIR", str(tmp_path / "resumed" / "weights"))     # the preempted process's env
    key = train_detectors.cache_key(cfg, spec)
    killed_at = preempted("pipelines/train_detectors.py", {**cfg, "out_dir": str(tmp_path / "resumed")},
                          tmp_path / "resumed" / "ray-train" / f"cn-{key[:12]}")
    assert not (tmp_path / "resumed" / "weights" / "trained" / "cn.pth").exists()
    resumed, resumed_sha = run("resumed")
    assert resumed["resumed_at"] == [killed_at["step"]] and 0 < killed_at["step"] < 8 * 3    # 3 steps an epoch
    assert resumed_sha == straight_sha


def test_cached_detectors_are_keyed_by_their_recipe(tmp_path, monkeypatch):
    """A cached detector is reused only when its entry, training data version and starting weights
    are those it was trained from; a new target alone does not retrain it."""
    import train_detectors

    monkeypatch.setenv("ICM_WEIGHTS_DIR", str(tmp_path / "weights"))
    cfg = {"dataset": {"type": "shapes"}, "canvas": 128}
    spec = {"label": "d", "name": "yolov8n", "domain": "sketch", "epochs": 3, "init": "trained:base"}
    key = train_detectors.cache_key(cfg, spec)
    assert train_detectors.cache_key(cfg, {**spec, "min_map50": 0.5}) == key
    assert train_detectors.cache_key(cfg, {**spec, "epochs": 4}) != key
    assert train_detectors.cache_key({**cfg, "canvas": 64}, spec) != key
    monkeypatch.setattr(train_detectors, "SHAPES_VERSION", -1)
    assert train_detectors.cache_key(cfg, spec) != key
    monkeypatch.undo()
    monkeypatch.setenv("ICM_WEIGHTS_DIR", str(tmp_path / "weights"))
    trained = tmp_path / "weights" / "trained"
    trained.mkdir(parents=True)
    (trained / "base.pt").write_bytes(b"one")          # the weights it starts from appear, then change
    with_base = train_detectors.cache_key(cfg, spec)
    assert with_base != key
    (trained / "base.pt").write_bytes(b"two")
    assert train_detectors.cache_key(cfg, spec) != with_base
