"""Machine-side adaptation of a frozen codec (issue: Adapt-ICMH adapters, dynamic adaptation g_t,
latent refinement): shapes and identity at initialisation, frozen-base invariants after training,
the g_t loss is the detector's own, refined bitstreams decode with the stock decoder, each method
trains through the one loop and resumes, and the evaluation stage decodes them."""

import hashlib

import numpy as np
import pytest
import torch
from skimage import data as skdata

from icm.codecs.adapt_icmh import SFMA
from icm.codecs.dynamic import compress_latent, refine_latent
from icm.detectors import total
from icm.losses.task import DetectorTrainingLoss, FeaturePerceptualLoss
from icm.train.codec import train_codec_loop
from icm.train.inputs import crop_pair
from icm.train.session import LocalSession
from icm.zoo import build_codec, build_detector

TINY = {"quality": 1, "channels": [16, 24], "weights": "random:0"}
CLASSES = ["a", "b"]


@pytest.fixture(scope="module")
def rows():
    rng = np.random.default_rng(0)
    img = np.ascontiguousarray(skdata.astronaut()[::4, ::4])
    return [crop_pair(img, img, np.array([[20, 20, 90, 100], [5, 5, 30, 40]]), 64, rng, np.array([1, 0]))
            for _ in range(8)]


def _digest(tensors):
    h = hashlib.sha256()
    for k, v in sorted(tensors.items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _cfg(codec, loss, steps, **extra):
    return {"codec": {"name": codec, **TINY, "mid": 8, "post_channels": 16}, "steps": steps, "batch_size": 4,
            "lr": 5e-3, "loss": loss, "log_every": 1, "checkpoint_every": 100, "seed": 0,
            "dataset_classes": CLASSES, "canvas": 64, **extra}


def test_sfma_shapes_and_the_untrained_adapter_is_the_identity():
    x = torch.rand(2, 24, 16, 12)
    adapter = SFMA(24, mid=8)
    assert adapter(x).shape == x.shape and torch.equal(adapter(x), x)
    torch.nn.init.normal_(adapter.freq_up.weight)                 # once trained, both branches act
    assert adapter.frequency(x).shape == x.shape and not torch.equal(adapter(x), x)
    adapted = build_codec("adapt_icmh:bmshj2018-hyperprior", **TINY, mid=8).eval()
    assert list(adapted.codec.g_a.adapters) == ["1", "3", "5"] and list(adapted.codec.g_s.adapters) == ["1", "3", "5"]
    base = build_codec("bmshj2018-hyperprior", **TINY).eval()
    img = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(adapted(img)["x_hat"], base(img)["x_hat"])


def test_adapters_train_and_the_base_codec_stays_bit_identical(rows, tmp_path):
    loss = {"type": "adapt_icmh", "task": "detection", "preset": 3, "model": {"name": "yolov8n", "weights": "random:3"}}
    before = build_codec("adapt_icmh:bmshj2018-hyperprior", **TINY, mid=8)
    before.update(force=True)
    base_keys = [k for k in before.state_dict() if ".adapters." not in k]
    session = LocalSession({"train": rows}, tmp_path)
    trained = train_codec_loop(_cfg("adapt_icmh:bmshj2018-hyperprior", loss, 8), session)
    trained.update(force=True)
    after = trained.state_dict()
    assert _digest({k: before.state_dict()[k] for k in base_keys}) == _digest({k: after[k] for k in base_keys})
    assert any(not torch.equal(before.state_dict()[k], after[k]) for k in after if ".adapters." in k)
    cdf = [k for k in base_keys if k.endswith("quantized_cdf")]
    assert cdf and all(torch.equal(before.state_dict()[k], after[k]) for k in cdf)
    # the frozen codec's own bitstream is unchanged: a plain codec loaded from the adapted
    # checkpoint's base keys writes and reads the same bytes as the codec before training
    plain = build_codec("bmshj2018-hyperprior", **TINY).eval()
    plain.load_state_dict({k: after[k] for k in base_keys})
    plain.update(force=True)
    reference = build_codec("bmshj2018-hyperprior", **TINY).eval()
    reference.update(force=True)
    x = torch.rand(1, 3, 64, 64)
    a, b = plain.compress(x), reference.compress(x)
    assert a["strings"] == b["strings"]
    assert torch.equal(plain.decompress(**a)["x_hat"], reference.decompress(**b)["x_hat"])
    assert [r["loss"] for r in session.reports][-1] < [r["loss"] for r in session.reports][0]


def test_perceptual_losses_compare_frozen_features():
    det = build_detector("fasterrcnn_mobilenet_v3_large_fpn", CLASSES, weights="random:1", image_size=64).freeze()
    loss = FeaturePerceptualLoss("detection", det)
    x = torch.rand(2, 3, 64, 64)
    assert float(loss(x, x)) == 0.0
    x_hat = (x + 0.1 * torch.randn_like(x)).requires_grad_(True)
    value = loss(x_hat, x)
    expected = 0.2 * sum(torch.nn.functional.mse_loss(a, b) for a, b in zip(det.features(x_hat), det.features(x)))
    assert float(value) == pytest.approx(float(expected), rel=1e-5) and float(value) > 0
    value.backward()
    assert x_hat.grad.abs().sum() > 0 and all(p.grad is None for p in det.parameters())


def test_post_decoder_is_the_identity_at_init_and_its_loss_is_the_detectors_own():
    model = build_codec("dynamic:bmshj2018-hyperprior", **TINY, post_channels=16)
    x = torch.rand(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert torch.equal(out["x_bar"], out["x_hat"])
    torch.nn.init.normal_(model.g_t.tail.weight, std=0.01)
    det = build_detector("yolov8n", CLASSES, weights="random:3", image_size=64)
    criterion = DetectorTrainingLoss(det, CLASSES)
    boxes, labels = [torch.tensor([[10.0, 10.0, 40.0, 40.0]])] * 2, [torch.tensor([1])] * 2
    x_bar = model(x)["x_bar"]
    value = criterion(x_bar, boxes, labels, seed=0)
    targets = [{"boxes": boxes[i], "labels": labels[i], "seed": i} for i in range(2)]
    assert float(value) == pytest.approx(float(total(det.loss(x_bar.detach(), targets))), rel=1e-6)
    value.backward()
    assert model.g_t.tail.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in det.parameters())           # the detector never trains


def test_latent_refinement_lowers_its_objective_and_decodes_with_the_stock_codec():
    codec = build_codec("bmshj2018-hyperprior", **TINY).eval()
    codec.update(force=True)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))

    def objective(x_hat):       # a fidelity objective: a random codec has a lot to gain per image
        return 1000 * torch.nn.functional.mse_loss(x_hat, x)
    y, history = refine_latent(codec, x, objective, steps=8, lr=1.0)
    assert min(history) < history[0]
    out = compress_latent(codec, x, y)
    stock = build_codec("bmshj2018-hyperprior", **TINY).eval()      # a separately built, untouched decoder
    stock.update(force=True)
    decoded = stock.decompress(out["strings"], out["shape"])["x_hat"].clamp(0, 1)
    with torch.no_grad():
        plain = stock.decompress(**stock.compress(x))["x_hat"].clamp(0, 1)
    assert float(objective(decoded)) < float(objective(plain))
    assert torch.equal(codec.g_a(x), stock.g_a(x))                    # the encoder was put back


