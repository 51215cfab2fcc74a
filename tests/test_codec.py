"""Codec training and evaluation: UG-ICM's conditioned decoder, losses going down, real bitstreams
against the likelihood estimate, resume equal to an uninterrupted run, DDP replicas bitwise equal
through Ray Train, the driver end to end, and evaluation numbers against direct CompressAI /
pycocotools calls."""

import hashlib
import json
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from skimage import data as skdata

from icm.codecs import UGICM, fourier_features
from icm.losses import bpp_of
from icm.metrics import code_image, psnr
from icm.metrics.bitstream import decode_again
from icm.train.codec import train_codec_loop
from icm.train.inputs import crop_pair
from icm.train.session import LocalSession
from icm.zoo import build_codec

TINY = {"quality": 1, "channels": [16, 24], "weights": "random:0"}


@pytest.fixture(scope="module")
def rows():
    rng = np.random.default_rng(0)
    img = np.ascontiguousarray(skdata.astronaut()[::4, ::4])
    maa = np.clip(img.astype(int) + rng.integers(-8, 9, img.shape), 0, 255).astype(np.uint8)
    return [crop_pair(img, maa, np.array([[20, 20, 90, 100]]), 64, rng) for _ in range(12)]


def _cfg(name, loss, steps, **extra):
    return {"codec": {"name": name, **TINY, **({"cond_dim": 32} if name.startswith("ugicm") else {})},
            "steps": steps, "batch_size": 4, "lr": 2e-3, "loss": loss, "log_every": 1, "checkpoint_every": 100,
            "seed": 0, **extra}


def test_crop_pair_applies_one_crop_and_flip_to_image_target_and_boxes():
    img = np.arange(100 * 80 * 3, dtype=np.uint8).reshape(100, 80, 3)
    target = 255 - img
    boxes = np.array([[10, 10, 30, 40], [70, 90, 79, 99]], np.float32)
    for seed in range(6):
        out = crop_pair(img, target, boxes, 48, np.random.default_rng(seed))
        assert out["x"].shape == out["target"].shape == (48, 48, 3)
        assert np.array_equal(255 - out["x"], out["target"])
        b = out["boxes"].reshape(-1, 4)
        assert np.all(b >= 0) and np.all(b <= 48) and np.all(b[:, 2] > b[:, 0])
    small = crop_pair(img[:30, :30], target[:30, :30], boxes[:1], 48, np.random.default_rng(0))
    assert small["x"].shape == (48, 48, 3)
    with pytest.raises(ValueError, match="differ in size"):
        crop_pair(img, target[:50], boxes, 48, np.random.default_rng(0))


def test_ugicm_condition_and_one_bitstream_two_decodes(rows, tmp_path):
    assert fourier_features(torch.tensor([0.0, 1.0])).shape == (2, 21)
    session = LocalSession({"train": rows}, tmp_path)
    model = train_codec_loop(_cfg("ugicm:bmshj2018-hyperprior", {"type": "ugicm", "lmbda_clip": 0}, 6), session)
    plain = build_codec("bmshj2018-hyperprior", **TINY)
    extra = set(model.state_dict()) - set(plain.state_dict())
    assert extra and all(k.startswith(("g_s.blocks.", "g_s.mlp.")) for k in extra)
    model.eval().update(force=True, update_quantiles=True)
    x = torch.from_numpy(rows[0]["x"][:50, :60].copy()).permute(2, 0, 1)[None].float() / 255
    coded = code_image(model, x, decode_kwargs={"beta": 0.0})
    machine = decode_again(model, coded, {"beta": 1.0})
    assert coded.x_hat.shape == machine.shape == x.shape
    assert not torch.equal(coded.x_hat, machine)
    assert torch.equal(decode_again(model, coded, {"beta": 0.0}), coded.x_hat)   # deterministic decoding


@pytest.mark.parametrize("name,loss", [("bmshj2018-hyperprior", {"type": "rd", "lmbda": 0.01}),
                                       ("ugicm:bmshj2018-hyperprior", {"type": "ugicm", "lmbda": 0.01,
                                                                       "lmbda_machine": 0.005, "lmbda_clip": 0})])
