"""Machine-side adaptation of a frozen codec (issue: Adapt-ICMH adapters, dynamic adaptation g_t,
latent refinement): shapes and identity at initialisation, frozen-base invariants after training,
the g_t loss is the detector's own batch mean and g_t trains on the x̂ the codec decodes,
refinement lowers the real bitstream's objective on every wrapper and decodes with the stock
decoder, each method trains through the one loop and resumes, and the evaluation stage decodes
them."""

import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from compressai.layers import MaskedConv2d
from skimage import data as skdata

from icm.codecs import UGICM, DynamicCodec
from icm.codecs.adapt_icmh import SFMA
from icm.codecs.refine import compress_latent, refine_latent
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
    boxes, labels = [torch.tensor([[10.0, 10.0, 40.0, 40.0]]), torch.tensor([[2.0, 30.0, 60.0, 50.0]])], \
        [torch.tensor([1]), torch.tensor([0])]
    x_bar = model(x)["x_bar"]
    value = criterion(x_bar, boxes, labels, seed=0)
    alone = [float(total(det.loss(x_bar[i:i + 1].detach(), [{"boxes": boxes[i], "labels": labels[i], "seed": i}])))
             for i in range(2)]
    assert alone[0] != pytest.approx(alone[1])
    assert float(value) == pytest.approx((alone[0] + alone[1]) / 2, rel=1e-5)   # the batch mean, not the sum
    value.backward()
    assert model.g_t.tail.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in det.parameters())           # the detector never trains


def _decode_modes(model):
    """(human, machine) decompress settings of a codec, as the evaluation stage decodes it."""
    if isinstance(model, UGICM):
        return {"beta": 0.0}, {"beta": 1.0}
    if isinstance(model, DynamicCodec):
        return {"machine": False}, {"machine": True}
    return {}, {}


@pytest.mark.parametrize("name", ["bmshj2018-hyperprior", "dynamic:mbt2018-mean", "ugicm:mbt2018",
                                  "adapt_icmh:bmshj2018-hyperprior"])
def test_latent_refinement_lowers_the_real_bitstreams_objective_on_every_codec(name):
    torch.manual_seed(0)
    extra = {"adapt_icmh": {"mid": 8}, "dynamic": {"post_channels": 16}, "ugicm": {"cond_dim": 16}}
    model = build_codec(name, **TINY, **extra.get(name.partition(":")[0], {}))
    with torch.no_grad():   # move the machine-side parts off the identity: x̄ must differ from x̂
        for key, p in model.named_parameters():
            if key.startswith(("g_t.", "codec.g_s.blocks.", "codec.g_s.mlp.")) or ".adapters." in key:
                p.add_(0.05 * torch.randn_like(p))
        for m in model.modules():   # CompressAI's MaskedConv2d zeroes its masked weights in place at its first forward
            if isinstance(m, MaskedConv2d):
                m.weight.mul_(m.mask)
    model.eval().update(force=True)
    weights = _digest(model.state_dict())
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    goal = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    seen = []

    def machine_loss(x_bar):    # stands in for a detector's loss: pulls the machine decode towards `goal`
        seen.append(x_bar.detach().clone())
        return 100 * F.mse_loss(x_bar, goal)
    lmbda = 0.01
    y, history = refine_latent(model, x, machine_loss, steps=6, lr=1.0, lmbda=lmbda, lmbda_machine=1.0)
    human_kw, machine_kw = _decode_modes(model)

    def real_objective(bits):   # of the bytes actually written and the decodes actually read
        nbytes = sum(len(s) for group in bits["strings"] for s in group)
        with torch.no_grad():
            human = model.decompress(bits["strings"], bits["shape"], **human_kw)["x_hat"]
            machine = model.decompress(bits["strings"], bits["shape"], **machine_kw)["x_hat"]
        return 8 * nbytes / (64 * 64) + lmbda * 255 ** 2 * float(F.mse_loss(human, x)) + float(machine_loss(machine)), \
            human, machine
    with torch.no_grad():
        plain_bits = model.compress(x)
    plain, plain_human, plain_machine = real_objective(plain_bits)
    # step 0 worked on the decodes of the unrefined bitstream: L_det on the machine decode, MSE on the human one
    assert (seen[0] - plain_machine).abs().max() < 1e-4
    if human_kw:
        assert (plain_machine - plain_human).abs().max() > 1e-3
    assert history[0]["mse"] == pytest.approx(float(F.mse_loss(plain_human, x)), rel=1e-3)
    assert min(h["objective"] for h in history) < history[0]["objective"]
    refined, _, _ = real_objective(compress_latent(model, x, y))
    assert refined < plain, (refined, plain)
    assert _digest(model.state_dict()) == weights     # the codec itself is untouched


