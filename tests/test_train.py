"""The shared training harness: the detector loop learns, resumes to the same weights as an
uninterrupted run, and runs on Ray Train with checkpoint-based resume."""

import pytest
import torch

from icm.data.samples import shapes_reader
from icm.train.detectors import train_detector_loop
from icm.train.session import LocalSession


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