def test_loss_goes_down(rows, tmp_path, name, loss):
    session = LocalSession({"train": rows}, tmp_path)
    train_codec_loop(_cfg(name, loss, 15), session)
    losses = [r["loss"] for r in session.reports]
    assert len(losses) == 15
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses


def test_real_bpp_matches_likelihood_estimate_after_training(rows, tmp_path):
    model = train_codec_loop(_cfg("bmshj2018-hyperprior", {"type": "rd", "lmbda": 0.1}, 30),
                             LocalSession({"train": rows}, tmp_path))
    model.eval().update(force=True, update_quantiles=True)
    img = np.ascontiguousarray(skdata.astronaut()[::2, ::2])   # 256 x 256: enough bits that the
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255   # coder's few flush bytes are noise
    coded = code_image(model, x)
    with torch.no_grad():
        out = model(x)
    estimate = float(bpp_of(out["likelihoods"], 256 * 256))
    assert abs(coded.bpp - estimate) / estimate < 0.05, (coded.bpp, estimate)
    assert (coded.x_hat - out["x_hat"].clamp(0, 1)).abs().max() < 1e-3


@pytest.mark.parametrize("schedule", [{"type": "multistep", "milestones": [3, 6], "gamma": 0.5},
                                      {"type": "plateau", "every": 1, "patience": 0, "factor": 0.5}])
def test_resume_equals_uninterrupted(rows, tmp_path, schedule):
    cfg = _cfg("ugicm:bmshj2018-hyperprior", {"type": "ugicm", "lmbda_clip": 0}, 7, lr_schedule=schedule)
    straight_session = LocalSession({"train": rows}, tmp_path / "a")
    straight = train_codec_loop(cfg, straight_session)
    first = LocalSession({"train": rows}, tmp_path / "b")
    train_codec_loop({**cfg, "steps": 4, "checkpoint_every": 4}, first)
    second = LocalSession({"train": rows}, tmp_path / "b")
    resumed = train_codec_loop(cfg, second)
    assert [r["step"] for r in second.reports] == [5, 6, 7]
    assert [r["lr"] for r in second.reports] == [r["lr"] for r in straight_session.reports[4:]]
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    lrs = [r["lr"] for r in straight_session.reports]
    if schedule["type"] == "multistep":           # halved after steps 3 and 6
        assert lrs == pytest.approx([2e-3] * 3 + [1e-3] * 3 + [5e-4])
    else:   # patience 0: halved after each step whose loss is not below the best so far by 1e-4 (relative)
        expected, best = [2e-3], float("inf")
        for report in straight_session.reports[:-1]:
            improved = report["loss"] < best * (1 - 1e-4)
            best = min(best, report["loss"]) if improved else best
            expected.append(expected[-1] * (1 if improved else 0.5))
        assert lrs == pytest.approx(expected)
        assert 2e-3 > min(lrs) and lrs.count(2e-3) > 1     # it both held and dropped in these 7 steps


def test_main_gradients_are_clipped_to_norm_one(rows, tmp_path, monkeypatch):
    seen = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *args, **kwargs):
        params = list(params)
        before = real(params, max_norm, *args, **kwargs)
        after = torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        seen.append((float(before), float(after), max_norm))
        return before

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    train_codec_loop(_cfg("bmshj2018-hyperprior", {"type": "rd", "lmbda": 0.5}, 4),
                     LocalSession({"train": rows}, tmp_path))
    assert len(seen) == 4 and all(m == 1.0 and after <= 1.0 + 1e-5 for _, after, m in seen)
    assert max(before for before, _, _ in seen) > 1.0      # the clipping did something
    seen.clear()
    train_codec_loop(_cfg("bmshj2018-hyperprior", {"type": "rd", "lmbda": 0.5}, 2, clip_max_norm=0),
                     LocalSession({"train": rows}, tmp_path / "off"))
    assert not seen


