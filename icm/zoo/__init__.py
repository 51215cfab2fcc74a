"""Model zoo: build any model by name + weights spec (see ``icm.zoo.weights`` for the specs).

>>> build_codec("bmshj2018-hyperprior", quality=3, weights="random:0")
>>> build_detector("fasterrcnn_mobilenet_v3_large_fpn", classes=[...], weights="/ckpt/frcnn.pth")
"""

from __future__ import annotations

from icm.zoo import models as _models  # noqa: F401 - registration (codecs, detectors: on first lookup)
from icm.zoo.registry import REGISTRIES, lookup
from icm.zoo.weights import ResolvedWeights, WeightsUnavailable, resolve, sha256_file


def _build(kind: str, name: str, **kwargs):
    return lookup(kind, name)(name, **kwargs)


def build_codec(name: str, quality: int = 3, weights: str = "random", **kwargs):
    return _build("codec", name, quality=quality, weights=weights, **kwargs)


def build_detector(name: str, classes: list[str], weights: str = "random", **kwargs):
    return _build("detector", name, classes=classes, weights=weights, **kwargs)


def build_classifier(name: str, weights: str = "random", **kwargs):
    return _build("classifier", name, weights=weights, **kwargs)


def build_clip(name: str = "ViT-B-32", weights: str = "random", **kwargs):
    return _build("clip", name, weights=weights, **kwargs)


__all__ = ["REGISTRIES", "build_codec", "build_detector", "build_classifier", "build_clip",
           "resolve", "ResolvedWeights", "WeightsUnavailable", "sha256_file"]
