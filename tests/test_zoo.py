"""Weights specs: random (seeded), local files (weights_only), URLs failing fast, hub names; a job's bad
weights (missing, unknown, code-carrying, misfitting) refused on the driver in one line."""

import socket
import threading
import time
from contextlib import contextmanager

import pytest
import torch

from icm.zoo import WeightsUnavailable, build_classifier, build_clip, build_codec, build_detector, resolve, sha256_file
from icm.zoo.codecs import _compressai_hub

CLASSES = ["a", "b"]


def _params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_random_weights_are_seeded():
    a = build_codec("bmshj2018-factorized", 1, weights="random:3")
    b = build_codec("bmshj2018-factorized", 1, weights="random:3")
    c = build_codec("bmshj2018-factorized", 1, weights="random:4")
    assert torch.equal(_params(a), _params(b)) and not torch.equal(_params(a), _params(c))
    assert a.icm_provenance == {"name": "bmshj2018-factorized@q1", "family": "compressai",
                                "weights": "random:3", "sha256": "random:3"}


def test_local_checkpoint_round_trip(tmp_path):
    codec = build_codec("bmshj2018-hyperprior", 1, weights="random:5")
    codec.update(force=True)
    torch.save(codec.state_dict(), tmp_path / "codec.pth")
    loaded = build_codec("bmshj2018-hyperprior", 1, weights=str(tmp_path / "codec.pth"))
    assert torch.equal(_params(codec), _params(loaded))
    assert loaded.icm_provenance["sha256"] == sha256_file(tmp_path / "codec.pth")

    det = build_detector("centernet_resnet18", CLASSES, weights="random:2")
    torch.save({"state_dict": det.state_dict()}, tmp_path / "cn.pth")
    assert torch.equal(_params(det), _params(build_detector("centernet_resnet18", CLASSES,
                                                            weights=str(tmp_path / "cn.pth"))))
    clf = build_classifier("resnet18", weights="random:1", num_classes=3)
    torch.save(clf.state_dict(), tmp_path / "clf.pth")
    assert torch.equal(_params(clf), _params(build_classifier("resnet18", weights=str(tmp_path / "clf.pth"),
                                                              num_classes=3)))


class Payload:
    """Stands for arbitrary pickled code in a checkpoint."""


def test_checkpoints_with_pickled_objects_are_refused(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(1)}, "evil": Payload()}, tmp_path / "bad.pth")
    with pytest.raises(WeightsUnavailable, match="weights_only=True"):
        build_codec("bmshj2018-factorized", 1, weights=str(tmp_path / "bad.pth"))


def test_ultralytics_checkpoint_through_its_safe_loader(tmp_path):
    det = build_detector("yolov8n", CLASSES, weights="random:4")
    torch.save({"model": det.model.half()}, tmp_path / "yolo.pt")  # ultralytics' own layout (fp16)
    loaded = build_detector("yolov8n", CLASSES, weights=str(tmp_path / "yolo.pt"))
    torch.testing.assert_close(_params(loaded), _params(det.float()))


def test_unreachable_download_fails_fast_with_advice(monkeypatch, tmp_path):
    monkeypatch.setenv("ICM_WEIGHTS_DIR", str(tmp_path))
    url = "http://127.0.0.1:9/weights/model.pth"  # loopback, nothing listens on the discard port
    start = time.time()
    with pytest.raises(WeightsUnavailable) as err:
        build_codec("bmshj2018-factorized", 1, weights=url)
    assert time.time() - start < 10
    assert url in str(err.value) and "local path" in str(err.value)
    with pytest.raises(WeightsUnavailable, match="neither"):
        resolve("no/such/file.pth")


