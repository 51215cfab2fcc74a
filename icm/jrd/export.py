"""Reading a JRD run back, and writing the OW-JRD authors' dataset layout from it.

Authors' layout (METHODS.md §5), one directory per ladder:
``train.json``/``val.json``/``test.json`` = ``{"paths", "labels", "names"}`` (one entry per
distorted crop, label 0 = recognised), ``JRD_info.json`` = ``{"<image_id>_<object_index>": jrd}``,
``objects_infos.json`` keyed by the same name (``CategoryId``, box, …), crops under
``original/<name>/`` and ``distorted/<name>/``; plus ``crops.parquet`` describing every crop.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from icm.data.storage import Storage

SPLITS = ("train", "val", "test")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def read_table(run_dir: str | Path, kind: str, ladder: str | None = None, columns: list[str] | None = None) -> pa.Table:
    """All unit shards of ``kind`` (``levels`` or ``objects``) of a run (a path or URI), sorted,
    optionally of one ladder."""
    storage = Storage(run_dir)
    shards = storage.read_tables(kind, columns)
    if not shards:
        raise FileNotFoundError(f"no {kind} shards under {storage.display(kind)}: run pipelines/jrd_dataset.py first")
    table = pa.concat_tables(shards)
    if ladder is not None:
        table = table.filter(pc.equal(table["ladder"], ladder))
    keys = [k for k in ("source_id", "object_index", "ladder", "level") if k in table.column_names]
    return table.sort_by([(k, "ascending") for k in keys])


def object_name(image_id: str, object_index: int) -> str:
    return f"{_UNSAFE.sub('_', str(image_id)).strip('_') or '_'}_{object_index}"


def split_images(source_ids: list[str], fractions: dict[str, float], seed: int) -> dict[str, str]:
    """Image → split, by a seeded permutation of the sorted ids (objects of one image stay together)."""
    ids = sorted(set(source_ids))
    order = np.random.default_rng(seed).permutation(len(ids))
    total = sum(fractions.get(s, 0) for s in SPLITS)
    if total <= 0:
        raise ValueError(f"split fractions {fractions} sum to zero")
    bounds = np.cumsum([fractions.get(s, 0) / total for s in SPLITS]) * len(ids)
    out = {}
    for rank, idx in enumerate(order):
        out[ids[idx]] = SPLITS[int(np.searchsorted(bounds, rank, side="right"))]
    return out


def export_authors_layout(run_dir: str | Path, ladder: str, out_dir: str | Path,
                          fractions: dict[str, float] | None = None, seed: int = 0,
                          include_unrecognised: bool = False) -> dict[str, Any]:
    """Write the authors' files for one ladder of a run into ``out_dir`` (a path or URI). Objects
    the detector never recognises, not even in the pristine image, carry no JRD and are left out
    unless ``include_unrecognised``."""
    out = Storage(out_dir)
    objects = read_table(run_dir, "objects", ladder).to_pylist()
    if not objects:
        raise ValueError(f"{run_dir}: no objects for ladder {ladder!r}")
    kept = [o for o in objects if include_unrecognised or o["jrd"] >= 0]
    keep_keys = {(o["source_id"], o["object_index"]) for o in kept}
    split_of = split_images([o["source_id"] for o in kept], fractions or {"train": 0.8, "val": 0.1, "test": 0.1}, seed)
    jrd_info, infos = {}, {}
    for o in kept:
        name = object_name(o["image_id"], o["object_index"])
        jrd_info[name] = int(max(o["jrd"], 0))
        infos[name] = {"CategoryId": o["CategoryId"], "category_id": o["category_id"], "class_name": o["class_name"],
                       "box": o["box"], "area": o["area"], "image_id": o["image_id"], "source_id": o["source_id"],
                       "jrd_tolerant": o["jrd_tolerant"], "monotonic": o["monotonic"], "split": split_of[o["source_id"]]}
        out.write_bytes(f"original/{name}/{name}.png", o["original_png"])
    entries = {s: {"paths": [], "labels": [], "names": []} for s in SPLITS}
    crops = []
    levels = read_table(run_dir, "levels", ladder)
    for row in levels.to_pylist():
        if (row["source_id"], row["object_index"]) not in keep_keys:
            continue
        name = object_name(row["image_id"], row["object_index"])
        rel = f"distorted/{name}/{name}_{row['level']:03d}.png"
        out.write_bytes(rel, row["crop_png"])
        split = split_of[row["source_id"]]
        entries[split]["paths"].append(rel)
        entries[split]["labels"].append(int(row["label"]))
        entries[split]["names"].append(name)
        crops.append({"name": name, "split": split, "path": rel, "level": row["level"], "label": row["label"],
                      "bytes": row["bytes"], "bpp": row["bpp"], "codec_params": row["codec_params"],
                      "source_id": row["source_id"], "object_index": row["object_index"]})
    for split, entry in entries.items():
        out.write_text(f"{split}.json", json.dumps(entry))
    out.write_text("JRD_info.json", json.dumps(jrd_info, indent=1, sort_keys=True))
    out.write_text("objects_infos.json", json.dumps(infos, indent=1, sort_keys=True))
    out.write_table("crops.parquet", pa.Table.from_pylist(crops))
    return {"dir": out.display(), "ladder": ladder, "objects": len(kept),
            "objects_left_out_unrecognised": len(objects) - len(kept),
            "crops": {s: len(e["paths"]) for s, e in entries.items()}}


def load_split(export_dir: str | Path, split: str) -> list[dict[str, Any]]:
    """One split as the predictor reads it: ``{"original", "distorted", "label", "name", "jrd"}``
    per distorted crop, with paths resolved under ``export_dir`` (never outside it)."""
    from icm.data.paths import resolve_under

    root = Path(export_dir)
    entry = json.loads((root / f"{split}.json").read_text())
    jrd_info = json.loads((root / "JRD_info.json").read_text())
    return [{"distorted": resolve_under(root, path), "original": resolve_under(root, f"original/{name}/{name}.png"),
             "label": int(label), "name": name, "jrd": jrd_info[name]}
            for path, label, name in zip(entry["paths"], entry["labels"], entry["names"])]
