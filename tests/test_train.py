"""The shared training harness: the detector loop learns, resumes to the same weights as an
uninterrupted run, and runs on Ray Train with checkpoint-based resume."""

import numpy as np
import pytest
import torch
import torchvision

from icm.data.samples import shapes_reader
from icm.train.detectors import train_detector_loop
from icm.train.session import LocalSession
from icm.zoo import build_detector


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
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_ray_train_harness_resumes_from_checkpoint(ray_cluster, small_shapes, tmp_path):
    from icm.train.ray_trainer import final_state, fit

    from icm.data.ray_io import records_dataset

    reader = shapes_reader("photo", "train", root=small_shapes.parent, n_train=24, n_val=12, seed=7)

    def run(epochs):
        return fit(train_detector_loop, {**_config(epochs), "threads": 1}, name="cn-test", storage_path=tmp_path,
                   datasets={"train": records_dataset(reader, num_cpus=0.5)}, cpus_per_worker=0.5)

    first = run(1)
    assert final_state(first)["epoch"] == 0 and first.metrics["epoch"] == 0
    second = run(2)  # same name + storage path: continues from the epoch-0 checkpoint
    state = final_state(second)
    assert state["epoch"] == 1 and state["step"] == 2 * 6
    assert second.metrics["epoch"] == 1


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
    data, suffix, train_s = train_detectors.train_one(cfg, detector, tmp_path / "out", cfg["workers"], run="cn-run")
    assert suffix == ".pth" and train_s > 0
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
