"""RoIAlign forward + backward as Faster R-CNN's box pooler runs it (FPN levels P2–P5, 7×7 bins,
sampling ratio 2, 256 channels), three ways, in one command:

* ``torchvision``: torchvision's kernels, deterministic algorithms off (CUDA: atomicAdd backward);
* ``fallback``: what torchvision does with deterministic algorithms on — its pure-PyTorch RoIAlign
  under ``torch.compile`` (sort-based ``index_put`` backward); accelerators only;
* ``separable``: ours (``icm.detectors.roi_align``), deterministic algorithms on.

Per setting: ms per forward+backward (CUDA-synchronised, after warm-up at the same shapes, the
median of ``--repeats``), peak memory, whether two backward passes are bitwise equal, the largest
difference from torchvision's gradient, and the aten/torchvision ops dispatched (counted on any
device). Prints a Markdown table and JSON.

    .venv/bin/python bench/roi_align_gpu.py [--device cuda] [--batch 16] [--rois 512] [--canvas 512]

Boxes: a fixed random mix of sizes (16–400 px, aspect 1:3–3:1) inside the canvas, as sampled ROIs are.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import OrderedDict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402
from torchvision.ops import MultiScaleRoIAlign  # noqa: E402

from icm.detectors import roi_align  # noqa: E402
from icm.detectors.roi_align import RoutedRoIAlign  # noqa: E402
from icm.dispatch import DispatchCounter  # noqa: E402


def case(batch: int, rois: int, canvas: int, device: torch.device):
    gen = torch.Generator().manual_seed(0)
    feats = OrderedDict((str(i), torch.randn(batch, 256, canvas // s, canvas // s, generator=gen).to(device))
                        for i, s in enumerate((4, 8, 16, 32)))
    side = torch.exp(torch.empty(batch * rois).uniform_(float(torch.log(torch.tensor(16.0))),
                                                        float(torch.log(torch.tensor(400.0))), generator=gen))
    aspect = torch.exp(torch.empty(batch * rois).uniform_(-1.1, 1.1, generator=gen))
    w, h = (side * aspect.sqrt()).clamp(max=canvas - 1), (side / aspect.sqrt()).clamp(max=canvas - 1)
    x1 = torch.rand(batch * rois, generator=gen) * (canvas - w)
    y1 = torch.rand(batch * rois, generator=gen) * (canvas - h)
    boxes = torch.stack([x1, y1, x1 + w, y1 + h], 1).view(batch, rois, 4).to(device)
    grad = torch.randn(batch * rois, 256, 7, 7, generator=gen).to(device)
    return feats, list(boxes), grad


def run(pool, feats, boxes, grad, size):
    inputs = OrderedDict((k, v.detach().requires_grad_(True)) for k, v in feats.items())
    out = pool(inputs, boxes, [(size, size)] * len(boxes))
    grads = torch.autograd.grad(out, list(inputs.values()), grad, allow_unused=True)   # a level may get no ROIs
    return [torch.zeros_like(v) if g is None else g for g, v in zip(grads, inputs.values())]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name, pool, deterministic, feats, boxes, grad, args, device, reference=None):
    torch.use_deterministic_algorithms(deterministic)
    try:
        for _ in range(2):   # warm-up at these shapes (the fallback compiles here)
            run(pool, feats, boxes, grad, args.canvas)
        with DispatchCounter() as count:
            first = run(pool, feats, boxes, grad, args.canvas)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(args.repeats):
            sync(device)
            t0 = time.perf_counter()
            second = run(pool, feats, boxes, grad, args.canvas)
            sync(device)
            times.append(time.perf_counter() - t0)
    finally:
        torch.use_deterministic_algorithms(False)
    return {"setting": name, "deterministic": deterministic, "ms": 1000 * statistics.median(times),
            "peak_MiB": torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None,
            "repeatable": all(torch.equal(a, b) for a, b in zip(first, second)),
            "max_diff_vs_torchvision": None if reference is None else
            max(float((a - b).abs().max()) for a, b in zip(first, reference)),
            "ops": count.ops}, first


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rois", type=int, default=512)
    p.add_argument("--canvas", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = False
    feats, boxes, grad = case(args.batch, args.rois, args.canvas, device)
    names = ["0", "1", "2", "3"]
    rows = []
    row, reference = measure("torchvision", MultiScaleRoIAlign(names, 7, 2), False, feats, boxes, grad, args, device)
    rows.append(row)
    if device.type != "cpu":   # torchvision swaps in its compiled fallback only on accelerators
        rows.append(measure("fallback", MultiScaleRoIAlign(names, 7, 2), True, feats, boxes, grad, args, device,
                            reference)[0])
    wanted = roi_align.separable_backward_wanted
    roi_align.separable_backward_wanted = lambda input: True   # on a CPU too, to count its ops
    try:
        rows.append(measure("separable", RoutedRoIAlign(names, 7, 2), True, feats, boxes, grad, args, device,
                            reference)[0])
    finally:
        roi_align.separable_backward_wanted = wanted
    base = rows[0]["ms"]
    print(f"{args.batch} images × {args.rois} ROIs, canvas {args.canvas}, {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), torch {torch.__version__}\n")
    print("| setting | deterministic | ms fwd+bwd | × torchvision | peak MiB | repeatable | max diff | ops |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['deterministic']} | {r['ms']:.2f} | {r['ms'] / base:.2f} | "
              f"{r['peak_MiB'] if r['peak_MiB'] is None else round(r['peak_MiB'])} | {r['repeatable']} | "
              f"{r['max_diff_vs_torchvision']} | {r['ops']} |")
    print(json.dumps({"args": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
