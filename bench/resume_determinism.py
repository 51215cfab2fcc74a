"""Is a resumed codec training run the uninterrupted run, bit for bit, on this device? The codec
loop on the project's stream (in one process, no Ray: it runs where only torch and CompressAI
are installed, e.g. a lent GPU), once straight and once stopped after a checkpoint inside an epoch
and resumed, with and without deterministic algorithms. On CPU both are bitwise equal (the test
suite checks it through Ray Train with 2 workers); on CUDA non-deterministic kernels may make
even two straight runs differ.

    .venv/bin/python bench/resume_determinism.py [--device cuda] [--steps 12] [--stop 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from icm.train.codec import train_codec_loop  # noqa: E402
from icm.train.inputs import crop_pair  # noqa: E402
from icm.train.session import LocalSession  # noqa: E402
from icm.train.stream import Stream, row_rng  # noqa: E402

CODEC = {"name": "ugicm:bmshj2018-hyperprior", "quality": 1, "channels": [32, 48], "cond_dim": 32, "weights": "random:0"}


class Stopped(Exception):
    pass


def images(n: int = 24) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"id": f"img{i}", "image": rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)} for i in range(n)]


def decode(item: dict, epoch: int) -> dict:
    x = item["image"]
    return crop_pair(x, x, np.array([[10, 10, 60, 60]]), 64, row_rng(0, epoch, item["id"]))


def run(cfg: dict, device: str, checkpoints: Path, stop_at: int | None = None) -> dict[str, torch.Tensor]:
    class StoppingSession(LocalSession):
        def _save(self, metrics, state):
            super()._save(metrics, state)
            if stop_at is not None and state is not None and metrics["step"] == stop_at:
                raise Stopped

    stream = Stream(items=images(), decode=decode, seed=0)
    try:
        model = train_codec_loop(cfg, StoppingSession({"train": stream}, checkpoints, device))
    except Stopped:
        model = train_codec_loop(cfg, LocalSession({"train": stream}, checkpoints, device))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def compare(a: dict, b: dict) -> dict:
    worst = max(float((a[k].double() - b[k].double()).norm() / (a[k].double().norm() + 1e-12)) for k in a
                if a[k].is_floating_point())
    return {"bitwise_equal": all(torch.equal(a[k], b[k]) for k in a), "worst_relative_l2": worst}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--stop", type=int, default=5, help="the checkpoint step to stop and resume at (inside the first epoch: 6 batches)")
    args = parser.parse_args()
    cfg = {"codec": CODEC, "loss": {"type": "ugicm", "lmbda": 0.01, "lmbda_machine": 0.005, "lmbda_clip": 0},
           "steps": args.steps, "batch_size": 4, "lr": 1e-3, "checkpoint_every": args.stop, "log_every": args.stop,
           "seed": 0}
    out = {"device": args.device, "torch": torch.__version__, "steps": args.steps, "resumed_at": args.stop}
    for deterministic in (False, True):
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        torch.backends.cudnn.benchmark = not deterministic
        with tempfile.TemporaryDirectory() as tmp:
            straight = run(cfg, args.device, Path(tmp) / "a")
            again = run(cfg, args.device, Path(tmp) / "b")
            resumed = run(cfg, args.device, Path(tmp) / "c", stop_at=args.stop)
        out["deterministic" if deterministic else "default"] = {
            "straight_twice": compare(straight, again), "resumed_vs_straight": compare(straight, resumed)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # deterministic cuBLAS (TRAPS.md)
    main()
