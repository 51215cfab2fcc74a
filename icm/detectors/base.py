"""One interface over detector families (after torchvision detection's train → losses /
eval → predictions split).

``loss(images, targets)`` returns the family's own training-loss terms, each **summed over the
images** of the batch, and differentiable w.r.t. ``images`` (RGB in [0, 1], Bx3xHxW).
``predict(images)`` returns one ``{"boxes" (xyxy px), "scores", "labels"}`` dict per image.
Targets are dicts with ``boxes`` (xyxy px, float), ``labels`` (contiguous class ids 0..C-1) and an
optional ``seed`` that fixes the family's stochastic parts (anchor/ROI sampling) for that image.

Modes: ``train()`` trains the detector's weights (normalisation layers use batch statistics);
``eval()`` is for inference *and* for optimising inputs: normalisation layers use running
statistics and dropout is off, so one image's gradient never depends on its batch neighbours
(see TRAPS.md). ``loss`` works in both modes.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

NORM_AND_DROPOUT = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd, nn.Dropout,
                    nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


class Detector(nn.Module):
    """``batched`` (default): ``loss`` runs the network once over the batch and takes each image's
    loss from its own slice of the outputs (per-image sampling and normalisation); False: one
    forward per image, the reference the batched path is tested against. Both give each image
    the loss it has alone."""

    family: str = ""
    batched: bool = True

    def __init__(self, classes: list[str]):
        super().__init__()
        self.classes = list(classes)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def loss(self, images: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def predict(self, images: torch.Tensor, score_threshold: float = 0.05) -> list[dict[str, torch.Tensor]]:
        raise NotImplementedError

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The multi-scale feature maps the family's heads read (torchvision: FPN p2–p6; YOLO: the
        neck's outputs; CenterNet: the stride-4 map), differentiable w.r.t. ``images`` — what
        Adapt-ICMH's detection perceptual loss compares."""
        raise NotImplementedError(f"{type(self).__name__} exposes no feature maps")

    def prepare_targets(self, targets: list[dict], image_size: tuple[int, int]) -> list[dict]:
        """Targets with whatever the family derives from them once per image (CenterNet's heatmaps),
        for inputs of ``image_size`` (h, w) optimised over many loss calls; default: as they are."""
        return targets

    def freeze(self) -> "Detector":
        """Eval mode and no weight gradients: the state for optimising inputs against the detector."""
        self.eval()
        self.requires_grad_(False)
        return self


@contextmanager
def loss_branch(model: nn.Module, train_norm: bool):
    """Put ``model`` in training mode (families compute losses only there) while keeping
    normalisation/dropout layers in eval mode unless ``train_norm``; restore modes afterwards."""
    modes = {m: m.training for m in model.modules()}
    model.train()
    if not train_norm:
        for m in model.modules():
            if isinstance(m, NORM_AND_DROPOUT):
                m.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def sum_terms(per_image: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Sum per-image loss dicts term by term (never average across the batch)."""
    out: dict[str, torch.Tensor] = {}
    for terms in per_image:
        for key, value in terms.items():
            out[key] = out[key] + value if key in out else value
    return out


def total(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack([v for v in terms.values()]).sum()


def map_targets(boxes: torch.Tensor, names: list[str], detector_classes: list[str],
                class_map: dict | None) -> dict:
    """Objects in the detector's label space; objects with no counterpart there are dropped."""
    index = {c: i for i, c in enumerate(detector_classes)}
    keep, labels = [], []
    for i, name in enumerate(names):
        mapped = (class_map or {}).get(name, name)
        if mapped in index:
            keep.append(i)
            labels.append(index[mapped])
    return {"boxes": boxes[keep] if keep else boxes.new_zeros((0, 4)),
            "labels": torch.tensor(labels, dtype=torch.int64)}
