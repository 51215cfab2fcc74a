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

Precision (``apply_precision``, for frozen detectors): BatchNorm folded into the convolutions,
channels-last memory layout, bf16 autocast of the network with the loss in float32 — the latter
in families that run their network under ``network_autocast`` (``supports_autocast``).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

NORM_AND_DROPOUT = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd, nn.Dropout,
                    nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


class Detector(nn.Module):
    """``batched`` (default): ``loss`` runs the network once over the batch and takes each image's
    loss from its own slice of the outputs (per-image sampling and normalisation); False: one
    forward per image, the reference the batched path is tested against. Both give each image
    the loss it has alone."""

    family: str = ""
    batched: bool = True
    # True where ``loss`` runs the network under ``network_autocast`` and computes the loss
    # itself in float32 from float32 copies of the network's outputs.
    supports_autocast: bool = False
    autocast_dtype: torch.dtype | None = None
    channels_last: bool = False

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

    def apply_precision(self, precision) -> "Detector":
        """Put a frozen detector in ``precision`` (an ``icm.runtime.Precision``); call after
        loading weights and moving it to its device."""
        if precision.autocast and not self.supports_autocast:
            raise ValueError(f"precision.autocast: {precision.autocast}: the {self.family or type(self).__name__} "
                             "family does not run its network under autocast with its loss in float32 yet; "
                             "remove precision.autocast for this job")
        if precision.fold_bn:
            if self.training:
                raise ValueError("fold_bn is for frozen detectors: folding BatchNorm uses its running statistics")
            self.fold_batchnorm()
        if precision.channels_last:
            self.to(memory_format=torch.channels_last)
        self.channels_last = precision.channels_last
        self.autocast_dtype = precision.autocast_dtype
        return self

    def fold_batchnorm(self) -> None:
        """Fold each eval-mode BatchNorm into the convolution it follows (torch's
        ``fuse_conv_bn_eval``), the norm becoming an identity: see ``conv_bn_pairs``."""
        for conv_name, bn_name in conv_bn_pairs(self):
            conv = self.get_submodule(conv_name)
            fused = fuse_conv_bn_eval(conv, self.get_submodule(bn_name), transpose=isinstance(conv, nn.ConvTranspose2d))
            self.set_submodule(conv_name, fused.requires_grad_(False))
            self.set_submodule(bn_name, nn.Identity())

    def network_input(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def network_autocast(self, device_type: str):
        """The autocast context the network (not the loss) runs in: a no-op unless a precision set it."""
        return torch.autocast(device_type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)


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


_CONVS = (nn.Conv2d, nn.ConvTranspose2d)


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Names of (convolution, BatchNorm) submodules where the norm is applied to the convolution's
    output and nothing else: neighbours in a plain ``nn.Sequential`` (torchvision's
    ``Conv2dNormActivation``, CenterNet's deconvolutions) and torchvision ResNet blocks'
    ``conv{i}``/``bn{i}``. Found by structure, because whole detectors do not trace with torch.fx
    (data-dependent control flow), which torch's graph-level fusion needs."""
    from torchvision.models.resnet import BasicBlock, Bottleneck
    from torchvision.ops import FrozenBatchNorm2d

    norms = (nn.BatchNorm2d, FrozenBatchNorm2d)
    pairs = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
            children = list(module.named_children())
            pairs += [(prefix + a, prefix + b) for (a, conv), (b, norm) in zip(children, children[1:])
                      if isinstance(conv, _CONVS) and isinstance(norm, norms)]
        elif isinstance(module, (BasicBlock, Bottleneck)):
            pairs += [(f"{prefix}conv{i}", f"{prefix}bn{i}") for i in (1, 2, 3)
                      if isinstance(getattr(module, f"bn{i}", None), norms)]
    return pairs


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
