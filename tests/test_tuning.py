"""Ray Tune RD sweeps: a two-trial sweep through Ray Tune (Ray Train inside each trial, real
bitstream evaluation), killed after its first trial, while the second trains past a checkpoint,
and resumed by rerunning the command (the second trial from its checkpoint); its curves, RD
figure, BD table and TensorBoard HParams rows."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import registered_checkpoint

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"type": "shapes", "domain": "photo", "n_train": 24, "n_val": 12, "seed": 7}   # = small_shapes


def _sweep_cfg(out):
    return {
        "name": "t-sweep", "out_dir": str(out),
        "train": {"dataset": {**SHAPES, "split": "train"}, "crop": 64,
                  "codec": {"name": "ugicm:bmshj2018-hyperprior", "quality": 1, "channels": [16, 24], "cond_dim": 32,
                            "weights": "random:0"},
                  "loss": {"type": "ugicm", "lmbda": 0.01, "lmbda_machine": 0.005, "lmbda_clip": 0},
                  "steps": 30, "batch_size": 4, "lr": 1e-3, "checkpoint_every": 10, "log_every": 10, "seed": 0,
                  "threads": 1, "workers": {"num_workers": 1, "cpus_per_worker": 0.5}, "data": {"num_cpus": 0.5}},
        "rate_points": [{"name": "a", "set": {"loss.lmbda": 0.002}}, {"name": "b", "set": {"loss.lmbda": 0.05}}],
        "variants": [{"name": "tiny", "set": {}}],
        "evaluate": {"dataset": {**SHAPES, "split": "val"}, "limit": 4, "canvas": 128, "device": "cpu",
                     "detectors": [{"label": "y", "name": "yolov8n", "weights": "random:5"}]},
        "anchors": [{"label": "jpeg", "ladder": {"type": "jpeg", "qualities": [20, 50, 90]}}],
        "report": {"anchor": "jpeg", "bootstrap": 20},
        "base_codec": {"name": "t-base", "out_dir": str(out / "base"), "dataset": {**SHAPES, "split": "train"},
                       "limit": 4, "crop": 64,
                       "codec": {"name": "ugicm:bmshj2018-hyperprior", "quality": 1, "channels": [16, 24],
                                 "cond_dim": 32, "weights": "random:0"},
                       "loss": {"type": "ugicm", "lmbda": 0.01, "lmbda_machine": 0.01, "lmbda_clip": 0},
                       "steps": 2, "batch_size": 2, "lr": 1e-3, "checkpoint_every": 2, "log_every": 1, "threads": 1,
                       "workers": {"num_workers": 1, "cpus_per_worker": 0.5}, "data": {"num_cpus": 0.5}},
        "resources": {"max_concurrent_trials": 1, "trial_cpus": 0.05},
        "ray": {"num_cpus": 2}}


def _sweep(config, **kwargs):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.Popen([sys.executable, "tuning/sweep_rd.py", "--config", str(config)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            **kwargs)


@pytest.mark.slow
def test_sweep_restores_after_a_kill_and_reports_curves(small_shapes, tmp_path):
    out = tmp_path / "sweep"
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(_sweep_cfg(out)))

    first = _sweep(config)
    deadline = time.time() + 600
    done, checkpoint = [], None
    while time.time() < deadline and first.poll() is None:
        done = sorted(out.glob("trials/*/result.json"))
        if done:   # the other trial is training now: kill the sweep once it has a checkpoint
            other = next(t for t in ("tiny__a", "tiny__b") if t != done[0].parent.name)
            checkpoint = registered_checkpoint(out / "trials" / other / "ray-train" / other)
            if checkpoint is not None:
                break
        time.sleep(0.5)
    assert checkpoint is not None and not (out / "trials" / other / "result.json").exists(), (
        "no trial was caught training after a checkpoint" + (first.stdout.read()[-3000:] if first.poll() is not None else ""))
    os.killpg(first.pid, signal.SIGKILL)          # mid-sweep: one trial finished, the other inside its training
    first.wait(30)
    # the killed driver's Ray processes die after it (they may still register the checkpoint they
    # were writing): the latest checkpoint is the one that stays registered
    run_dir, stable_since = out / "trials" / other / "ray-train" / other, time.time()
    checkpoint, deadline = registered_checkpoint(run_dir), time.time() + 120
    while time.time() - stable_since < 15 and time.time() < deadline:
        time.sleep(1)
        latest = registered_checkpoint(run_dir)
        if latest != checkpoint:
            checkpoint, stable_since = latest, time.time()
    finished = done[0]
    before = (finished.read_text(), finished.stat().st_mtime_ns)

    second = _sweep(config)
    log, _ = second.communicate(timeout=600)
    assert second.returncode == 0, log[-4000:]
    assert "resuming the sweep" in log
    assert "base codec" in log and "same recipe" in log      # trained by the first run, reused by the second
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trials_finished"] == summary["trials_total"] == 2 and not summary["failed_trials"]
    assert (finished.read_text(), finished.stat().st_mtime_ns) == before      # not rerun
    resumed = json.loads((out / "trials" / other / "model.json").read_text())
    assert resumed["resumed_at"] == [checkpoint["step"]] and resumed["steps"] == 30   # from its checkpoint

    results = [json.loads(p.read_text()) for p in sorted(out.glob("trials/*/result.json"))]
    assert {r["rate_point"] for r in results} == {"a", "b"} and all(r["steps"] == 30 for r in results)
    curve = json.loads((out / "curves" / "tiny.json").read_text())
    assert curve["name"] == "tiny" and len(curve["results"]["bpp"]) == 2
    assert curve["results"]["bpp"] == sorted(curve["results"]["bpp"])
    assert {"psnr-rgb", "ms-ssim-rgb", "map50-y"} <= set(curve["results"])
    for r in results:                                        # each trial trained at its own rate point
        model = json.loads((out / "trials" / r["trial"] / "model.json").read_text())
        assert model["loss"]["lmbda"] == {"a": 0.002, "b": 0.05}[r["rate_point"]]
        assert model["sha256"] == r["sha256"] and r["bpp"] > 0 and r["psnr"] > 0
        assert model["init"] == str(out / "base" / "model.pth")       # fine-tuned from the base codec
    assert len(json.loads((out / "curves" / "jpeg.json").read_text())["results"]["bpp"]) == 3
    assert (out / "rd.png").is_file()
    table = json.loads((out / "bd_table.json").read_text())
    assert table["anchor"] == "jpeg" and "psnr-rgb" in table["table"]["tiny"]
    assert "BD-rate (%) against jpeg" in (out / "bd_table.md").read_text()
    # the bootstrap table reads the same per-image rows as the RD curves: on all images, its curves are theirs
    boot = json.loads((out / "bd_bootstrap.json").read_text())
    assert boot["anchor"] == "jpeg" and boot["images"] == 4 and boot["bootstrap"] == 20
    jpeg = json.loads((out / "curves" / "jpeg.json").read_text())["results"]
    for axis, key in (("psnr", "psnr-rgb"), ("y", "map50-y")):
        entry = boot["table"]["tiny"][axis]
        np.testing.assert_allclose(sorted(zip(entry["anchor_bpp"], entry["anchor_quality"])),
                                   sorted(zip(jpeg["bpp"], jpeg[key])), rtol=1e-9)
        np.testing.assert_allclose(sorted(zip(entry["test_bpp"], entry["test_quality"])),
                                   sorted(zip(curve["results"]["bpp"], curve["results"][key])), rtol=1e-9)
        assert isinstance(entry["bd_rate"], float) or entry["reason"]     # a figure, or n/a with its reason
    assert "95 % bootstrap intervals over images" in (out / "bd_bootstrap.md").read_text()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    for r in results:
        run = out / "trials" / r["trial"] / "tensorboard" / r["trial"]
        scalars = EventAccumulator(str(run)).Reload()
        assert "train/loss" in scalars.Tags()["scalars"]
        hp = EventAccumulator(str(run / "hparams")).Reload()
        content = hp.PluginTagToContent("hparams")
        start = next(plugin_data_pb2.HParamsPluginData.FromString(v).session_start_info
                     for v in content.values() if plugin_data_pb2.HParamsPluginData.FromString(v).HasField(
                         "session_start_info"))
        assert start.hparams["rate_point"].string_value == r["rate_point"]
        assert start.hparams["variant"].string_value == "tiny"


def test_early_stopping_compares_trials_of_one_rate_point_only():
    from types import SimpleNamespace

    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from icm.train.ray_trainer import per_rate_point_asha

    good = SimpleNamespace(trial_id="t1", config={"rate_point": "q1"})
    other = SimpleNamespace(trial_id="t2", config={"rate_point": "q6"})        # a λ whose loss is 100× larger
    cfg = {"metric": "loss", "grace_period": 1, "reduction_factor": 2}
    shared = ASHAScheduler(time_attr="step", metric="loss", mode="min", max_t=4, grace_period=1, reduction_factor=2)
    grouped = per_rate_point_asha(cfg, 4)
    for scheduler in (shared, grouped):
        for trial in (good, other):
            scheduler.on_trial_add(None, trial)
        assert scheduler.on_trial_result(None, good, {"step": 1, "loss": 1.0}) == TrialScheduler.CONTINUE
    # one ASHA over all rate points would stop the high-λ trial for a loss that is not comparable
    assert shared.on_trial_result(None, other, {"step": 1, "loss": 100.0}) == TrialScheduler.STOP
    assert grouped.on_trial_result(None, other, {"step": 1, "loss": 100.0}) == TrialScheduler.CONTINUE
    same_point = SimpleNamespace(trial_id="t3", config={"rate_point": "q1"})
    grouped.on_trial_add(None, same_point)
    assert grouped.on_trial_result(None, same_point, {"step": 1, "loss": 100.0}) == TrialScheduler.STOP


def test_sweep_progress_never_runs_backwards(capsys, monkeypatch):
    """The sweep's one line counts every trial's training steps: a trial's evaluation report (no
    ``step``) and a restart from a checkpoint (a lower ``step``) leave its count where it was."""
    from types import SimpleNamespace

    from icm.train.ray_trainer import trial_progress

    monkeypatch.setenv("ICM_PROGRESS_EVERY", "0")
    progress = trial_progress("sweep t", 2, 300)
    one, two = SimpleNamespace(trial_id="a"), SimpleNamespace(trial_id="b")
    shown = []
    for trial, result in ((one, {"step": 200}), (two, {"step": 300}), (two, {"bpp": 0.4, "psnr": 28.0}),
                          (one, {"step": 100}), (one, {"step": 300})):
        progress.on_trial_result(iteration=0, trials=[one, two], trial=trial, result=result)
        shown.append(sum(progress.steps.values()))
    progress.on_trial_complete(iteration=0, trials=[one, two], trial=two)
    assert shown == [200, 500, 500, 500, 600] and len(progress.finished) == 1
    progress.on_experiment_end(trials=[one, two])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[icm] sweep t:")]
    counts = [int(line.split(": ")[1].split("/")[0]) for line in lines]
    assert counts == sorted(counts) and counts[-1] == 600, lines
