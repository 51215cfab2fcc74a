"""The authors' letterbox canvas: each image pasted unresized at the centre of a square gray
canvas, so a batch is one tensor and the padding can be masked out of every update.

An image larger than the canvas is downscaled to fit (aspect kept); its *perturbation* is later
upsampled and added to the full-size original (``paste_back``), so outputs keep their size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

GRAY = 128 / 255


@dataclass
class Placement:
    height: int          # original size
    width: int
    top: int             # where the (possibly downscaled) image sits on the canvas
    left: int
    placed_h: int
    placed_w: int

    @property
    def scale(self) -> float:
        return self.placed_h / self.height

    @property
    def resized(self) -> bool:
        return (self.placed_h, self.placed_w) != (self.height, self.width)

    def to_dict(self) -> dict:
        return {"top": self.top, "left": self.left, "placed_h": self.placed_h, "placed_w": self.placed_w,
                "height": self.height, "width": self.width, "resized": self.resized}


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 → 3xHxW float in [0, 1]. The float copy is made by NumPy: images from Ray
    Data and from decoded bytes are read-only arrays, which torch will not wrap."""
    return torch.from_numpy(np.asarray(image).astype(np.float32)).permute(2, 0, 1) / 255.0


def letterbox(image: torch.Tensor, size: int, fill: float = GRAY) -> tuple[torch.Tensor, torch.Tensor, Placement]:
    """Paste a 3xHxW image at the centre of a ``size`` canvas → (canvas, mask 1xSxS, placement)."""
    _, h, w = image.shape
    scale = min(1.0, size / max(h, w))
    ph, pw = (h, w) if scale == 1.0 else (max(1, round(h * scale)), max(1, round(w * scale)))
    placed = image if (ph, pw) == (h, w) else F.interpolate(
        image[None], size=(ph, pw), mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)
    top, left = (size - ph) // 2, (size - pw) // 2
    canvas = torch.full((3, size, size), fill, dtype=image.dtype)
    canvas[:, top:top + ph, left:left + pw] = placed
    mask = torch.zeros((1, size, size), dtype=image.dtype)
    mask[:, top:top + ph, left:left + pw] = 1
    return canvas, mask, Placement(h, w, top, left, ph, pw)


def boxes_to_canvas(boxes: np.ndarray | torch.Tensor, p: Placement) -> torch.Tensor:
    b = torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4).clone()
    b[:, [0, 2]] = b[:, [0, 2]] * (p.placed_w / p.width) + p.left
    b[:, [1, 3]] = b[:, [1, 3]] * (p.placed_h / p.height) + p.top
    return b


def boxes_from_canvas(boxes: torch.Tensor, p: Placement) -> torch.Tensor:
    b = boxes.clone().reshape(-1, 4).float()
    b[:, [0, 2]] = ((b[:, [0, 2]] - p.left) * (p.width / p.placed_w)).clamp(0, p.width)
    b[:, [1, 3]] = ((b[:, [1, 3]] - p.top) * (p.height / p.placed_h)).clamp(0, p.height)
    return b


def crop(canvas: torch.Tensor, p: Placement) -> torch.Tensor:
    return canvas[..., p.top:p.top + p.placed_h, p.left:p.left + p.placed_w]


def paste_back(original: torch.Tensor, adv_canvas: torch.Tensor, clean_canvas: torch.Tensor,
               p: Placement) -> torch.Tensor:
    """Full-size result: the original plus the canvas perturbation (upsampled if the image was
    downscaled — bilinear interpolation keeps it inside the same L∞ ball), clamped to [0, 1]."""
    delta = crop(adv_canvas - clean_canvas, p)
    if p.resized:
        delta = F.interpolate(delta[None], size=(p.height, p.width), mode="bilinear", align_corners=False)[0]
    return (original + delta).clamp(0, 1)
