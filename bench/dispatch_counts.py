"""Aten ops and host syncs dispatched by one loss + input-gradient step of each detector family, at
several batch sizes (`icm.dispatch.DispatchCounter`). A GPU step whose op count grows with the batch,
or that waits on the device inside it, is host-bound; both are properties of the code, counted here
on a CPU.

    .venv/bin/python bench/dispatch_counts.py [--canvas 128] [--batches 1 8 16]
        [--detectors yolov8n fasterrcnn_mobilenet_v3_large_fpn centernet_resnet18 ...] [--device cuda]

The step is the MAA stage's: frozen detector (random weights), targets through
``Detector.prepare_targets`` once (as a unit does), then ``gradient(member.loss)``; one warm-up
step, then one counted step. Two boxes per image, per-image seeds. Prints a Markdown table and JSON.

``--device cuda`` runs the step on the GPU under ``deterministic: true`` (strict: an op with no
deterministic kernel is named in the table instead of counts) and adds the synchronisations CUDA
itself reports (``torch.cuda.set_sync_debug_mode``): these include the blocking host-to-device
copies a CPU count cannot see.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

import torch  # noqa: E402

from icm.dispatch import DispatchCounter  # noqa: E402
from icm.maa.methods import Member, gradient  # noqa: E402
from icm.runtime import configure  # noqa: E402
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


def count_step(detector, batch: int, canvas: int, device: torch.device) -> dict:
    """One MAA step (loss + input gradient) of ``detector`` on ``batch`` canvases, counted after a
    warm-up step: ops and syncs dispatched, and on CUDA the syncs CUDA reports."""
    x = torch.rand(batch, 3, canvas, canvas, generator=torch.Generator().manual_seed(1)).to(device)
    targets = [{k: v.to(device) for k, v in t.items()} for t in two_boxes(canvas, batch)]
    member = Member("d", detector, detector.prepare_targets(targets, (canvas, canvas)), list(range(batch)))
    gradient(lambda a: member.loss(a, 0), x)
    if device.type != "cuda":
        with DispatchCounter() as counter:
            gradient(lambda a: member.loss(a, 1), x)
        return counter.as_dict()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught, DispatchCounter() as counter:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            gradient(lambda a: member.loss(a, 1), x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    cuda_syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    return {**counter.as_dict(), "cuda_syncs": len(cuda_syncs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--canvas", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--detectors", nargs="+", default=DETECTORS)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        configure(deterministic=True)
    rows = []
    for name in args.detectors:
        det = build_detector(name, CLASSES, weights="random:1", image_size=args.canvas).freeze().to(device)
        try:
            rows.append({"detector": name, **{f"B={b}": count_step(det, b, args.canvas, device) for b in args.batches}})
        except RuntimeError as exc:   # strict determinism on CUDA: name the op
            rows.append({"detector": name, "error": str(exc).splitlines()[0][:160]})
        print(json.dumps(rows[-1]), flush=True)
    last = args.batches[-1]
    arrow = " → "
    batches = arrow.join(map(str, args.batches))
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"\ncanvas {args.canvas}, random weights, two boxes per image, {name}, torch {torch.__version__}"
          + (", deterministic: true" if cuda else ""))
    print(f"| detector | ops/step B={batches} | syncs/step B={batches} | sync ops at B={last} |"
          + (f" CUDA syncs/step B={batches} |" if cuda else "") + "\n|---|---|---|---|" + ("---|" if cuda else ""))
    for r in rows:
        if "error" in r:
            print(f"| {r['detector']} | fails: {r['error']} | | |" + (" |" if cuda else ""))
            continue
        ops = [r[f"B={b}"]["ops"] for b in args.batches]
        syncs = [r[f"B={b}"]["syncs"] for b in args.batches]
        sync_ops = ", ".join(f"{k} {v}" for k, v in sorted(r[f"B={last}"]["sync_ops"].items())) or "none"
        extra = f" {arrow.join(str(r[f'B={b}']['cuda_syncs']) for b in args.batches)} |" if cuda else ""
        print(f"| {r['detector']} | {arrow.join(map(str, ops))} ({ops[-1] / ops[0]:.1f}×) | "
              f"{arrow.join(map(str, syncs))} | {sync_ops} |{extra}")
    print(json.dumps({"canvas": args.canvas, "batches": args.batches, "device": str(device), "rows": rows}))


if __name__ == "__main__":
    main()
