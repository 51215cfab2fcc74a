"""Lossless, deterministic output writers."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image


def write_png(path: str | Path, image: np.ndarray) -> Path:
    """Write an HxWx3 uint8 image as PNG, atomically, with no metadata.

    Same pixels give the same bytes (fixed compression level, no timestamps), which is what lets
    a rerun or a resumed job be compared byte for byte.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(png_bytes(image))
    os.replace(tmp, path)
    return path


def png_bytes(image: np.ndarray) -> bytes:
    """The PNG encoding ``write_png`` uses (fixed compression level, no metadata)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected HxWx3 uint8, got {image.dtype} {image.shape}")
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def figure_png(fig, dpi: int = 100) -> bytes:
    """A matplotlib figure as PNG bytes (closed afterwards), to be written through a Storage."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[0,1] float CHW or HWC → HWC uint8 with round-half-to-even, the one quantiser we use."""
    arr = np.asarray(image, dtype=np.float64)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[2] != 3:
        arr = arr.transpose(1, 2, 0)
    return np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