@contextmanager
def _server(reply: bytes = b"", then: str = "stall"):
    """A loopback TCP server that accepts every connection, sends ``reply`` and then either stays
    silent (``stall``, as a host behind a dead proxy) or closes the connection (``close``)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    held, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            conn.recv(65536)
            conn.sendall(reply)
            if then == "close":
                conn.close()
            else:
                held.append(conn)
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/weights/model.pth"
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()


PARTIAL = b"HTTP/1.0 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"w" * 1000


@pytest.mark.timeout(60)   # without a timeout on the connection the download would hang here
@pytest.mark.parametrize("reply,then", [(b"", "stall"), (PARTIAL, "stall"), (PARTIAL, "close")],
                         ids=["silent", "stalls-mid-file", "closes-mid-file"])
def test_download_from_a_host_that_stops_answering_fails_fast_and_leaves_nothing(monkeypatch, tmp_path, reply,
                                                                                 then):
    """A host that accepts the connection and never answers (or stops mid-file, or hangs up
    mid-file) fails after the download timeout with advice, and no partial file is left in the
    weights cache (a truncated file there would be taken for the weights next time)."""
    import icm.zoo.weights as weights

    monkeypatch.setenv("ICM_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setattr(weights, "DOWNLOAD_TIMEOUT_S", 1.0)
    with _server(reply, then) as url:
        start = time.time()
        with pytest.raises(WeightsUnavailable) as err:
            build_codec("bmshj2018-factorized", 1, weights=url)
        assert time.time() - start < 15
    assert url in str(err.value) and "local path" in str(err.value)
    if then == "stall":
        assert "timed out" in str(err.value)
    assert [p.name for p in (tmp_path / "weights").rglob("*")] == []


def test_hub_names_resolve_to_published_urls():
    """CompressAI's published checkpoints, one per architecture, metric and quality."""
    root = "https://compressai.s3.amazonaws.com/models/v1/"
    assert _compressai_hub("bmshj2018-hyperprior", 3)("compressai:mse") == root + "bmshj2018-hyperprior-3-6d87be32.pth.tar"
    assert _compressai_hub("bmshj2018-hyperprior", 2)("compressai") == root + "bmshj2018-hyperprior-2-93677231.pth.tar"
    assert _compressai_hub("mbt2018-mean", 5)("compressai:ms-ssim") == root + "mbt2018-mean-ms-ssim-5-1be7f059.pth.tar"
    assert _compressai_hub("bmshj2018-hyperprior-vbr", 4)("compressai:mse") == \
        root + "bmshj2018-hyperprior-mse-vbr-cddd26be.pth.tar"          # one checkpoint for every rate
    with pytest.raises(WeightsUnavailable, match="no bmshj2018-hyperprior weights"):
        _compressai_hub("bmshj2018-hyperprior", 3)("compressai:nosuchmetric")
    with pytest.raises(WeightsUnavailable, match="at quality 9"):
        _compressai_hub("bmshj2018-hyperprior", 9)("compressai:mse")


def test_every_compressai_image_arch_builds():
    from compressai.zoo import image_models

    for arch in image_models:
        model = build_codec(arch, 1, weights="random")
        assert model.icm_provenance["family"] == "compressai"


def test_a_detector_job_never_imports_compressai():
    """Codecs register on their first lookup: an OW-JRD or MAA actor (its stage modules imported)
    that builds only a detector does not pay CompressAI's import (SciPy, torch_geometric: ~1.3 s of CPU per actor), and a
    codec name still resolves from a fresh process."""
    import subprocess
    import sys

    script = ("import sys; import icm.jrd.stage, icm.maa.stage; from icm.zoo import build_codec, build_detector; "
              "build_detector('yolov8n', classes=['a', 'b'], weights='random:0', canvas=64); "
              "print('compressai' in sys.modules); build_codec('bmshj2018-factorized', 1, weights='random'); "
              "print('compressai' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-2:] == ["False", "True"], out.stdout + out.stderr


def test_clip_random_and_local(tmp_path):
    clip = build_clip("RN50", weights="random:0")
    torch.save(clip.state_dict(), tmp_path / "clip.pth")
    again = build_clip("RN50", weights=str(tmp_path / "clip.pth"))
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_image(x), again.encode_image(x))


