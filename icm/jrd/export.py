"""Reading a JRD run back, and writing the OW-JRD authors' dataset layout from it.

Authors' layout (METHODS.md §5), one directory per ladder:
``train.json``/``val.json``/``test.json`` = ``{"paths", "labels", "names"}`` (one entry per
distorted crop, label 0 = recognised), ``JRD_info.json`` = ``{"<image_id>_<object_index>": jrd}``,
``objects_infos.json`` keyed by the same name (``CategoryId``, box, both JRD conventions, …),
crops under ``original/<name>/`` and ``distorted/<name>/``; plus ``crops.parquet`` describing
every crop.

Names sort the same lexicographically and naturally (the authors' ``PredictJRD`` pairs batches by
natural sort of names): every digit run of an image id is zero-padded to 12 digits, object
indices to 4, levels to 3. The authors' predictor assumes 64 levels; the ladders have: jpeg,
webp, avif, vvc 64 (by default), hevc 52 (QP 0..51), compressai ≤ 8, compressai-vbr 64.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from icm.data.storage import Storage

SPLITS = ("train", "val", "test")
AUTHORS_LEVELS = 64
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_DIGITS = re.compile(r"\d+")
OBJECT_COLUMNS = ["source_id", "image_id", "object_index", "category_id", "CategoryId", "class_name", "box", "area",
                  "levels", "recognised_pristine", "jrd", "first_unrecognised", "jrd_tolerant", "monotonic"]


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
    """``<image id>_<object index>``, filesystem-safe, with digit runs zero-padded so that
    lexicographic and natural order agree (``139`` sorts before ``1000`` both ways); a hash of the
    id is appended when making it safe changed characters (``a b`` and ``a_b`` stay apart)."""
    safe = _UNSAFE.sub("_", str(image_id)).strip("_") or "_"
    if safe != str(image_id):
        safe += "-" + hashlib.sha1(str(image_id).encode()).hexdigest()[:8]
    return f"{_DIGITS.sub(lambda m: m.group().zfill(12), safe)}_{object_index:04d}"


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


def _shards(run: Storage, kind: str, ladder: str, columns: list[str]):
    """The run's ``kind`` shards one at a time, rows of ``ladder`` only (bounded memory)."""
    for name in run.list(kind, ".parquet"):
        table = run.read_table(f"{kind}/{name}", columns)
        yield table.filter(pc.equal(table["ladder"], ladder))


def export_authors_layout(run_dir: str | Path, ladder: str, out_dir: str | Path,
                          fractions: dict[str, float] | None = None, seed: int = 0,
                          include_unrecognised: bool = False) -> dict[str, Any]:
    """Write the authors' files for one ladder of a run into ``out_dir`` (a path or URI), shard
    by shard: crops are streamed from the run's parquet shards to their PNGs, never all held in
    memory. Objects the detector does not recognise in the pristine image have no JRD in the
    authors' sense and are left out unless ``include_unrecognised``."""
    run, out = Storage(run_dir), Storage(out_dir)
    objects = read_table(run_dir, "objects", ladder, columns=OBJECT_COLUMNS + ["ladder"]).to_pylist()
    if not objects:
        raise ValueError(f"{run_dir}: no objects for ladder {ladder!r}")
    kept = {(o["source_id"], o["object_index"]): o for o in objects if include_unrecognised or o["recognised_pristine"]}
    names = {key: object_name(o["image_id"], o["object_index"]) for key, o in kept.items()}
    if len(set(names.values())) != len(names):
        raise ValueError(f"{run_dir}: object names collide after making them safe; rename the images")
    split_of = split_images([sid for sid, _ in kept], fractions or {"train": 0.8, "val": 0.1, "test": 0.1}, seed)
    jrd_info, infos = {}, {}
    for key, o in kept.items():
        jrd_info[names[key]] = int(max(o["jrd"], 0))
        infos[names[key]] = {k: o[k] for k in OBJECT_COLUMNS if k not in ("object_index",)} | {
            "object_index": o["object_index"], "split": split_of[o["source_id"]]}
    for table in _shards(run, "objects", ladder, ["source_id", "object_index", "ladder", "original_png"]):
        for sid, idx, png in zip(*(table[c].to_pylist() for c in ("source_id", "object_index", "original_png"))):
            if (sid, idx) in kept:
                out.write_bytes(f"original/{names[sid, idx]}/{names[sid, idx]}.png", png)
    crops = []
    level_columns = ["source_id", "object_index", "ladder", "level", "label", "bytes", "bpp", "codec_params", "crop_png"]
    for table in _shards(run, "levels", ladder, level_columns):
        rows = []
        for row in table.to_pylist():
            key = (row["source_id"], row["object_index"])
            if key not in kept:
                continue
            name = names[key]
            rel = f"distorted/{name}/{name}_{row['level']:03d}.png"
            out.write_bytes(rel, row.pop("crop_png"))
            rows.append({"name": name, "split": split_of[key[0]], "path": rel, **{k: row[k] for k in level_columns[:-1]
                                                                                 if k != "ladder"}})
        if rows:
            crops.append(pa.Table.from_pylist(rows))
    table = pa.concat_tables(crops).sort_by([("name", "ascending"), ("level", "ascending")])
    counts = {}
    for split in SPLITS:
        part = table.filter(pc.equal(table["split"], split))
        counts[split] = part.num_rows
        out.write_text(f"{split}.json", json.dumps({"paths": part["path"].to_pylist(), "labels": part["label"].to_pylist(),
                                                     "names": part["name"].to_pylist()}))
    out.write_text("JRD_info.json", json.dumps(jrd_info, indent=1, sort_keys=True))
    out.write_text("objects_infos.json", json.dumps(infos, indent=1, sort_keys=True))
    out.write_table("crops.parquet", table)
    levels = objects[0]["levels"]
    return {"dir": out.display(), "ladder": ladder, "levels": levels, "objects": len(kept),
            "objects_left_out_unrecognised_pristine": len(objects) - len(kept), "crops": counts,
            **({"note": f"{levels} levels: the authors' predictor assumes {AUTHORS_LEVELS}"}
               if levels != AUTHORS_LEVELS else {})}


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
