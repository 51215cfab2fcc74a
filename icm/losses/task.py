"""Machine-side losses for adapting a codec to tasks.

* ``FeaturePerceptualLoss`` — Adapt-ICMH's task-perceptual losses (ECCV 2024; METHODS.md §3):
  classification — mean MSE over a frozen ResNet-50's layer1..4 features of x̂ vs x
  (ImageNet-normalised); detection — ``0.2·Σ`` MSE over a frozen detector's multi-scale features
  (FPN p2–p6 for torchvision detectors). ``PRESETS`` hold the authors' task_λ values; they give
  the authors' rate points only with the authors' feature networks and input scaling (a
  detectron2 R50-FPN on BGR·255 − mean; ResNet-50 on ImageNet normalisation), while here the
  features come from whatever frozen network the config names (a YOLO or torchvision detector on
  RGB in [0, 1]), so the same task_λ lands at another rate: choose it for the rate wanted.
* ``DetectorTrainingLoss`` — a frozen detector's own training losses against the ground truth on
  decoded images, averaged over the batch (dynamic adaptation, ICIP 2024; METHODS.md §4):
  differentiable w.r.t. the images, never w.r.t. the detector.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from icm.detectors.base import Detector, map_targets, total

PRESETS = {"classification": (1.8, 3.5, 6.7, 13.0), "detection": (0.5, 1.0, 2.0, 5.0)}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ResNetFeatures(nn.Module):
    """layer1..4 of a frozen torchvision ResNet on ImageNet-normalised RGB in [0, 1]."""

    def __init__(self, resnet: nn.Module):
        super().__init__()
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
        self.layers = nn.ModuleList([resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4])
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, out = self.stem((x - self.mean) / self.std), []
        for layer in self.layers:
            h = layer(h)
            out.append(h)
        return out

    def train(self, mode: bool = True):
        return super().train(False)    # frozen: BatchNorm statistics never move


class FeaturePerceptualLoss(nn.Module):
    """``task``: ``classification`` (``features`` = a ``ResNetFeatures``; mean of the layers'
    MSEs) or ``detection`` (``features`` = a frozen ``Detector``; 0.2 × the sum of its maps' MSEs)."""

    def __init__(self, task: str, features: nn.Module):
        super().__init__()
        if task not in PRESETS:
            raise ValueError(f"task {task!r} is not one of {sorted(PRESETS)}")
        self.task, self.net = task, features

    def maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.net.features(x) if isinstance(self.net, Detector) else self.net(x)

    def forward(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            reference = self.maps(x)
        errors = [F.mse_loss(a, b) for a, b in zip(self.maps(x_hat), reference)]
        return torch.stack(errors).mean() if self.task == "classification" else 0.2 * torch.stack(errors).sum()


class DetectorTrainingLoss(nn.Module):
    """The frozen ``detector``'s training losses of decoded images against their boxes, the mean
    over the images of each image's loss as it has it alone — a batch mean, as the rate and MSE
    terms it is weighed against (MAA sums instead: there each image's step must not depend on
    the batch). Labels are dataset class ids, mapped into the detector's classes by name
    (``class_map`` as everywhere else)."""

    def __init__(self, detector: Detector, dataset_classes: list[str], class_map: dict | None = None):
        super().__init__()
        self.detector = detector.freeze()
        self.dataset_classes, self.class_map = list(dataset_classes), class_map

    def forward(self, images: torch.Tensor, boxes: list[torch.Tensor], labels: list[torch.Tensor],
                seed: int = 0) -> torch.Tensor:
        targets = []
        for i, (b, lab) in enumerate(zip(boxes, labels)):
            names = [self.dataset_classes[int(c)] for c in lab.tolist()]
            t = map_targets(b.reshape(-1, 4), names, self.detector.classes, self.class_map)
            targets.append({"boxes": t["boxes"].to(images.device), "labels": t["labels"].to(images.device),
                            "seed": seed * 1009 + i})
        return total(self.detector.loss(images, targets)) / max(len(images), 1)   # loss() sums over images

    def train(self, mode: bool = True):
        super().train(mode)
        self.detector.freeze()   # its loss branch keeps norm layers in eval mode; weights never train
        return self
