"""torchvision detector families on a GPU: one loss + input-gradient step (the MAA hot path) per
family at batch 1 and ``--batch``, deterministic algorithms off and on (``warn_only=False``: an op
without a deterministic CUDA kernel fails the run, naming itself), in one command:

* ms per step (CUDA-synchronised, after a warm-up step at the same shape, median of ``--repeats``);
* host syncs per step, as CUDA sees them (``torch.cuda.set_sync_debug_mode("warn")``: one warning per
  synchronising call — NMS, the ROI-level counts, Mask R-CNN's positive ROIs — and any copy);
* deterministic: whether two steps give bitwise-equal input gradients.

    .venv/bin/python bench/tv_detectors_gpu.py [--canvas 512] [--batch 16] [--repeats 3]
        [--detectors fasterrcnn_resnet50_fpn maskrcnn_resnet50_fpn retinanet_resnet50_fpn fcos_resnet50_fpn]

Random weights (speed does not depend on them), two boxes per image. Prints a Markdown table and JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402

from icm.detectors import total  # noqa: E402
from icm.zoo import build_detector  # noqa: E402

CLASSES = ["circle", "square", "triangle"]


def step(det, x, targets):
    x = x.detach().requires_grad_(True)
    total(det.loss(x, targets)).backward()
    return x.grad


def measure(det, batch, canvas, deterministic, repeats, device):
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = False
    try:
        gen = torch.Generator().manual_seed(batch)
        x = torch.rand(batch, 3, canvas, canvas, generator=gen).to(device)
        c = canvas / 128
        boxes = torch.tensor([[10.0, 12.0, 60.0, 70.0], [50.0, 40.0, 120.0, 110.0]], device=device) * c
        targets = det.prepare_targets([{"boxes": boxes, "labels": torch.tensor([0, 2], device=device), "seed": i}
                                       for i in range(batch)], (canvas, canvas))
        first = step(det, x, targets)   # warm-up at this shape
        torch.cuda.synchronize(device)
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            second = step(det, x, targets)
            torch.cuda.synchronize(device)
        torch.cuda.set_sync_debug_mode(0)
        syncs = sum("synchroniz" in str(w.message) for w in caught)
        times = []
        for _ in range(repeats):
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            step(det, x, targets)
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
    finally:
        torch.cuda.set_sync_debug_mode(0)
        torch.use_deterministic_algorithms(False)
    return {"batch": batch, "deterministic": deterministic, "ms_per_image": 1000 * statistics.median(times) / batch,
            "cuda_syncs": syncs, "bitwise_repeatable": bool(torch.equal(first, second))}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--canvas", type=int, default=512)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--detectors", nargs="+", default=["fasterrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn",
                                                       "retinanet_resnet50_fpn", "fcos_resnet50_fpn"])
    args = p.parse_args()
    device = torch.device("cuda")
    rows = []
    for name in args.detectors:
        det = build_detector(name, CLASSES, weights="random:1", image_size=args.canvas).freeze().to(device)
        for deterministic in (False, True):
            for batch in (1, args.batch):
                try:
                    row = measure(det, batch, args.canvas, deterministic, args.repeats, device)
                except RuntimeError as exc:   # an op without a deterministic kernel: name it
                    row = {"batch": batch, "deterministic": deterministic, "error": str(exc).splitlines()[0]}
                rows.append({"detector": name, **row})
                print(json.dumps(rows[-1]), flush=True)
        del det
        torch.cuda.empty_cache()
    print(f"\ncanvas {args.canvas}, {torch.cuda.get_device_name(device)}, torch {torch.__version__}\n")
    print("| detector | deterministic | batch | ms / image | CUDA syncs / step | bitwise repeatable |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['detector']} | {r['deterministic']} | {r['batch']} | error: {r['error']} | | |")
        else:
            print(f"| {r['detector']} | {r['deterministic']} | {r['batch']} | {r['ms_per_image']:.2f} | "
                  f"{r['cuda_syncs']} | {r['bitwise_repeatable']} |")
    print(json.dumps({"args": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
