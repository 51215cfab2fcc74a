"""CLIP supervision of UG-ICM (AAAI 2025; METHODS.md §2): ``0.1 · mean(1 − cos(E(x̂), E(x)))``
with a frozen CLIP image encoder, after CLIP's resize-224 / centre-crop / normalise — globally on
the whole image, and per instance on box crops resized to 224."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipDistance(nn.Module):
    """Differentiable in x̂; the CLIP model is frozen (its preprocessing redone in torch, since
    open_clip's transforms work on PIL images)."""

    def __init__(self, clip_model: nn.Module, size: int = 224, weight: float = 0.1):
        super().__init__()
        self.clip = clip_model.eval().requires_grad_(False)
        self.size, self.weight = size, weight
        self.register_buffer("mean", torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(OPENAI_STD).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Resize the short side to 224 (bicubic), centre-crop 224×224, normalise."""
        h, w = x.shape[-2:]
        scale = self.size / min(h, w)
        nh, nw = max(self.size, round(h * scale)), max(self.size, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False)
        top, left = (nh - self.size) // 2, (nw - self.size) // 2
        x = x[..., top:top + self.size, left:left + self.size]
        return (x - self.mean) / self.std

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(self.preprocess(x))

    def forward(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Global term over a batch."""
        with torch.no_grad():
            ref = self.embed(x)
        return self.weight * (1 - F.cosine_similarity(self.embed(x_hat), ref, dim=-1)).mean()

    def instances(self, x_hat: torch.Tensor, x: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
        """Instance term: the same distance on each object's box crop (xyxy px), averaged over all
        instances of the batch; zero when the batch has none."""
        crops_hat, crops = [], []
        for i, image_boxes in enumerate(boxes):
            for box in image_boxes.round().long().tolist():
                x1, y1 = max(box[0], 0), max(box[1], 0)
                x2, y2 = min(max(box[2], x1 + 1), x.shape[-1]), min(max(box[3], y1 + 1), x.shape[-2])
                if x2 - x1 < 2 or y2 - y1 < 2:
                    continue
                crops_hat.append(self._square(x_hat[i:i + 1, :, y1:y2, x1:x2]))
                crops.append(self._square(x[i:i + 1, :, y1:y2, x1:x2]))
        if not crops:
            return x_hat.sum() * 0.0
        return self.forward(torch.cat(crops_hat), torch.cat(crops))

    def _square(self, crop: torch.Tensor) -> torch.Tensor:
        return F.interpolate(crop, size=(self.size, self.size), mode="bicubic", align_corners=False)
