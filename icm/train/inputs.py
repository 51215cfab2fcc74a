"""The decode and expand functions of the training streams (``icm.train.stream``). They run in
Ray Data tasks, so this module imports only numpy and the data layer — not the training loops'
torch / CompressAI / detector stack, which a fresh Ray worker would otherwise import for every
image it crops."""

from __future__ import annotations

import numpy as np

from icm.data.records import decode_rgb, load_record
from icm.data.writers import decode_png
from icm.train.stream import row_rng


def crop_pair(image: np.ndarray, target: np.ndarray, boxes: np.ndarray, size: int,
              rng: np.random.Generator, labels: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """One random ``size`` crop and horizontal flip, the same for the image, its machine target
    and its boxes (TRAPS.md: a crop applied to an image must be applied to its MAA target), with
    the class ids of the boxes that stay in the crop. Images smaller than the crop are padded by
    edge replication."""
    if image.shape != target.shape:
        raise ValueError(f"image {image.shape} and machine target {target.shape} differ in size")
    h, w = image.shape[:2]
    pad = ((0, max(0, size - h)), (0, max(0, size - w)), (0, 0))
    if any(p[1] for p in pad[:2]):
        image, target = np.pad(image, pad, mode="edge"), np.pad(target, pad, mode="edge")
        h, w = image.shape[:2]
    top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    x = image[top:top + size, left:left + size]
    t = target[top:top + size, left:left + size]
    b = np.asarray(boxes, np.float32).reshape(-1, 4) - np.array([left, top, left, top], np.float32)
    b = b.clip(0, size)
    inside = (b[:, 2] - b[:, 0] >= 2) & (b[:, 3] - b[:, 1] >= 2)
    b = b[inside]
    kept = (np.zeros(len(inside), np.int64) if labels is None else np.asarray(labels, np.int64).reshape(-1))[inside]
    if rng.random() < 0.5:
        x, t = x[:, ::-1], t[:, ::-1]
        b = np.stack([size - b[:, 2], b[:, 1], size - b[:, 0], b[:, 3]], 1) if len(b) else b
    return {"x": np.ascontiguousarray(x), "target": np.ascontiguousarray(t),
            "boxes": b.reshape(-1).astype(np.float32), "labels": kept}


def read_target(path: str) -> np.ndarray:
    """A machine target image (an MAA output) from a local path or an object-store URI."""
    if "://" in path:
        import pyarrow.fs as pafs

        fs, key = pafs.FileSystem.from_uri(path)
        with fs.open_input_stream(key) as f:
            return decode_png(f.read())
    return decode_rgb(path)[0]


def crop_record(ref: dict, epoch: int, size: int, targets: dict[str, str], seed: int = 0,
                min_side: int = 1) -> dict[str, np.ndarray] | None:
    """The codec stream's decode (``icm.train.stream``): an image reference → a random crop + flip
    of the image, the same crop of its machine target (its MAA image, else itself) and of its
    boxes; None for an undecodable image. The crop is drawn from ``row_rng(seed, epoch,
    source_id)``: a new one each epoch, the same one in a resumed run. Decoding happens here,
    every epoch, so the training set is streamed, never held in memory."""
    record = load_record(ref, min_side=min_side)
    if record["status"] != "ok":
        return None
    path = targets.get(record["source_id"])
    target = read_target(path) if path else record["image"]
    if target.shape != record["image"].shape:
        raise ValueError(f"MAA target {path} is {target.shape}, its source {record['source_id']} "
                         f"{record['image'].shape}: the MAA job ran on other images")
    return crop_pair(record["image"], target, record["boxes"], size, row_rng(seed, epoch, record["source_id"]),
                     record["class_ids"])


def ok_record(ref: dict, epoch: int) -> dict | None:
    """The detector stream's decode: a reference → its record, None when it does not decode."""
    record = load_record(ref)
    return record if record["status"] == "ok" else None
