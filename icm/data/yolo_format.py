"""Write a reader's dataset in the layout ultralytics' trainer reads (images/ + labels/ txt with
normalised ``cls cx cy w h``, and a data yaml). Images are symlinked when possible, else copied."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import yaml

from icm.data.readers import Reader


def export_yolo(splits: dict[str, Reader], out_dir: str | Path) -> Path:
    """``splits`` maps split name (train/val) → reader; returns the data yaml path."""
    out_dir = Path(out_dir)
    classes = None
    for split, reader in splits.items():
        classes = classes or reader.classes
        if reader.classes != classes:
            raise ValueError(f"split {split} has classes {reader.classes}, expected {classes}")
        (out_dir / "images" / split).mkdir(parents=True, exist_ok=True)
        (out_dir / "labels" / split).mkdir(parents=True, exist_ok=True)
        for rec in reader.records():
            if rec["status"] != "ok":
                continue
            stem = rec["source_id"].replace("/", "_")
            image_dst = out_dir / "images" / split / f"{stem}{Path(rec['path']).suffix}"
            if not image_dst.exists():
                try:
                    os.symlink(rec["path"], image_dst)
                except OSError:
                    shutil.copy(rec["path"], image_dst)
            w, h = rec["width"], rec["height"]
            lines = [f"{int(c)} {(b[0] + b[2]) / 2 / w:.6f} {(b[1] + b[3]) / 2 / h:.6f} "
                     f"{(b[2] - b[0]) / w:.6f} {(b[3] - b[1]) / h:.6f}" for b, c in zip(rec["boxes"], rec["class_ids"])]
            (out_dir / "labels" / split / f"{stem}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
    data_yaml = out_dir / "data.yaml"
    data_yaml.write_text(yaml.safe_dump({"path": str(out_dir.resolve()), "train": "images/train",
                                         "val": "images/val" if "val" in splits else "images/train",
                                         "names": dict(enumerate(classes))}))
    return data_yaml
