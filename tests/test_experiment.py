"""The MAA generalisation experiment end to end on a few images (random detectors for MAA, a
tiny codec): base codec (trained beforehand by the Ray-free local runner, reused by recipe) → MAA
stage → sweep of original- vs MAA-target codecs fine-tuned from it → bootstrap table; a rerun
redoes nothing and writes the same table. The codecs are evaluated by oracle detectors under the
MAA set's labels (tests/oracle_detectors.py: the ground truth with a jitter that grows with the
decode's error), so the table's mAP figures are real numbers the test can check."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"type": "shapes", "domain": "photo", "n_train": 24, "n_val": 12, "seed": 7}   # = small_shapes
SEEN = [{"label": "cn", "name": "centernet_resnet18", "weights": "random:0"},
        {"label": "yolo", "name": "yolov8n", "weights": "random:1"}]


ORACLES = [{"label": label, "name": "oracle", "dataset": {**SHAPES, "split": "val"}, "blur": blur}
           for label, blur in (("cn", 1.0), ("yolo", 2.0), ("held", 0.5))]
CODEC = {"name": "ugicm:bmshj2018-hyperprior", "quality": 1, "channels": [16, 24], "cond_dim": 32, "weights": "random:0"}


def _base(out):
    return {"name": "t-base", "out_dir": str(out / "base"), "dataset": {**SHAPES, "split": "train"}, "limit": 4,
            "crop": 64, "codec": CODEC, "machine_targets": {"maa_dir": None},
            "loss": {"type": "ugicm", "lmbda": 0.01, "lmbda_machine": 0.01, "lmbda_clip": 0},
            # 400 steps (~15 s here): decodes near 18 dB, close enough for the oracles to know the image
            "steps": 400, "batch_size": 2, "lr": 5e-3, "checkpoint_every": 400, "log_every": 100, "threads": 1,
            "workers": {"num_workers": 1, "cpus_per_worker": 0.5}, "data": {"num_cpus": 0.5}}


def _cfg(out):
    return {
        "name": "t-exp", "out_dir": str(out), "base_codec": _base(out),
        "maa": {"method": "meta_model", "dataset": {**SHAPES, "split": "train"}, "limit": 4, "canvas": 64,
                "outer": 1, "inner_steps": 1, "alpha": "2/255", "bound": {"type": "linf", "eps": "8/255"},
                "batch_size": 2, "seed": 0, "device": "cpu", "detectors": SEEN,
                "workers": {"actors": 1, "num_cpus": 0.5}, "figure_images": 1},
        # as the shipped config: a train_codec.py YAML and profile, with overrides merged into it
        "codec": {"from": "pipelines/configs/codec_ugicm.yaml", "profile": "demo",
                  "dataset": {**SHAPES, "split": "train"}, "limit": 4, "crop": 64, "codec": CODEC,
                  "loss": {"type": "ugicm", "lmbda": 0.01, "lmbda_machine": 0.01, "lmbda_clip": 0},
                  "steps": 3, "batch_size": 2, "lr": 1e-3, "checkpoint_every": 3, "log_every": 1,
                  "threads": 1, "workers": {"num_workers": 1, "cpus_per_worker": 0.5}, "data": {"num_cpus": 0.5}},
        "rate_points": [{"name": "lo", "set": {"loss.lmbda": 0.002}}, {"name": "hi", "set": {"loss.lmbda": 0.05}}],
        "seeds": [0],
        "evaluate": {"dataset": {**SHAPES, "split": "val"}, "limit": 4, "canvas": 64, "device": "cpu",
                     "detectors": ORACLES},
        "roles": {"held": "held out"},
        "anchors": [],
        "analysis": {"bootstrap": 10, "seed": 0},
        "resources": {"max_concurrent_trials": 1, "trial_cpus": 0.05},
        "ray": {"num_cpus": 2}}


def _run(config, script="pipelines/experiments/maa_generalisation.py", *extra):
    """A driver in a subprocess; the experiment's with the oracle detector registered in it and in
    its Ray workers."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    wrapper = ["tests/oracle_detectors.py"] if script.endswith("maa_generalisation.py") else []
    return subprocess.run([sys.executable, *wrapper, script, "--config", str(config), *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_experiment_end_to_end_and_rerun(small_shapes, tmp_path):
    out = tmp_path / "exp"
    base_config, config = tmp_path / "base.yaml", tmp_path / "exp.yaml"
    base_config.write_text(yaml.safe_dump(_base(out)))
    config.write_text(yaml.safe_dump(_cfg(out)))
    local = _run(base_config, "pipelines/train_codec_local.py", "--device", "cpu")
    assert local.returncode == 0, (local.stdout + local.stderr)[-4000:]
    base_info = json.loads((out / "base" / "model.json").read_text())
    assert base_info["runner"].startswith("train_codec_local") and base_info["steps"] == 400
    first = _run(config)
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    assert "same recipe, trained by train_codec_local (cpu)" in first.stdout   # not retrained on Ray
    assert not (out / "base" / "ray-train").exists()
    assert json.loads((out / "base" / "model.json").read_text()) == base_info
    summary = json.loads((out / "summary.json").read_text())
    assert summary["base_codec"]["sha256"] == base_info["sha256"]

    maa_rows = json.loads((out / "maa" / "summary.json").read_text())
    assert maa_rows["images"]["done"] == 4
    results = {p.parent.name: json.loads(p.read_text()) for p in (out / "sweep" / "trials").glob("*/result.json")}
    assert set(results) == {f"{v}-s0__{r}" for v in ("original", "maa") for r in ("lo", "hi")}
    for name, r in results.items():      # the pair differs in the machine target only
        assert r["variant_settings"]["seed"] == 0
        assert r["variant_settings"]["machine_targets.maa_dir"] == (str(out / "maa") if name.startswith("maa")
                                                                    else None)
        trial_model = json.loads((out / "sweep" / "trials" / name / "model.json").read_text())
        assert trial_model["init"] == str(out / "base" / "model.pth")   # fine-tuned from the base
    table = json.loads((out / "generalisation.json").read_text())
    assert table["images"] == 4 and table["rate_points"] == ["lo", "hi"] and table["bootstrap"] == 10
    rows = {r["detector"]: r for r in table["detectors"]}
    assert set(rows) == {"cn", "yolo", "held"}
    assert rows["cn"]["role"].startswith("seen") and rows["held"]["role"] == "held out"
    figures = []
    for label, r in rows.items():
        assert len(r["delta_map50"]) == len(r["delta_map50_ci"]) == 2
        assert all(lo <= v <= hi for v, (lo, hi) in zip(r["delta_map50"], r["delta_map50_ci"]))
        # the table's ΔmAP@.5 (bootstrap re-accumulation on the full set) against each trial's own
        # pycocotools figure
        for j, rate in enumerate(("lo", "hi")):
            maa, original = results[f"maa-s0__{rate}"][f"map50/{label}"], results[f"original-s0__{rate}"][f"map50/{label}"]
            assert r["delta_map50"][j] == pytest.approx(maa - original, abs=1e-9), (label, rate)
            assert r["per_pair"][0]["test_map50"][j] == pytest.approx(maa, abs=1e-9)
            figures += [maa, original]
    assert max(figures) > 0.1 and min(figures) < 1.0      # real figures, not the 0 of random detectors
    md = (out / "generalisation.md").read_text()
    assert "| held | held out |" in md and (out / "generalisation.png").stat().st_size > 1000

    stamps = {name: p.stat().st_mtime_ns for name, p in
              ((p.parent.name, p) for p in (out / "sweep" / "trials").glob("*/result.json"))}
    again = _run(config)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert {p.parent.name: p.stat().st_mtime_ns for p in (out / "sweep" / "trials").glob("*/result.json")} == stamps
    assert json.loads((out / "generalisation.json").read_text()) == table