class _TinyImageEncoder(torch.nn.Module):
    """Stands in for CLIP's image encoder: these tests are about which decodes reach the loss."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 7, stride=4)

    def encode_image(self, x):
        return self.conv(x).mean((-2, -1))


def _off_identity(model):
    with torch.no_grad():   # move the conditioned blocks off the identity so β matters
        for p in model.codec.g_s.blocks.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_stage3_decodes_every_sample_both_ways_from_one_latent(rows):
    from icm.losses import ClipDistance, UGICMLoss
    from icm.train.codec import UGICMObjective

    torch.manual_seed(0)
    model = _off_identity(build_codec("ugicm:bmshj2018-hyperprior", **TINY, cond_dim=32)).eval()
    x = torch.from_numpy(np.stack([r["x"] for r in rows[:3]])).permute(0, 3, 1, 2).float() / 255
    target = torch.from_numpy(np.stack([r["target"] for r in rows[:3]])).permute(0, 3, 1, 2).float() / 255
    boxes = [torch.as_tensor(r["boxes"]).reshape(-1, 4) for r in rows[:3]]
    with torch.no_grad():   # eval mode rounds: these are the very decodes the objective makes
        both = model(x, UGICM.BOTH)
        human, machine = model(x, torch.zeros(3))["x_hat"], model(x, torch.ones(3))["x_hat"]
    assert both["x_hat"].shape[0] == 6
    assert torch.allclose(both["x_hat"][:3], human, atol=1e-5)
    assert torch.allclose(both["x_hat"][3:], machine, atol=1e-5)
    assert not torch.allclose(human, machine, atol=1e-3)

    objective = UGICMObjective({"type": "ugicm", **UGICMObjective.defaults({"stage": 3}), "lmbda_instance": 0,
                                "lmbda_clip": 0}, {}, model, "cpu")
    clip = ClipDistance(_TinyImageEncoder())
    objective.criterion = UGICMLoss(0.002, 0.5, 2.0, clip, stage=3, lmbda_instance=3.0)
    with torch.no_grad():
        terms = objective.terms(model, x, target, boxes, None, step=0)
        mse_h, mse_m = F.mse_loss(human, x), F.mse_loss(machine, target)
        glob, inst = clip(machine, x), clip.instances(machine, x, boxes)
        assert float(terms["mse_human"]) == pytest.approx(float(mse_h), rel=1e-5)
        assert float(terms["mse_human"]) != pytest.approx(float(F.mse_loss(machine, x)), rel=1e-2)
        assert float(terms["mse_machine"]) == pytest.approx(float(mse_m), rel=1e-5)
        assert float(terms["mse_machine"]) != pytest.approx(float(F.mse_loss(human, target)), rel=1e-2)
        assert float(terms["clip"]) == pytest.approx(float(glob), rel=1e-4)
        assert float(terms["clip"]) != pytest.approx(float(clip(human, x)), rel=1e-2)
        assert float(terms["clip_instance"]) == pytest.approx(float(inst), rel=1e-4) and float(inst) > 0
    # the authors' stage-3 sum: no rate term (only the decoder trains) and no factor 0.5
    expected = 0.002 * 255 ** 2 * mse_h + 0.5 * 255 ** 2 * mse_m + 3.0 * inst + 2.0 * glob
    assert float(terms["loss"]) == pytest.approx(float(expected), rel=1e-4)


def test_ugicm_decoder_has_the_authors_four_blocks_and_relu_condition():
    model = build_codec("ugicm:bmshj2018-hyperprior", **TINY, cond_dim=32)
    g_s = model.codec.g_s
    assert list(g_s.blocks) == ["y_hat", "1", "3", "5"]        # before each of g_s's 4 upsamplings
    assert g_s.blocks["y_hat"].conv1.in_channels == 24           # the first acts on ŷ (M channels)
    assert [type(m) for m in g_s.mlp] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear, torch.nn.ReLU]
    with torch.no_grad():
        torch.nn.init.normal_(g_s.mlp[2].bias)                   # some outputs negative before the last ReLU
        assert float(g_s.condition(torch.linspace(0, 1, 5)).min()) == 0.0


def test_method_defaults_are_the_authors_and_written_into_the_resolved_config(small_shapes, tmp_path, monkeypatch):
    import train_codec
    import yaml

    class Stop(Exception):
        pass

    def stop(*_args):
        raise Stop

    monkeypatch.setattr(train_codec, "start_ray", stop)   # everything up to starting Ray
    shapes = {"type": "shapes", "domain": "photo", "n_train": 24, "n_val": 12, "seed": 7, "split": "train"}
    ugicm = {"name": "ugicm:bmshj2018-hyperprior", **TINY, "cond_dim": 32}
    clip = {"name": "ViT-B-32", "weights": "open_clip:openai"}
    cases = [
        (ugicm, {"type": "ugicm"}, {"stage": 1, "lmbda": 0.0022, "lmbda_machine": 0.0011, "lmbda_clip": 11.0}, 1.0),
        (ugicm, {"type": "ugicm", "stage": 2}, {"lmbda": 0.0022, "lmbda_machine": 0.0, "lmbda_clip": 22.0}, 1.0),
        (ugicm, {"type": "ugicm", "stage": 3},
         {"lmbda": 0.001, "lmbda_machine": 0.0, "lmbda_instance": 1.0, "lmbda_clip": 1.0}, 1.0),
        (ugicm, {"type": "ugicm", "stage": 2, "lmbda_machine": 0.5}, {"lmbda_machine": 0.5, "lmbda_clip": 22.0}, 1.0),
        ({"name": "adapt_icmh:bmshj2018-hyperprior", **TINY, "mid": 8}, {"type": "adapt_icmh", "preset": 2},
         {"task": "detection", "task_lmbda": 2.0}, 0.0),
        ({"name": "dynamic:bmshj2018-hyperprior", **TINY}, {"type": "dynamic"}, {"lmbda": 0.013, "lmbda_machine": 1.0},
         1.0)]
    for i, (codec, loss, expected, clip_max_norm) in enumerate(cases):
        out = tmp_path / str(i)
        cfg = {"name": "t", "dataset": shapes, "out_dir": str(out), "crop": 64, "codec": codec, "steps": 1,
               "loss": {**loss, "clip": clip} if loss["type"] == "ugicm" else loss}
        with pytest.raises(Stop):
            train_codec.run(cfg)
        resolved = yaml.safe_load((out / "config.resolved.yaml").read_text())
        assert {k: resolved["loss"][k] for k in expected} == expected, (loss, resolved["loss"])
        assert resolved["clip_max_norm"] == clip_max_norm
    with pytest.raises(SystemExit, match="random CLIP weights"):   # stage 3's instance term needs real CLIP weights
        train_codec.run({"name": "t", "dataset": shapes, "out_dir": str(tmp_path / "x"), "crop": 64, "codec": ugicm,
                         "loss": {"type": "ugicm", "stage": 3, "lmbda_clip": 0}})


def test_stage2_trains_only_the_decoder(rows, tmp_path):
    cfg = _cfg("ugicm:bmshj2018-hyperprior", {"type": "ugicm", "stage": 2, "lmbda_clip": 0}, 3)
    before = build_codec("ugicm:bmshj2018-hyperprior", **TINY, cond_dim=32).state_dict()
    after = train_codec_loop(cfg, LocalSession({"train": rows}, tmp_path)).state_dict()
    changed = {k for k in before if before[k].dtype.is_floating_point and not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("g_s.") for k in changed)


def test_clip_term_is_differentiable_and_zero_for_identical_images():
    from icm.losses import ClipDistance
    from icm.zoo import build_clip

    clip = ClipDistance(build_clip("ViT-B-32", "random:0"))
    x = torch.rand(1, 3, 64, 80)
    assert float(clip(x, x)) == pytest.approx(0.0, abs=1e-5)
    x_hat = (x + 0.3 * torch.randn_like(x)).clamp(0, 1).requires_grad_(True)
    loss = clip(x_hat, x) + clip.instances(x_hat, x, [torch.tensor([[5.0, 5.0, 40.0, 50.0]])])
    loss.backward()
    assert float(loss) > 0 and x_hat.grad.abs().sum() > 0


def _digest(module):
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _ddp_loop(config, session):
    model = train_codec_loop(config, session)
    out = config["digest_dir"]
    with open(f"{out}/rank-{session.rank}.txt", "w") as f:
        f.write(_digest(model))


@pytest.mark.slow
def test_ddp_replicas_stay_bitwise_equal(ray_cluster, rows, tmp_path):
    from ray import cloudpickle

    from icm.train.ray_trainer import fit
    from icm.train.stream import Stream

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/
    (tmp_path / "digests").mkdir()
    cfg = _cfg("ugicm:bmshj2018-hyperprior", {"type": "ugicm", "lmbda_clip": 0}, 4, threads=1,
               digest_dir=str(tmp_path / "digests"))
    result = fit(_ddp_loop, cfg, name="ddp", storage_path=tmp_path / "runs",
                 streams={"train": Stream(items=rows * 2, num_cpus=0.5)}, num_workers=2, cpus_per_worker=0.5)
    assert result.error is None
    digests = [(tmp_path / "digests" / f"rank-{r}.txt").read_text() for r in (0, 1)]
    assert digests[0] == digests[1]
    start = _digest(build_codec("ugicm:bmshj2018-hyperprior", **TINY, cond_dim=32))
    assert digests[0] != start   # they trained, and stayed equal


@pytest.mark.slow
def test_train_and_evaluate_drivers(ray_cluster, small_shapes, tmp_path, monkeypatch, preempted):
    import evaluate
    import train_codec

    monkeypatch.setenv("ICM_WEIGHTS_DIR", str(tmp_path / "weights"))
    codec = {"name": "ugicm:bmshj2018-hyperprior", **TINY, "cond_dim": 32}
    shapes = {"type": "shapes", "domain": "photo", "n_train": 24, "n_val": 12, "seed": 7}   # = small_shapes
    # 2 DDP workers: 3 batches of 4 per worker and epoch, checkpoints every 4 steps (inside epochs)
    cfg = {"name": "t", "label": "ugicm-test", "dataset": {**shapes, "split": "train"},
           "out_dir": str(tmp_path / "train"), "crop": 64, "codec": codec,
           "loss": {"type": "ugicm", "lmbda": 0.01, "lmbda_machine": 0.005, "lmbda_clip": 0},
           "steps": 24, "batch_size": 4, "lr": 1e-3, "checkpoint_every": 4, "log_every": 2, "seed": 0, "threads": 1,
           "workers": {"num_workers": 2, "cpus_per_worker": 0.5}, "data": {"num_cpus": 0.5}}
    straight = train_codec.run({**cfg, "out_dir": str(tmp_path / "straight")})
    assert straight["steps"] == 24 and straight["train_images_listed"] == 24 and straight["resumed_at"] == []
    # preempted after a checkpoint, then the same command again: the same run, resumed
    killed_at = preempted("pipelines/train_codec.py", {**cfg, "ray": {}}, tmp_path / "train" / "ray-train" / "t")
    assert not (tmp_path / "train" / "model.pth").exists()
    summary = train_codec.run(cfg)
    assert summary["steps"] == 24 and summary["resumed_at"] == [killed_at["step"]] and killed_at["step"] < 24
    assert summary["model"]["sha256"] == straight["model"]["sha256"]      # bit-identical weights
    assert list((tmp_path / "train" / "tensorboard" / "t").glob("events.out.tfevents.*"))
    loaded = build_codec(codec["name"], **{k: v for k, v in codec.items() if k not in ("name", "weights")},
                         weights="trained:ugicm-test")
    assert isinstance(loaded, UGICM)
    exported = torch.load(tmp_path / "train" / "model.pth", weights_only=True)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in exported.items())

    eval_cfg = {"dataset": {**shapes, "split": "val"}, "out_dir": str(tmp_path / "eval"),
                "codecs": [{"label": "ug", **codec, "weights": str(tmp_path / "train" / "model.pth")},  # Ray workers
                                                                                                # do not see the patched env
                           {"label": "jpeg", "ladder": {"type": "jpeg", "qualities": [80, 30]}}],
                # ground truth with a known jitter, more on worse decodes (tests/oracle_detectors.py)
                "detectors": [{"label": "y", "name": "oracle", "dataset": {**shapes, "split": "val"}, "seen": True}],
                "canvas": 128, "batch_size": 3, "limit": 6, "device": "cpu",
                "workers": {"actors": 1, "num_cpus": 0.5}}
    result = evaluate.run(eval_cfg)
    assert result["images"]["done"] == 6
    keys = {(p["curve"], p["point"], p["decode"]) for p in result["rd_points"]}
    assert keys == {("original", 0, "single"), ("ug", 0, "human"), ("ug", 0, "machine"),
                    ("jpeg", 0, "single"), ("jpeg", 1, "single")}
    assert (tmp_path / "eval" / "rd.png").is_file()
    _check_against_direct_calls(tmp_path / "eval", loaded, result, {**shapes, "split": "val"})
    _page_shows_both_records(tmp_path)


def _page_shows_both_records(root):
    """One results page over both jobs' folders, against their summary.json."""
    from page_checks import check_page

    from icm.report import write_report

    shown = check_page(write_report([str(root)]))
    trained, evaluated = (json.loads((root / d / "summary.json").read_text()) for d in ("train", "eval"))
    assert {f"/final_metrics/{k}" for k, v in trained["final_metrics"].items() if isinstance(v, (int, float))} \
        <= shown[str((root / "train" / "summary.json").resolve())]
    assert {f"/rd_points/{i}/{k}" for i in range(len(evaluated["rd_points"])) for k in ("bpp", "map50/y")} \
        <= shown[str((root / "eval" / "summary.json").resolve())]


