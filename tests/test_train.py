"""The shared training harness: the stream is a function of (seed, epoch) and resumes inside an
epoch; the detector loop learns and resumes to the same weights as an uninterrupted run; on Ray
Train a worker failure restarts from the checkpoint to the uninterrupted run's weights."""

import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
import torchvision

from icm.data.ray_io import select_refs
from icm.data.samples import shapes_reader
from icm.train.codec import train_codec_loop
from icm.train.detectors import train_detector_loop
from icm.train.session import LocalSession
from icm.zoo import build_detector
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


SHAPES = {"type": "shapes", "n_train": 24, "n_val": 12, "seed": 7}   # = small_shapes


def _detectors_cfg(tmp_path, detectors, **extra):
    return {"out_dir": str(tmp_path / "out"), "dataset": SHAPES, "canvas": 64, "seed": 0, "cross_domain": False,
            "workers": {"num_workers": 1, "cpus_per_worker": 0.5, "threads": 1}, "detectors": detectors, **extra}


def test_min_map50_gate_names_the_detectors_below_target(small_shapes, tmp_path, monkeypatch, capsys):
    """Cached detectors (keyed by their recipe) are not retrained; the driver prints the table
    and fails naming every detector below its min_map50, with the way out."""
    import json
    import sys

    import yaml

    import train_detectors

    monkeypatch.setenv("ICM_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setattr(train_detectors, "start_ray", lambda cfg, address: None)
    monkeypatch.setattr(train_detectors, "train_one", lambda *a, **k: pytest.fail("a cached detector was retrained"))
    specs = [{"label": "good", "name": "centernet_resnet18", "domain": "photo", "epochs": 1, "min_map50": 0.5},
             {"label": "poor", "name": "centernet_resnet18", "domain": "photo", "epochs": 2, "min_map50": 0.5},
             {"label": "free", "name": "centernet_resnet18", "domain": "sketch", "epochs": 1}]
    cfg = _detectors_cfg(tmp_path, specs)
    trained = tmp_path / "weights" / "trained"
    trained.mkdir(parents=True)
    for spec, map50 in zip(specs, (0.8, 0.31, 0.05)):
        (trained / f"{spec['label']}.pth").write_bytes(b"w")
        (trained / f"{spec['label']}.json").write_text(json.dumps({
            "cache_key": train_detectors.cache_key(cfg, spec), "weights": str(trained / f"{spec['label']}.pth"),
            "train_time_s": 12.0, "val": {"map50": map50}}))
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.setattr(sys, "argv", ["train_detectors.py", "--config", str(tmp_path / "cfg.yaml")])
    with pytest.raises(SystemExit) as stop:
        train_detectors.main()
    message = str(stop.value)
    assert "poor 0.310 < 0.5" in message and "good" not in message and "free" not in message
    assert "force=true" in message and "good.json" not in message
    out = capsys.readouterr().out
    assert any(line.startswith("good") and line.endswith("  ok") for line in out.splitlines())
    assert any(line.startswith("poor") and line.endswith("BELOW TARGET") for line in out.splitlines())
    table = json.loads((tmp_path / "out" / "detectors.json").read_text())["detectors"]
    assert [(r["label"], r["map50"], r["target"]) for r in table] == [("good", 0.8, 0.5), ("poor", 0.31, 0.5),
                                                                      ("free", 0.05, None)]


def test_evaluate_on_uses_the_domains_val_split_the_detectors_canvas_and_its_weights(small_shapes, tmp_path,
                                                                                     monkeypatch):
    import train_detectors

    from icm.zoo.weights import sha256_file

    det = build_detector("fasterrcnn_mobilenet_v3_large_fpn", ["circle", "square", "triangle", "cross"],
                         weights="random:4")
    torch.save(det.state_dict(), tmp_path / "cn.pth")
    seen = {}

    def evaluate(detector, records, canvas):
        seen.update(detector=detector, records=records, canvas=canvas)
        return {"loss": 1.0, "map": 0.1, "map50": 0.2}

    monkeypatch.setattr(train_detectors, "evaluate_detector", evaluate)
    spec = {"label": "fr", "name": "fasterrcnn_mobilenet_v3_large_fpn", "domain": "photo", "canvas": 96,
            "model_kwargs": {"box_detections_per_img": 7}}
    assert train_detectors.evaluate_on(_detectors_cfg(tmp_path, []), spec, str(tmp_path / "cn.pth"), "sketch") == \
        {"loss": 1.0, "map": 0.1, "map50": 0.2}
    assert seen["detector"].model.roi_heads.detections_per_img == 7          # the entry's model_kwargs
    assert seen["detector"].model.transform.max_size == 96                    # built for the entry's canvas
    assert seen["canvas"] == 96 and len(seen["records"]) == 12
    assert {r["source_id"].split("/")[0] for r in seen["records"]} == {"shapes-sketch-val"}
    assert seen["detector"].icm_provenance["sha256"] == sha256_file(tmp_path / "cn.pth")
    assert not seen["detector"].training and not any(p.requires_grad for p in seen["detector"].parameters())
    for k, v in det.state_dict().items():
        assert torch.equal(seen["detector"].state_dict()[k], v), k


@pytest.mark.slow
def test_train_backbone_then_a_detector_on_it_through_ray_train(ray_cluster, small_shapes, tmp_path, monkeypatch):
    """train_backbone pretrains a ResNet trunk on object crops and caches it as trained:<label>;
    train_one trains a detector from it with the Ray Train harness; evaluate_on scores it."""
    import json

    import train_detectors

    monkeypatch.setenv("ICM_WEIGHTS_DIR", str(tmp_path / "weights"))
    backbone = {"label": "bb", "name": "resnet18", "domain": "photo", "steps": 2, "batch_size": 8, "crop": 32}
    detector = {"label": "cn", "name": "centernet_resnet18", "domain": "photo", "trainer": "ray", "epochs": 1,
                "batch_size": 4, "lr": 2e-3, "precise_bn_batches": 1, "model_kwargs": {"backbone_weights": "trained:bb"}}
    cfg = _detectors_cfg(tmp_path, [detector], backbones=[backbone])
    info = train_detectors.train_backbone(cfg, backbone, tmp_path / "out", cfg["workers"])
    assert info["label"] == "bb" and 0.0 <= info["val"]["crop_accuracy"] <= 1.0 and info["train_time_s"] > 0
    weights = tmp_path / "weights" / "trained" / "bb.pth"
    state = torch.load(weights, weights_only=True)
    assert state["fc.weight"].shape == (5, 512)                  # 4 classes + background
    assert json.loads(weights.with_suffix(".json").read_text())["cache_key"] == train_detectors.cache_key(cfg, backbone)
    fresh = torchvision.models.resnet18(num_classes=5).state_dict()
    assert not torch.equal(state["conv1.weight"], fresh["conv1.weight"])
    monkeypatch.setattr(train_detectors, "fit", lambda *a, **k: pytest.fail("a cached backbone was retrained"))
    assert train_detectors.train_backbone(cfg, backbone, tmp_path / "out", cfg["workers"]) == info
    monkeypatch.undo()
    monkeypatch.setenv("ICM_WEIGHTS_DIR", str(tmp_path / "weights"))

    # the shared cluster's workers started before this test set ICM_WEIGHTS_DIR: they get the file itself
    detector["model_kwargs"]["backbone_weights"] = str(weights)
    data, suffix, train_s, resumed_at = train_detectors.train_one(cfg, detector, tmp_path / "out", cfg["workers"],
                                                                  run="cn-run")
    assert suffix == ".pth" and train_s > 0 and resumed_at == []
    (tmp_path / "cn.pth").write_bytes(data)
    trained = build_detector("centernet_resnet18", ["circle", "square", "triangle", "cross"],
                             weights=str(tmp_path / "cn.pth"), backbone_weights="trained:bb")
    start = build_detector("centernet_resnet18", ["circle", "square", "triangle", "cross"], weights="random:0",
                           backbone_weights="trained:bb")
    changed = [k for k, v in start.state_dict().items() if v.is_floating_point()
               and not torch.equal(v, trained.state_dict()[k])]
    assert any(k.startswith("heatmap.") for k in changed)      # the heads trained
    metrics = train_detectors.evaluate_on(cfg, detector, str(tmp_path / "cn.pth"), "photo")
    assert np.isfinite(metrics["loss"]) and 0.0 <= metrics["map50"] <= 1.0
