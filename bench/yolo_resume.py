"""What ultralytics' own resume gives the YOLO detectors (they train with its trainer, not the
project's harness): an uninterrupted run twice (is the trainer deterministic here?), and the same
run killed right after its first epoch's ``last.pt`` and resumed the way ``train_yolo`` resumes
(``YOLO(last.pt).train(resume=True)``). Prints per-epoch train losses and the weight difference
to the uninterrupted run.

    .venv/bin/python bench/yolo_resume.py [--epochs 4] [--canvas 64]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

import torch  # noqa: E402

from icm.data.readers import build_reader  # noqa: E402
from icm.data.yolo_format import export_yolo  # noqa: E402
from icm.train.detectors import train_yolo  # noqa: E402

SHAPES = {"type": "shapes", "domain": "photo", "n_train": 24, "n_val": 12, "seed": 7}


def config(args) -> dict:
    return {"name": "yolov8n", "canvas": args.canvas, "epochs": args.epochs, "batch_size": 8, "lr": 0.004, "seed": 0,
            "close_mosaic": 1, "train_args": {"optimizer": "AdamW", "warmup_epochs": 1, "val": False}}


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run_dir / "weights" / "last.pt", map_location="cpu", weights_only=False)   # our own run's file
    return {k: v.float() for k, v in (ckpt.get("ema") or ckpt["model"]).state_dict().items()}


def losses(run_dir: Path) -> list[float]:
    rows = (run_dir / "results.csv").read_text().strip().splitlines()
    column = [c.strip() for c in rows[0].split(",")].index("train/box_loss")
    return [round(float(r.split(",")[column]), 4) for r in rows[1:]]


def compare(a: dict, b: dict) -> dict:
    worst = max((float((a[k] - b[k]).norm() / (a[k].norm() + 1e-12)), k) for k in a if a[k].is_floating_point())
    return {"bitwise_equal": all(torch.equal(a[k], b[k]) for k in a), "worst_relative_l2": round(worst[0], 4),
            "in": worst[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--canvas", type=int, default=64)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)   # (data yaml, runs dir): the run to kill
    args = parser.parse_args()
    if args.child:
        train_yolo({**config(args), "run_name": "killed"}, args.child[0], args.child[1])
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data_yaml = export_yolo({split: build_reader({**SHAPES, "split": split}) for split in ("train", "val")},
                                root / "yolo-data")
        runs = root / "runs"
        for name in ("straight", "again"):
            train_yolo({**config(args), "run_name": name}, str(data_yaml), str(runs))
        child = subprocess.Popen([sys.executable, __file__, "--epochs", str(args.epochs), "--canvas", str(args.canvas),
                                  "--child", str(data_yaml), str(runs)], start_new_session=True,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        last = runs / "killed" / "weights" / "last.pt"
        while child.poll() is None and not last.is_file():
            time.sleep(0.2)
        time.sleep(1)   # last.pt is written whole before the next epoch starts
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        killed_after = torch.load(last, map_location="cpu", weights_only=False)["epoch"] + 1
        train_yolo({**config(args), "run_name": "killed"}, str(data_yaml), str(runs))   # train_yolo's resume
        straight = weights(runs / "straight")
        print(json.dumps({"epochs": args.epochs, "killed_after_epoch": killed_after,
                          "train_box_loss": {name: losses(runs / name) for name in ("straight", "again", "killed")},
                          "uninterrupted_twice": compare(straight, weights(runs / "again")),
                          "killed_and_resumed_vs_uninterrupted": compare(straight, weights(runs / "killed"))}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("ICM_DATA_DIR", str(Path(tempfile.gettempdir()) / "icm-yolo-resume-data"))
    main()