def test_refined_bitstreams_decode_with_a_stock_codec():
    codec = build_codec("bmshj2018-hyperprior", **TINY).eval()
    codec.update(force=True)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    y, history = refine_latent(codec, x, None, steps=8, lr=1.0, lmbda=0.1)
    out = compress_latent(codec, x, y)
    stock = build_codec("bmshj2018-hyperprior", **TINY).eval()      # a separately built, untouched decoder
    stock.update(force=True)
    decoded = stock.decompress(out["strings"], out["shape"])["x_hat"]
    with torch.no_grad():
        plain = stock.decompress(**stock.compress(x))["x_hat"]
    assert float(F.mse_loss(decoded, x)) < float(F.mse_loss(plain, x))
    assert torch.equal(codec.g_a(x), stock.g_a(x))                    # the encoder was put back


@pytest.mark.parametrize("name", ["dynamic:bmshj2018-hyperprior", "dynamic:mbt2018"])
def test_frozen_codec_under_dynamic_trains_g_t_on_the_decoded_x_hat(name):
    from icm.train.codec import DynamicObjective

    model = build_codec(name, **TINY, post_channels=16)
    model.update(force=True)
    objective = DynamicObjective({"type": "dynamic", "lmbda": 0.01, "lmbda_machine": 1.0,
                                  "detector": {"name": "yolov8n", "weights": "random:3"}},
                                 {"dataset_classes": CLASSES, "canvas": 64}, model, "cpu")
    objective.set_trainable(model)
    model.train()                                   # as the training loop leaves it
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    out, again = model(x), model(x)
    assert torch.equal(out["x_hat"], again["x_hat"])                 # rounding, not training noise
    assert out["x_hat"].min() >= 0 and out["x_hat"].max() <= 1
    with torch.no_grad():
        decoded = torch.cat([model.decompress(**model.compress(x[i:i + 1]))["x_hat"] for i in range(2)])
        noisy = model.codec(x)["x_hat"]             # the train-mode forward g_t used to see
        model.codec.eval()
        integer_grid = model.codec(x)["x_hat"].clamp(0, 1)
    assert (out["x_hat"] - decoded).abs().max() < 1e-5
    assert (noisy.clamp(0, 1) - decoded).abs().max() > 1e-3
    if name.endswith("mbt2018"):    # the context model's own eval forward is not its bitstream's decode
        assert (integer_grid - decoded).abs().max() > 1e-4
    assert torch.equal(out["x_bar"], model.g_t(out["x_hat"]))
    out["x_bar"].sum().backward()
    assert all(p.grad is None for p in model.codec.parameters())


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
                            "refine": {"steps": 2, "lr": 0.5, "lmbda": 0.01, "detector": detector}},
                           {"label": "dyn-refined", **codec, "weights": model,
                            "refine": {"steps": 2, "lr": 0.5, "lmbda": 0.01, "detector": detector}}]}
    result = evaluate.run(eval_cfg)
    keys = {(p["curve"], p["decode"]) for p in result["rd_points"]}
    assert {("dyn", "human"), ("dyn", "machine"), ("refined", "single"), ("dyn-refined", "human"),
            ("dyn-refined", "machine")} <= keys
    for curve in ("refined", "dyn-refined"):
        refined = next(p for p in result["rd_points"] if p["curve"] == curve)
        assert refined["refine_seconds_per_image"] > 0 and refined["params"]["refine"]["lmbda_machine"] == 1.0


def _adaptation_module():
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines" / "experiments"))
    return importlib.import_module("adaptation")


def test_matched_rate_picks_the_nearest_candidate_within_the_tolerance():
    matched_rate = _adaptation_module().matched_rate
    assert matched_rate({"t4": 0.30, "t16": 0.43, "t64": 0.41}, 0.40) == "t64"
    assert matched_rate({"t4": 0.30, "t16": 0.44}, 0.40) == "t16"              # +10 % is within
    assert matched_rate({"t4": 0.30, "t16": 0.45}, 0.40) is None               # +12.5 % is not
    assert matched_rate({"t4": 0.355, "t16": 0.45}, 0.40, tolerance=0.15) == "t4"
    assert matched_rate({}, 0.40) is None