@pytest.mark.parametrize("codec,loss", [
    ("adapt_icmh:bmshj2018-hyperprior", {"type": "adapt_icmh", "task": "classification", "preset": 0,
                                         "model": {"name": "resnet18", "weights": "random:3"}}),
    ("dynamic:bmshj2018-hyperprior", {"type": "dynamic_joint", "lmbda": 0.01, "lmbda_machine": 0.1,
                                      "detector": {"name": "yolov8n", "weights": "random:3"}})])
def test_each_method_resumes_equal_to_an_uninterrupted_run(rows, tmp_path, codec, loss):
    straight = train_codec_loop(_cfg(codec, loss, 5), LocalSession({"train": rows}, tmp_path / "a"))
    train_codec_loop(_cfg(codec, loss, 3, checkpoint_every=3), LocalSession({"train": rows}, tmp_path / "b"))
    resumed = train_codec_loop(_cfg(codec, loss, 5), LocalSession({"train": rows}, tmp_path / "b"))
    assert _digest(straight.state_dict()) == _digest(resumed.state_dict())


@pytest.mark.slow
def test_dynamic_adaptation_through_ray_train_and_the_evaluation_stage(ray_cluster, small_shapes, tmp_path,
                                                                         monkeypatch):
    import evaluate
    import train_codec

    monkeypatch.setenv("ICM_WEIGHTS_DIR", str(tmp_path / "weights"))
    shapes = {"type": "shapes", "domain": "photo", "n_train": 24, "n_val": 12, "seed": 7}
    codec = {"name": "dynamic:bmshj2018-hyperprior", **TINY, "post_channels": 16}
    detector = {"name": "yolov8n", "weights": "random:5"}
    cfg = {"name": "dyn", "dataset": {**shapes, "split": "train"}, "out_dir": str(tmp_path / "train"), "crop": 64,
           "codec": codec, "loss": {"type": "dynamic", "lmbda_machine": 1.0, "detector": detector},
           "steps": 3, "batch_size": 4, "lr": 1e-3, "checkpoint_every": 3, "log_every": 1, "seed": 0, "threads": 1,
           "canvas": 64, "workers": {"num_workers": 1, "cpus_per_worker": 0.5}, "data": {"num_cpus": 0.5}}
    first = train_codec.run(cfg)
    again = train_codec.run({**cfg, "steps": 5})                  # same name + storage: resumes at step 3
    assert first["steps"] == 3 and again["steps"] == 5 and again["final_metrics"]["step"] == 5
    model = str(tmp_path / "train" / "model.pth")
    eval_cfg = {"dataset": {**shapes, "split": "val"}, "out_dir": str(tmp_path / "eval"), "limit": 2, "canvas": 64,
                "device": "cpu", "batch_size": 2, "workers": {"actors": 1, "num_cpus": 0.5},
                "detectors": [{"label": "y", **detector}],
                "codecs": [{"label": "dyn", **codec, "weights": model},
                           {"label": "refined", "name": "bmshj2018-hyperprior", **TINY,
                            "refine": {"steps": 2, "lr": 0.5, "lmbda": 1.0, "detector": detector}}]}
    result = evaluate.run(eval_cfg)
    keys = {(p["curve"], p["decode"]) for p in result["rd_points"]}
    assert {("dyn", "human"), ("dyn", "machine"), ("refined", "single")} <= keys
    refined = next(p for p in result["rd_points"] if p["curve"] == "refined")
    assert refined["refine_seconds_per_image"] > 0