def _check_against_direct_calls(out_dir, model, result, dataset):
    """bpp/PSNR with CompressAI's own calls and mAP with pycocotools' own evaluator."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from icm.data.readers import build_reader

    points = pq.read_table(out_dir / "points").to_pylist()
    manifest = sorted(pq.read_table(out_dir / "manifest.parquet").to_pylist(), key=lambda r: r["source_id"])
    reader = build_reader(dataset)
    records = {r["source_id"]: r for r in reader.records(source_ids={m["source_id"] for m in manifest})}
    model.eval().update(force=True)
    for m in manifest:
        image = records[m["source_id"]]["image"]
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
        h, w = x.shape[-2:]
        ph, pw = -(-h // 64) * 64, -(-w // 64) * 64
        pad = ((pw - w) // 2, pw - w - (pw - w) // 2, (ph - h) // 2, ph - h - (ph - h) // 2)
        with torch.no_grad():
            out = model.compress(F.pad(x, pad))
            nbytes = sum(len(s) for group in out["strings"] for s in group)
            human = model.decompress(out["strings"], out["shape"], beta=0.0)["x_hat"]
        human = human[..., pad[2]:ph - pad[3], pad[0]:pw - pad[1]].clamp(0, 1)
        human8 = torch.from_numpy(human[0].mul(255).round().byte().permute(1, 2, 0).numpy()).permute(2, 0, 1)[None]
        row = next(p for p in points if p["source_id"] == m["source_id"] and p["curve"] == "ug" and p["decode"] == "human")
        assert row["bytes"] == nbytes and row["bpp"] == pytest.approx(8 * nbytes / (h * w))
        # the Ray worker decodes with other thread counts: a rare ±1 flip after 8-bit rounding
        assert row["psnr"] == pytest.approx(psnr(human8.float() / 255, x), rel=1e-5)
    ids = {m["source_id"]: i for i, m in enumerate(manifest, start=1)}
    classes = reader.classes
    gt = {"images": [{"id": ids[m["source_id"]], "width": m["width"], "height": m["height"]} for m in manifest],
          "annotations": [], "categories": [{"id": i + 1, "name": c} for i, c in enumerate(classes)]}
    for m in manifest:
        g = json.loads(m["gt"])
        for box, name in zip(g["boxes"], g["class_names"]):
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": ids[m["source_id"]],
                                      "category_id": classes.index(name) + 1, "iscrowd": 0,
                                      "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                                      "area": (box[2] - box[0]) * (box[3] - box[1])})
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    for entry in result["rd_points"]:
        dets = []
        for p in points:
            if (p["curve"], p["point"], p["decode"]) == (entry["curve"], entry["point"], entry["decode"]):
                d = json.loads(p["detections"])["y"]
                dets += [{"image_id": ids[p["source_id"]], "category_id": c + 1, "score": s,
                          "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]}
                         for b, s, c in zip(d["boxes"], d["scores"], d["labels"])]
        assert dets, entry      # the oracle finds objects in every decode
        ev = COCOeval(coco, coco.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        assert entry["map"]["y"] == pytest.approx(ev.stats[0]) and entry["map50"]["y"] == pytest.approx(ev.stats[1])
    original = next(e for e in result["rd_points"] if e["curve"] == "original")
    # lossless: the oracle's jitter alone (objects shifted by 0, 0.1, 0.3, 0.6 of their width)
    assert 0.3 < original["map50"]["y"] < 1.0 and 0.1 < original["map"]["y"] < original["map50"]["y"]
    worst = min(result["rd_points"], key=lambda e: e["psnr"] or float("inf"))
    assert worst["map"]["y"] < original["map"]["y"]    # worse decodes, worse figures


def test_maa_targets_of_other_images_are_refused(small_shapes, tmp_path):
    import train_codec

    from icm.data.manifest import ManifestStore, manifest_row

    maa = ManifestStore(tmp_path / "maa")
    maa.write_unit("u", [manifest_row(source_id=f"voc/{i}", source_path="", output_path=f"images/{i}.png",
                                      status="ok", params={}, models=[], seed=0, started_at=0, duration_s=0)
                         for i in range(3)])
    maa.consolidate()
    cfg = {"name": "t", "dataset": {"type": "shapes", "domain": "photo", "split": "train", "n_train": 24, "n_val": 12,
                                    "seed": 7},
           "out_dir": str(tmp_path / "train"), "crop": 64, "machine_targets": {"maa_dir": str(tmp_path / "maa")},
           "codec": {"name": "ugicm:bmshj2018-hyperprior", **TINY, "cond_dim": 32},
           "loss": {"type": "ugicm", "lmbda_clip": 0}, "steps": 1}
    with pytest.raises(SystemExit, match="none of its 3 MAA images belongs to the 24 training images"):
        train_codec.run(cfg)


def test_training_stream_comes_in_a_new_order_each_epoch(ray_cluster, small_shapes):
    """The codec stream through Ray Data: each epoch a new order and new crops, both functions of
    (seed, epoch) — rebuilt, it gives the same rows, and Ray Data gives what one process gives."""
    from icm.data.ray_io import select_refs
    from icm.data.readers import build_reader
    from icm.train.codec_job import codec_stream
    from icm.train.ray_trainer import ray_data_rows
    from icm.train.stream import local_rows

    refs = select_refs(build_reader({"type": "shapes", "domain": "photo", "split": "train", "n_train": 24,
                                     "n_val": 12, "seed": 7}), None)
    cfg = {"crop": 64, "seed": 3, "data": {"num_cpus": 0.5}}

    def epoch(e, runner=ray_data_rows, start=(0, 0)):
        return [(w, k, hashlib.sha256(row["x"].tobytes()).hexdigest()) for w, k, row in
                runner(codec_stream(refs, cfg, {}), e, 1, 2, start)]

    first, second = epoch(0), epoch(1)
    assert len(first) == len(second) == 12            # worker 1 of 2: half of the 24 images each epoch
    assert first == epoch(0, local_rows)              # Ray Data preserves the stream's order
    assert first[5:] == epoch(0, start=(first[4][0], first[4][1] + 1))   # resumed after 5 rows
    assert {c for *_, c in first}.isdisjoint({c for *_, c in second})      # new crops each epoch
    assert len({c for *_, c in first}) == 12


def test_tensorboard_logs_and_trained_weights_reach_shared_storage(rows, tmp_path, monkeypatch):
    """With outputs in object storage the logs and weights must outlive the node that made them
    (file:// stands in for s3:// here: the same pyarrow code path)."""
    from icm.zoo.weights import publish_trained

    session = LocalSession({"train": rows}, tmp_path / "ckpt")
    train_codec_loop(_cfg("bmshj2018-hyperprior", {"type": "rd", "lmbda": 0.01}, 4, checkpoint_every=2,
                          tensorboard_dir=str(tmp_path / "local-tb"),
                          tensorboard_upload=f"file://{tmp_path}/bucket/out/tensorboard/t"), session)
    local = sorted((tmp_path / "local-tb").glob("events.out.tfevents.*"))
    remote = sorted((tmp_path / "bucket/out/tensorboard/t").glob("events.out.tfevents.*"))
    assert local and [p.name for p in remote] == [p.name for p in local]
    assert remote[0].read_bytes() == local[0].read_bytes()

    monkeypatch.setenv("ICM_WEIGHTS_DIR", f"file://{tmp_path}/bucket/weights")
    monkeypatch.setenv("ICM_WEIGHTS_CACHE", str(tmp_path / "node-cache"))
    publish_trained("demo-codec", b"weights", ".pth", {"steps": 4})
    assert (tmp_path / "bucket/weights/trained/demo-codec.pth").read_bytes() == b"weights"
    assert json.loads((tmp_path / "bucket/weights/trained/demo-codec.json").read_text()) == {"steps": 4}
    assert (tmp_path / "node-cache/trained/demo-codec.pth").is_file()


def test_a_codec_trained_once_is_reused_by_recipe_and_a_new_sample_set_version_retrains(small_shapes, tmp_path,
                                                                                           monkeypatch, capsys):
    import train_codec
    import train_codec_local

    from icm.data import samples

    runs = []

    def local_run(cfg, address=None):   # the Ray-free runner: the same checks, loop and export as the Ray job
        runs.append(cfg["name"])
        return train_codec_local.train_local(cfg, "cpu")

    monkeypatch.setattr(train_codec, "run", local_run)
    cfg = {"name": "base", "dataset": {"type": "shapes", "domain": "photo", "n_train": 24, "n_val": 12, "seed": 7,
                                       "split": "train"},
           "limit": 4, "out_dir": str(tmp_path / "base"), "crop": 64,
           "codec": {"name": "ugicm:bmshj2018-hyperprior", **TINY, "cond_dim": 32},
           "loss": {"type": "ugicm", "lmbda": 0.01, "lmbda_machine": 0.01, "lmbda_clip": 0},
           "steps": 2, "batch_size": 2, "lr": 1e-3, "checkpoint_every": 2, "log_every": 1, "threads": 1}
    first = train_codec.train_once(cfg)
    assert len(runs) == 1 and runs[0].startswith("base-") and first["trained_now_s"] is not None
    assert "training the codec base (2 steps" in capsys.readouterr().out
    again = train_codec.train_once(cfg)
    assert len(runs) == 1 and again["sha256"] == first["sha256"] and again["trained_now_s"] is None
    assert "same recipe" in capsys.readouterr().out

    class Retrained(Exception):
        pass

    def refuse(cfg, address=None):
        raise Retrained(cfg["name"])

    monkeypatch.setattr(train_codec, "run", refuse)
    monkeypatch.setattr(samples, "SHAPES_VERSION", samples.SHAPES_VERSION + 1)   # the generator changed its images
    with pytest.raises(Retrained) as retrained:
        train_codec.train_once(cfg)
    assert "has another recipe — retraining" in capsys.readouterr().out
    assert str(retrained.value) != runs[0]            # a new run name: the old recipe's checkpoints never resume