def _write_evaluation(out, images, codecs):
    """An evaluation output as pipelines/evaluate.py writes it: the manifest and the points of each
    (curve, decode) — per image its bpp, PSNR and detections."""
    import json as _json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from icm.metrics.codec_eval import POINT_SCHEMA

    (out / "points").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([
        {"source_id": sid, "status": "ok", "width": 64, "height": 64,
         "gt": _json.dumps({"boxes": [box], "class_names": ["a"]})} for sid, box in images.items()]),
        out / "manifest.parquet")
    rows = []
    for (curve, decode), per_image in codecs.items():
        for sid, (bpp, psnr, found) in per_image.items():
            dets = {"boxes": [images[sid]] if found else [], "scores": [0.9] if found else [],
                    "labels": [0] if found else []}
            rows.append({"source_id": sid, "curve": curve, "point": 0, "params": _json.dumps({"type": curve}),
                         "decode": decode, "bytes": int(bpp * 64 * 64 / 8), "bpp": bpp, "psnr": psnr, "ms_ssim": 0.9,
                         "detections": _json.dumps({"d": dets}), "info": "{}"})
    pq.write_table(pa.Table.from_pylist(rows, schema=POINT_SCHEMA), out / "points" / "u.parquet")


def test_adaptation_table_gives_paired_bootstrap_deltas_against_the_base(tmp_path):
    from icm.metrics.codec_eval import image_points

    adaptation = _adaptation_module()
    images = {"i1": [4.0, 4.0, 30.0, 30.0], "i2": [10.0, 10.0, 50.0, 40.0], "i3": [20.0, 5.0, 60.0, 60.0]}

    def per_image(bpp, psnr, found):
        return {sid: (b, p, f) for sid, b, p, f in zip(images, bpp, psnr, found)}
    base = per_image([0.4] * 3, [30.0, 31.0, 32.0], [True, True, False])
    codecs = {("base", "single"): base,
              ("adapt_icmh-t4", "single"): per_image([0.48] * 3, [29.0, 30.0, 31.0], [True, True, True]),
              ("adapt_icmh-t16", "single"): per_image([0.42] * 3, [30.5, 31.5, 32.5], [True, False, True]),
              ("dynamic", "human"): base,
              ("dynamic", "machine"): per_image([0.4] * 3, [25.0, 25.0, 25.0], [True, True, True]),
              ("refined", "single"): per_image([0.4, 0.4, 0.7], [29.0, 30.0, 31.0], [True, True, True])}
    _write_evaluation(tmp_path, images, codecs)
    results = image_points(str(tmp_path), [{"label": "d", "name": "oracle"}], ["a"])
    table = adaptation.analyse(results, ["adapt_icmh-t4", "adapt_icmh-t16"], ["d"], {"bootstrap": 100, "seed": 1},
                               0.10, {"d": "seen"})
    # by hand: one class, one box per image, each found box a hit at score 0.9; the base finds 2 of 3
    # objects, so its 101-point AP is 67/101 (precision 1 up to recall 2/3, none after)
    assert table["base"]["map50"]["d"] == pytest.approx(67 / 101)
    methods = table["methods"]
    assert methods["dynamic"]["delta_map50/d"] == pytest.approx(1 - 67 / 101)          # x̄ finds all three
    assert methods["dynamic"]["delta_psnr"] == 0.0 and methods["dynamic"]["delta_psnr_ci"] == [0.0, 0.0]
    assert methods["refined"]["delta_psnr"] == pytest.approx(-1.0)
    assert methods["refined"]["delta_psnr_ci"] == pytest.approx([-1.0, -1.0])          # the same shift on every image
    assert methods["refined"]["delta_bpp_percent"] == pytest.approx(25.0)               # 0.5 vs 0.4 bpp on average
    assert methods["adapt_icmh-t16"]["delta_map50/d"] == pytest.approx(0.0)             # finds i3, misses i2
    lo, hi = methods["adapt_icmh-t16"]["delta_map50/d_ci"]
    assert lo < 0 < hi                       # which of i2 / i3 a resample draws more often decides the sign
    lo, hi = methods["dynamic"]["delta_map50/d_ci"]
    assert 0 <= lo and hi > 0.3              # paired: never worse than the base on the same images
    assert table["adapter_matched"] == "adapt_icmh-t16"                                  # +5 %, not +20 %
    md = adaptation.markdown(table, {})
    assert "adapt_icmh-t16 — **matched rate**" in md and "adapt_icmh-t4 (rate not matched)" in md
    assert "| refined (rate not matched) |" in md and "| dynamic |" in md       # +25 % bpp; g_t: the base's rate
