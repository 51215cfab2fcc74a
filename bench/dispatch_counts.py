"""Aten ops and host syncs dispatched by one loss + input-gradient step of each detector family, at
several batch sizes (`icm.dispatch.DispatchCounter`). A GPU step whose op count grows with the batch,
or that waits on the device inside it, is host-bound; both are properties of the code, counted here
on a CPU.

    .venv/bin/python bench/dispatch_counts.py [--canvas 128] [--batches 1 8 16]
        [--detectors yolov8n fasterrcnn_mobilenet_v3_large_fpn centernet_resnet18 ...]

The step is the MAA stage's: frozen detector (random weights), targets through
``Detector.prepare_targets`` once (as a unit does), then ``gradient(member.loss)``; one warm-up
step, then one counted step. Two boxes per image, per-image seeds. Prints a Markdown table and JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

import torch  # noqa: E402

from icm.dispatch import DispatchCounter  # noqa: E402
from icm.maa.methods import Member, gradient  # noqa: E402
from icm.zoo import build_detector  # noqa: E402

CLASSES = ["circle", "square", "triangle", "cross"]
DETECTORS = ["yolov8n", "fasterrcnn_mobilenet_v3_large_fpn", "centernet_resnet18", "retinanet_resnet50_fpn",
             "fcos_resnet50_fpn"]


def two_boxes(canvas: int, batch: int, seed: int = 0) -> list[dict]:
    """Two boxes per image, at places and sizes that differ from image to image."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batch):
        xy = torch.rand(2, 2, generator=g) * canvas * 0.5
        wh = (0.15 + torch.rand(2, 2, generator=g) * 0.35) * canvas
        out.append({"boxes": torch.cat([xy, (xy + wh).clamp(max=canvas)], 1),
                    "labels": torch.randint(len(CLASSES), (2,), generator=g)})
    return out


def count_step(detector, batch: int, canvas: int) -> DispatchCounter:
    """One MAA step (loss + input gradient) of ``detector`` on ``batch`` canvases, counted after a
    warm-up step."""
    x = torch.rand(batch, 3, canvas, canvas, generator=torch.Generator().manual_seed(1))
    member = Member("d", detector, detector.prepare_targets(two_boxes(canvas, batch), (canvas, canvas)),
                    list(range(batch)))
    gradient(lambda a: member.loss(a, 0), x)
    with DispatchCounter() as counter:
        gradient(lambda a: member.loss(a, 1), x)
    return counter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--canvas", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--detectors", nargs="+", default=DETECTORS)
    args = parser.parse_args()
    rows = []
    for name in args.detectors:
        det = build_detector(name, CLASSES, weights="random:1", image_size=args.canvas).freeze()
        counts = {b: count_step(det, b, args.canvas) for b in args.batches}
        rows.append({"detector": name, **{f"B={b}": c.as_dict() for b, c in counts.items()}})
        print(json.dumps(rows[-1]), flush=True)
    first, last = args.batches[0], args.batches[-1]
    arrow = " → "
    print(f"\ncanvas {args.canvas}, random weights, two boxes per image, CPU, torch {torch.__version__}")
    print(f"| detector | ops/step B={arrow.join(map(str, args.batches))} | syncs/step B={arrow.join(map(str, args.batches))} "
          f"| sync ops at B={last} |\n|---|---|---|---|")
    for r in rows:
        ops = [r[f"B={b}"]["ops"] for b in args.batches]
        syncs = [r[f"B={b}"]["syncs"] for b in args.batches]
        sync_ops = ", ".join(f"{k} {v}" for k, v in sorted(r[f"B={last}"]["sync_ops"].items())) or "none"
        print(f"| {r['detector']} | {arrow.join(map(str, ops))} ({ops[-1] / ops[0]:.1f}×) | "
              f"{arrow.join(map(str, syncs))} | {sync_ops} |")
    print(json.dumps({"canvas": args.canvas, "batches": args.batches, "first": first, "rows": rows}))


if __name__ == "__main__":
    main()
