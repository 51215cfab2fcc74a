"""CenterNet on the shapes set: the paper's ResNet variant vs the one with skip connections.

Ray-free (``LocalSession``), so it runs on a lent GPU without Ray. Each variant trains with the
project's detector loop from the same pretrained trunk and is scored on the photo val split three
ways: COCO mAP@.5 (per class, the figure ``train_detectors`` reports), class-agnostic mAP@.5
(localisation alone), and mAP@.5 when each peak keeps only its best class (class separation).

    python bench/centernet_variants.py --epochs 6 --device cuda
    python bench/centernet_variants.py --backbone trained:photo-resnet18 --epochs 2 --train-images 200
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from icm.data.readers import build_reader  # noqa: E402
from icm.detectors.evaluate import evaluate_detector  # noqa: E402
from icm.train.detectors import train_backbone_loop, train_detector_loop  # noqa: E402
from icm.train.session import LocalSession  # noqa: E402
from icm.zoo import build_detector  # noqa: E402


def pretrain_backbone(records: list[dict], classes: list[str], steps: int, device: str, out: Path) -> str:
    session = LocalSession({"train": records}, out / "backbone", device=device)
    train_backbone_loop({"name": "resnet18", "classes": classes, "steps": steps, "batch_size": 64,
                         "lr": 2e-3, "crop": 64, "seed": 0}, session)
    path = out / "backbone.pth"
    torch.save(torch.load(out / "backbone" / "state.pt", weights_only=True)["model"], path)
    return str(path)


def scores(det, records: list[dict], canvas: int, device: str) -> dict[str, float]:
    per_class = evaluate_detector(det, records, canvas, device=device)["map50"]
    one = det.classes[0]
    agnostic_records = [{**r, "class_names": [one] * len(r["class_names"])} for r in records]
    predict = det.predict

    def agnostic(images, **kwargs):
        return [{**p, "labels": torch.zeros_like(p["labels"])} for p in predict(images, **kwargs)]

    det.predict = agnostic
    try:
        agnostic_map = evaluate_detector(det, agnostic_records, canvas, device=device)["map50"]
    finally:
        det.predict = predict
    return {"map50": per_class, "agnostic_map50": agnostic_map}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=["centernet_resnet18", "centernet_resnet18_skip"])
    ap.add_argument("--epochs", type=int, nargs="+", default=[6])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--canvas", type=int, default=128)
    ap.add_argument("--train-images", type=int, default=0, help="0: the whole train split")
    ap.add_argument("--backbone", default="", help="trunk weights spec; empty: pretrain one here")
    ap.add_argument("--backbone-steps", type=int, default=160)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    train = build_reader({"type": "shapes", "domain": "photo", "split": "train"})
    val = build_reader({"type": "shapes", "domain": "photo", "split": "val"})
    records = [r for r in train.records() if r["status"] == "ok"]
    if args.train_images:
        records = records[:args.train_images]
    val_records = list(val.records())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        backbone = args.backbone
        if not backbone:
            start = time.time()
            backbone = pretrain_backbone(records, train.classes, args.backbone_steps, args.device, tmp)
            print(f"backbone pretrained in {time.time() - start:.0f} s", flush=True)
        for variant in args.variants:
            for epochs in args.epochs:
                run = tmp / f"{variant}-{epochs}"
                session = LocalSession({"train": records}, run, device=args.device)
                cfg = {"name": variant, "classes": train.classes, "canvas": args.canvas, "epochs": epochs,
                       "batch_size": args.batch_size, "lr": args.lr, "seed": 0,
                       "total_steps": epochs * (len(records) // args.batch_size),
                       "model_kwargs": {"backbone_weights": backbone}}
                start = time.time()
                train_detector_loop(cfg, session)
                elapsed = time.time() - start
                det = build_detector(variant, train.classes, weights=str(run / "state.pt"), image_size=args.canvas)
                row = {"variant": variant, "epochs": epochs, "train_s": round(elapsed, 1),
                       "final_loss": session.reports[-1]["loss"], **scores(det.to(args.device).freeze(), val_records,
                                                                          args.canvas, args.device)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": args.device, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
