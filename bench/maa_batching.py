"""MAA at the stage level, Ray-free (so it runs on a GPU machine without Ray): images/s of
model-wise Meta-AAFG with the paper's trio of families for several batch sizes, the batched loss
path (one forward per batch, each image's loss from its slice) against the per-image path (one
forward per image), deterministic algorithms on and off. On CUDA it also samples GPU utilisation
(nvidia-smi) and records peak memory. One command, prints a Markdown table and JSON.

    .venv/bin/python bench/maa_batching.py [--canvas 512] [--batches 1 4 8 16] [--outer 10] [--inner 8]
        [--device auto] [--detectors yolov8n fasterrcnn_resnet50_fpn centernet_resnet50]

Random weights: speed does not depend on them. CPU runs here use a smaller setting (see RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from icm.maa.canvas import letterbox, to_tensor  # noqa: E402
from icm.maa.methods import Member, meta_aafg  # noqa: E402
from icm.maa.stage import MAAStage  # noqa: E402

CLASSES = ["circle", "square", "triangle", "cross"]


class GpuSampler:
    """Mean GPU utilisation (nvidia-smi, every 0.2 s) while it runs."""

    def __init__(self):
        self.samples, self.running = [], False

    def __enter__(self):
        self.running = shutil.which("nvidia-smi") is not None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while self.running:
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip():
                self.samples.append(float(out.stdout.split()[0]))
            time.sleep(0.2)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join(timeout=2)

    @property
    def mean(self):
        return round(float(np.mean(self.samples)), 1) if self.samples else None


def unit(stage: MAAStage, batch: int, seed: int = 0):
    """``batch`` letterboxed canvases (random texture, one object each) and the stage's members."""
    rng = np.random.default_rng(seed)
    side = stage.canvas * 3 // 4
    placed = [letterbox(to_tensor(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)), stage.canvas)
              for _ in range(batch)]
    x = torch.stack([c for c, _, _ in placed]).to(stage.device)
    mask = torch.stack([m for _, m, _ in placed]).to(stage.device)
    lo, hi = stage.canvas / 4, stage.canvas * 3 / 4
    box = torch.tensor([[lo, lo, hi, hi]], device=stage.device)
    groups = []
    for built in stage.groups:
        groups.append([Member(label, det, det.prepare_targets(
            [{"boxes": box, "labels": torch.tensor([1], device=stage.device)} for _ in range(batch)],
            (stage.canvas, stage.canvas)), list(range(batch))) for label, det, _ in built])
    return x, mask, groups


def measure(stage: MAAStage, batch: int, batched: bool, outer: int, inner: int, repeats: int) -> dict:
    for group in stage.groups:
        for _, det, _ in group:
            det.batched = batched
    x, mask, groups = unit(stage, batch)
    bound = stage.bound

    def run():
        return meta_aafg(x, mask, groups, lambda a: bound.project(a, x), outer=outer, inner_steps=inner,
                         alpha=stage.alpha)
    run()   # warm-up (cuDNN/oneDNN algorithm choice, allocator)
    if stage.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with GpuSampler() as gpu:
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        if stage.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    out = {"batch": batch, "path": "batched" if batched else "per-image",
           "images_per_s": round(batch * repeats / elapsed, 4)}
    if stage.device.type == "cuda":
        out |= {"gpu_util_pct": gpu.mean, "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)}
    return out


def per_family(stage: MAAStage, batch: int, repeats: int = 3) -> list[dict]:
    """Loss + input gradient of each detector alone, ms per image, per-image vs batched path."""
    from icm.maa.methods import gradient

    x, _, groups = unit(stage, batch)
    out = []
    for group in groups:
        for member in group:
            times = {}
            for batched in (False, True):
                member.detector.batched = batched
                gradient(lambda a: member.loss(a, 0), x)   # warm-up
                if stage.device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(repeats):
                    gradient(lambda a: member.loss(a, 0), x)
                if stage.device.type == "cuda":
                    torch.cuda.synchronize()
                times[batched] = (time.perf_counter() - start) * 1000 / (repeats * batch)
            out.append({"detector": member.name, "batch": batch, "per_image_ms": round(times[False], 2),
                        "batched_ms": round(times[True], 2), "ratio": round(times[False] / times[True], 2)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--canvas", type=int, default=512)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--outer", type=int, default=10)
    parser.add_argument("--inner", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--deterministic", choices=["on", "off", "both"], default="both")
    parser.add_argument("--detectors", nargs="+", default=["yolov8n", "fasterrcnn_resnet50_fpn", "centernet_resnet50"])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for det_on in {"on": [True], "off": [False], "both": [True, False]}[args.deterministic]:
            params = {"method": "meta_model", "canvas": args.canvas, "outer": args.outer, "inner_steps": args.inner,
                      "alpha": "2/255", "bound": {"type": "linf", "eps": "8/255"}, "device": args.device,
                      "deterministic": det_on, "seed": 0,
                      "detectors": [{"label": n, "name": n, "weights": f"random:{i}"}
                                    for i, n in enumerate(args.detectors)]}
            stage = MAAStage(tmp, params, CLASSES)
            for batch in args.batches:
                for batched in (False, True):
                    row = {"deterministic": det_on, **measure(stage, batch, batched, args.outer, args.inner,
                                                              args.repeats)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            device = stage.runtime["device_name"]
            families = per_family(stage, max(args.batches))
    print(f"\n{' + '.join(args.detectors)}, canvas {args.canvas}, outer {args.outer}, inner {args.inner}, "
          f"device {device}, torch {torch.__version__}")
    print("| deterministic | batch | per-image img/s | batched img/s | batched / per-image |"
          + (" GPU util % (batched) | peak GiB (batched) |" if "gpu_util_pct" in rows[0] else ""))
    print("|---|---|---|---|---|" + ("---|---|" if "gpu_util_pct" in rows[0] else ""))
    for det_on in sorted({r["deterministic"] for r in rows}, reverse=True):
        for batch in args.batches:
            a = next(r for r in rows if r["deterministic"] == det_on and r["batch"] == batch and r["path"] == "per-image")
            b = next(r for r in rows if r["deterministic"] == det_on and r["batch"] == batch and r["path"] == "batched")
            extra = f" {b.get('gpu_util_pct')} | {b.get('peak_mem_gib')} |" if "gpu_util_pct" in b else ""
            print(f"| {'on' if det_on else 'off'} | {batch} | {a['images_per_s']:.4f} | {b['images_per_s']:.4f} | "
                  f"{b['images_per_s'] / a['images_per_s']:.2f}× |{extra}")
    print(f"\nloss + input gradient per image at batch {max(args.batches)} (last deterministic setting):")
    print("| detector | per-image ms | batched ms | speed-up |\n|---|---|---|---|")
    for f in families:
        print(f"| {f['detector']} | {f['per_image_ms']} | {f['batched_ms']} | {f['ratio']}× |")
    print(json.dumps({"stage": rows, "per_family": families}))


if __name__ == "__main__":
    main()