class RunsCode:
    """A checkpoint that would run a shell command when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def _one_line_refusal(err, *must):
    text = str(err.value.code if isinstance(err.value, SystemExit) else err.value)
    assert "\n" not in text and "weights_only=False" not in text, text
    for part in must:
        assert part in text, (part, text)
    return text


@pytest.mark.parametrize("pickled_with", ["torch.save", "pickle"])
def test_code_carrying_checkpoint_is_refused_on_the_driver_in_one_line(tmp_path, pickled_with):
    """Through the evaluation job's and a training job's own paths: refused before any worker
    (or Ray) starts, in one line naming the config key, the file and the fix; the payload never runs."""
    import pickle

    import evaluate
    import train_codec

    marker = tmp_path / "payload-ran"
    bad = tmp_path / "codec.pth"
    if pickled_with == "torch.save":
        torch.save({"state_dict": RunsCode(marker)}, bad)
    else:
        bad.write_bytes(pickle.dumps({"state_dict": RunsCode(marker)}, protocol=2))
    shapes = {"type": "shapes", "domain": "photo", "n_train": 24, "n_val": 12, "seed": 7}
    codec = {"name": "ugicm:bmshj2018-hyperprior", "quality": 1, "channels": [16, 24], "cond_dim": 32}
    eval_cfg = {"dataset": {**shapes, "split": "val"}, "out_dir": str(tmp_path / "eval"),
                "codecs": [{"label": "ug", **codec, "weights": str(bad)}],
                "detectors": [{"label": "y", "name": "yolov8n", "weights": "random:5"}], "canvas": 128}
    with pytest.raises(SystemExit) as err:
        evaluate.run(eval_cfg)
    _one_line_refusal(err, "codecs[0].weights", str(bad), "posix.system", "torch.save(model.state_dict()")
    train_cfg = {"name": "t", "dataset": {**shapes, "split": "train"}, "out_dir": str(tmp_path / "train"), "crop": 64,
                 "codec": {**codec, "weights": "random:0", "base_weights": str(bad)},
                 "loss": {"type": "ugicm", "lmbda": 0.01, "lmbda_machine": 0.005, "lmbda_clip": 0}, "steps": 2}
    with pytest.raises(SystemExit) as err:
        train_codec.run(train_cfg)
    _one_line_refusal(err, "codec.base_weights", str(bad), "posix.system")
    assert not marker.exists()
    assert not (tmp_path / "eval" / "job_params.json").exists()      # refused before the job started


def test_missing_unknown_and_misfitting_weights_fail_on_the_driver(tmp_path, monkeypatch):
    import evaluate

    monkeypatch.setenv("ICM_WEIGHTS_DIR", str(tmp_path / "weights"))
    shapes = {"type": "shapes", "domain": "photo", "n_train": 24, "n_val": 12, "seed": 7}
    jpeg = {"label": "jpeg", "ladder": {"type": "jpeg", "qualities": [50]}}

    def run_with(detector):
        cfg = {"dataset": {**shapes, "split": "val"}, "out_dir": str(tmp_path / "eval"), "codecs": [jpeg],
               "detectors": [{"label": "y", "weights": "random:1", "name": "yolov8n"}, detector], "canvas": 128}
        with pytest.raises(SystemExit) as err:
            evaluate.run(cfg)
        return err

    _one_line_refusal(run_with({"label": "z", "name": "yolov8n", "weights": "trained:no-such-label"}),
                      "detectors[1].weights", "no-such-label", "train it first")
    _one_line_refusal(run_with({"label": "z", "name": "yolov8n", "weights": str(tmp_path / "nowhere.pt")}),
                      "detectors[1].weights", "nowhere.pt", "check the path")
    yolo = build_detector("yolov8n", ["circle", "square", "triangle", "cross"], weights="random:4")
    torch.save(yolo.state_dict(), tmp_path / "v8.pth")
    text = _one_line_refusal(run_with({"label": "z", "name": "yolo11n", "weights": str(tmp_path / "v8.pth")}),
                             "detectors[1]", "v8.pth", "yolo11n", "detectors[1].name")
    assert "size mismatch" in text, text      # yolo11n is not yolov8n: torch names the layers
