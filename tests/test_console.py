"""What a person sees while a job runs: the progress line (live on a terminal, plain periodic lines
in a log), worker noise off unless --verbose with third-party warnings filtered by their exact
text, and a local job's Ray dashboard answering over loopback with the cluster's token."""

import io
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import pytest
import yaml

from icm import console

REPO = Path(__file__).resolve().parents[1]
JIT_MESSAGE = console.THIRD_PARTY_WARNINGS[0][1]


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_progress_in_a_log_is_plain_periodic_lines(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(console.time, "monotonic", clock)
    out = io.StringIO()
    line = console.Progress("MAAStage", 8, "images", stream=out, every_s=30, note="0/2 units")
    for done, at in ((2, 10), (4, 20), (6, 40), (8, 50)):
        clock.now = 1000 + at
        line.update(done, note=f"{done // 4}/2 units")
    line.close()
    text = out.getvalue()
    assert "\x1b" not in text and "\r" not in text
    lines = text.splitlines()
    # the first line, one after 30 s had passed (at 40 s), and the last: not one per update
    assert [re.match(r"\[icm\] MAAStage: (\d+)/8 images", s)[1] for s in lines] == ["0", "6", "8"]
    assert "ETA" in lines[1] and "0.15 images/s" in lines[1]          # 6 images in 40 s
    assert "ETA" not in lines[-1] and "elapsed 50s" in lines[-1]


def test_progress_on_a_terminal_redraws_one_line(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(console.time, "monotonic", clock)
    out = io.StringIO()
    line = console.Progress("training ugicm", 100, "steps", stream=out, live=True)
    for step in range(1, 101):
        clock.now += 0.1
        line.update(step)
    line.close()
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\x1b[K\n")        # one line, finished once
    frames = text.split("\r")[1:]
    assert 40 <= len(frames) <= 60                                       # redrawn at most every 0.2 s
    assert frames[-1].startswith("[icm] training ugicm: 100/100 steps")


def test_quiet_filters_exactly_the_listed_third_party_warnings(monkeypatch):
    import torch

    for key in ("YOLO_VERBOSE", "PYTHONWARNINGS", console.VERBOSE_ENV, console.RAY_SKIP_ENV, "RAY_COLOR_PREFIX"):
        monkeypatch.delenv(key, raising=False)

    def scripted(x):
        return x + 1

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        console.configure(verbose=False)
        torch.jit.script(scripted)
        warnings.warn("`torch.jit.trace` is deprecated too", FutureWarning)   # same category, other text
    assert [str(w.message) for w in seen] == ["`torch.jit.trace` is deprecated too"]
    assert os.environ["YOLO_VERBOSE"] == "False" and console.is_verbose() is False

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        console.configure(verbose=True)
        torch.jit.script(scripted)
    assert [str(w.message) for w in seen] == [JIT_MESSAGE] and console.is_verbose()


def test_worker_env_silences_the_import_warning_in_a_new_process():
    """Ray starts each worker as a new interpreter: the filter has to reach it through its env."""
    code = "import compressai"        # imports torch_geometric, which calls torch.jit.script at import
    base = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                           env={**base, **console.worker_env(verbose=False)})
    loud = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**base, **console.worker_env(verbose=True)})
    assert quiet.returncode == loud.returncode == 0
    assert JIT_MESSAGE in loud.stderr
    assert JIT_MESSAGE not in quiet.stderr


def _codec_cfg(out: Path) -> dict:
    shapes = {"type": "shapes", "domain": "photo", "n_train": 24, "n_val": 12, "seed": 7}     # = small_shapes
    return {"name": "console-run", "out_dir": str(out), "dataset": {**shapes, "split": "train"}, "crop": 64,
            "codec": {"name": "ugicm:bmshj2018-hyperprior", "quality": 1, "channels": [16, 24], "cond_dim": 32,
                      "weights": "random:0"},
            "loss": {"type": "ugicm", "lmbda": 0.01, "lmbda_machine": 0.005, "lmbda_clip": 0},
            "steps": 40, "batch_size": 4, "lr": 1e-3, "checkpoint_every": 20, "log_every": 10, "seed": 0, "threads": 1,
            "workers": {"num_workers": 1, "cpus_per_worker": 0.5}, "data": {"num_cpus": 0.5}, "ray": {"num_cpus": 2}}


def _get(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, ""
    except OSError as err:       # the job ended and took its dashboard with it
        return 0, str(err)


@pytest.mark.slow
def test_local_training_job_console_and_dashboard(small_shapes, tmp_path):
    """A codec training job as a user starts it, stdout to a pipe (a log, not a terminal): its
    console is its own lines — no worker noise, no cursor escapes — and while it runs its dashboard
    URL answers with the token (and refuses without it)."""
    config = tmp_path / "codec.yaml"
    config.write_text(yaml.safe_dump(_codec_cfg(tmp_path / "out")))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONWARNINGS")}
    env["ICM_RAY_DASHBOARD"] = "1"
    proc = subprocess.Popen([sys.executable, "pipelines/train_codec.py", "--config", str(config)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    answers = {}
    try:
        deadline = time.time() + 300
        url = None
        while time.time() < deadline and proc.poll() is None and url is None:
            found = [m for line in list(lines) if (m := re.search(r"Ray dashboard: (http://\S+)", line))]
            url = found[0][1] if found else None
            time.sleep(0.2)
        assert url, "no dashboard line:\n" + "".join(lines)
        assert url.startswith("http://127.0.0.2:")
        token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        token = os.environ.get("RAY_AUTH_TOKEN") or token_file.read_text().strip()
        answers["anonymous"] = _get(f"{url}/api/jobs/")
        answers["token"] = _get(f"{url}/api/jobs/", token)
        # (the Train page's API, /api/train/v2/runs, answered 500 "Train state data is not available"
        # here under Ray 2.60 although the jobs enable state tracking and the state actor is alive:
        # not asserted, see TRAPS.md)
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(30)
    log = "".join(lines)
    assert proc.returncode == 0, log[-4000:]

    assert answers["anonymous"][0] == 401
    status, body = answers["token"]
    assert status == 200, status
    jobs = json.loads(body)
    assert any(j["type"] == "DRIVER" and j["status"] == "RUNNING" and "train_codec.py" in (j.get("entrypoint") or "")
               for j in jobs)

    assert "\x1b" not in log and "\r" not in log                       # a log: no escapes, no redraws
    for noise in ("FutureWarning", "Failed to query Ray Train Controller", "Checkpoint successfully created",
                  "Reporting training result", "Token authentication is enabled", "Progress bars disabled",
                  "'PreemptionWatcher' and ID"):
        assert noise not in log, noise
    worker_lines = [line for line in lines if line.startswith("(RayTrainWorker")]
    assert worker_lines and len(set(worker_lines)) == len(worker_lines), worker_lines   # each printed once
    progress = [line for line in lines if line.startswith("[icm] training console-run:")]
    assert progress and progress[-1].startswith("[icm] training console-run: 40/40 steps")
    assert "== codec training summary ==" in log
    assert len(lines) < 60, log
