"""Where an MAA image may go: an L∞ ball around the original (``linf``) or user-supplied per-pixel
lower/upper images (``map``; the authors' min/max maps were not released). Always within [0, 1]."""

from __future__ import annotations

import torch


class LinfBound:
    kind = "linf"

    def __init__(self, eps: float = 8 / 255):
        self.eps = float(eps)

    def project(self, adv: torch.Tensor, original: torch.Tensor, lower=None, upper=None) -> torch.Tensor:
        return torch.minimum(torch.maximum(adv, original - self.eps), original + self.eps).clamp(0, 1)

    def to_dict(self) -> dict:
        return {"type": "linf", "eps": self.eps}


class MapBound:
    """Per-pixel bounds: ``lower ≤ adv ≤ upper`` with maps given per image (same size)."""

    kind = "map"

    def project(self, adv: torch.Tensor, original: torch.Tensor, lower=None, upper=None) -> torch.Tensor:
        if lower is None or upper is None:
            raise ValueError("bound 'map' needs per-pixel lower and upper maps for every image")
        return torch.minimum(torch.maximum(adv, lower), upper).clamp(0, 1)

    def to_dict(self) -> dict:
        return {"type": "map"}


def build_bound(spec: dict | None):
    spec = dict(spec or {"type": "linf"})
    kind = spec.pop("type", "linf")
    if kind == "linf":
        return LinfBound(**spec)
    if kind == "map":
        return MapBound()
    raise ValueError(f"bound type {kind!r} is not 'linf' or 'map'")
