"""Weights specs: random (seeded), local files (weights_only), URLs failing fast, hub names."""

import time

import pytest
import torch

from icm.zoo import WeightsUnavailable, build_classifier, build_clip, build_codec, build_detector, resolve, sha256_file
from icm.zoo.models import _compressai_hub

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


def test_hub_names_resolve_to_published_urls():
    url = _compressai_hub("bmshj2018-hyperprior", 3)("compressai:mse")
    assert url.startswith("https://") and url.endswith(".pth.tar")
    with pytest.raises(WeightsUnavailable, match="no bmshj2018-hyperprior weights"):
        _compressai_hub("bmshj2018-hyperprior", 3)("compressai:nosuchmetric")


def test_every_compressai_image_arch_builds():
    from compressai.zoo import image_models

    for arch in image_models:
        model = build_codec(arch, 1, weights="random")
        assert model.icm_provenance["family"] == "compressai"


def test_clip_random_and_local(tmp_path):
    clip = build_clip("RN50", weights="random:0")
    torch.save(clip.state_dict(), tmp_path / "clip.pth")
    again = build_clip("RN50", weights=str(tmp_path / "clip.pth"))
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_image(x), again.encode_image(x))
