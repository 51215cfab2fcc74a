"""One record per image: the unit every reader yields and every stage consumes.

A *reference* (``ImageRef``) is what a reader knows without decoding pixels: ids, path and
annotations. ``load_record`` decodes it into a record (a plain dict, so it crosses Ray Data
unchanged) and repairs what can be repaired — RGBA/gray/16-bit to RGB uint8, boxes clipped to the
image, degenerate boxes dropped — noting each repair. What cannot be repaired (missing, empty,
corrupt or too small files, escaping paths) becomes an error record: a property of the image, final.
A storage fault (a refused grant, throttling, a dropped connection) is not a property of the image:
``load_record`` raises ``StorageUnavailable`` for it, so the work unit fails and is retried.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from icm.data.paths import PathEscapesRoot, resolve_location_under
from icm.data.storage import read_file

STATUS_OK = "ok"
STATUS_ERROR = "error"
STATUS_SKIPPED = "skipped"


@dataclass
class ImageRef:
    """What a reader knows about an image before decoding it."""

    source_id: str               # stable: "<dataset>/<image id>"
    dataset: str
    image_id: str
    root: str                    # dataset root; `path` must resolve under it
    path: str                    # as written in the annotation / list file
    boxes: list[list[float]] = field(default_factory=list)   # xyxy, pixels
    class_ids: list[int] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str = ""              # set when the annotation itself is unusable

    def to_dict(self) -> dict[str, Any]:
        """A plain dict of copies (``dataclasses.asdict`` deep-copies generically: 10x slower, and a
        COCO-sized job turns 118 k references into dicts on the driver)."""
        return {"source_id": self.source_id, "dataset": self.dataset, "image_id": self.image_id, "root": self.root,
                "path": self.path, "boxes": [list(b) for b in self.boxes], "class_ids": list(self.class_ids),
                "class_names": list(self.class_names), "notes": list(self.notes), "error": self.error}


def decode_rgb(path: str | io.BytesIO) -> tuple[np.ndarray, list[str]]:
    """Decode an image file (a path, or its bytes in a ``BytesIO``) to HxWx3 uint8 RGB, returning
    the repairs made."""
    notes: list[str] = []
    with Image.open(path) as im:
        im.load()
        mode = im.mode
        if mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, dtype=np.float64)
            scale = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
            arr = np.clip(np.round(arr / scale * 255.0), 0, 255).astype(np.uint8)
            notes.append(f"converted {mode} (16-bit) to 8-bit RGB")
            return np.repeat(arr[..., None], 3, axis=2), notes
        if mode == "RGB":
            return np.asarray(im, dtype=np.uint8).copy(), notes
        if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgb = Image.alpha_composite(background, rgba).convert("RGB")
            notes.append(f"composited {mode} alpha over white")
            return np.asarray(rgb, dtype=np.uint8).copy(), notes
        notes.append(f"converted {mode} to RGB")
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy(), notes


def sanitize_boxes(boxes: np.ndarray, class_ids: np.ndarray, class_names: list[str],
                   width: int, height: int, min_side: float = 1.0):
    """Clip xyxy boxes to the image and drop degenerate ones, returning the repairs made."""
    notes: list[str] = []
    if len(boxes) == 0:
        return boxes.reshape(0, 4).astype(np.float32), class_ids.astype(np.int64), [], notes
    bad = ~np.isfinite(boxes).all(axis=1)
    clipped = boxes.copy()
    clipped[:, [0, 2]] = np.clip(clipped[:, [0, 2]], 0, width)
    clipped[:, [1, 3]] = np.clip(clipped[:, [1, 3]], 0, height)
    n_clipped = int((np.abs(clipped - np.nan_to_num(boxes)) > 1e-6).any(axis=1)[~bad].sum())
    if n_clipped:
        notes.append(f"clipped {n_clipped} box(es) to the image")
    keep = ~bad & ((clipped[:, 2] - clipped[:, 0]) >= min_side) & ((clipped[:, 3] - clipped[:, 1]) >= min_side)
    if (~keep).any():
        notes.append(f"dropped {int((~keep).sum())} degenerate box(es)")
    names = [n for n, k in zip(class_names, keep) if k]
    return clipped[keep].astype(np.float32), class_ids[keep].astype(np.int64), names, notes


def decode_failure(head: bytes, exc: Exception) -> str:
    """What is wrong with a file (starting with ``head``) no decoder could read, in words. (After
    ``import ultralytics`` Pillow's failure to identify a file surfaces as ``ModuleNotFoundError:
    pi_heif``: ultralytics retries unidentified files with a HEIF plugin it tries to install.)"""
    if isinstance(exc, (UnidentifiedImageError, ModuleNotFoundError)):
        if head[4:8] == b"ftyp" and head[8:12] in (b"heic", b"heix", b"mif1", b"msf1", b"hevc"):
            return "a HEIF/HEIC image: install pi-heif to read it, or convert it to PNG/JPEG"
        return "not an image (no decoder recognises its contents)"
    if isinstance(exc, OSError):
        return f"truncated or corrupt image ({exc})"
    return f"{type(exc).__name__}: {exc}"


def error_record(ref: dict[str, Any], reason: str) -> dict[str, Any]:
    return {**_base(ref), "status": STATUS_ERROR, "error": reason,
            "image": None, "width": 0, "height": 0,
            "boxes": np.zeros((0, 4), np.float32), "class_ids": np.zeros((0,), np.int64),
            "class_names": []}


def _base(ref: dict[str, Any]) -> dict[str, Any]:
    return {"source_id": ref["source_id"], "dataset": ref["dataset"], "image_id": ref["image_id"],
            "path": ref["path"], "notes": list(ref.get("notes") or [])}


def load_record(ref: dict[str, Any] | ImageRef, min_side: int = 1) -> dict[str, Any]:
    """Decode one reference into a record. Bad input becomes an error record; a storage fault
    raises ``StorageUnavailable`` (the caller's unit fails and is retried)."""
    if isinstance(ref, ImageRef):
        ref = ref.to_dict()
    if ref.get("error"):
        return error_record(ref, ref["error"])
    try:
        path = resolve_location_under(ref["root"], ref["path"])
    except PathEscapesRoot as exc:
        return error_record(ref, str(exc))
    data = read_file(path)   # one HEAD + one GET on object storage; StorageUnavailable propagates
    if data is None:
        return error_record(ref, f"file not found: {path}")
    if not data:
        return error_record(ref, f"empty file: {path} has 0 bytes")
    try:
        image, decode_notes = decode_rgb(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 - any decoder failure (plugins raise odd types) is bad input
        return error_record(ref, f"cannot decode {path}: {decode_failure(data[:12], exc)}")
    height, width = image.shape[:2]
    if min(height, width) < min_side:
        return error_record(ref, f"image {width}x{height} is smaller than the minimum side {min_side}")
    boxes = np.asarray(ref.get("boxes") or [], dtype=np.float64).reshape(-1, 4)
    class_ids = np.asarray(ref.get("class_ids") or [], dtype=np.int64)
    names = list(ref.get("class_names") or [])
    boxes, class_ids, names, box_notes = sanitize_boxes(boxes, class_ids, names, width, height)
    record = _base(ref)
    record["path"] = path
    record["notes"] += decode_notes + box_notes
    record.update(status=STATUS_OK, error="", image=image, width=width, height=height,
                  boxes=boxes, class_ids=class_ids, class_names=names)
    return record
