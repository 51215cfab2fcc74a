"""torchvision detectors — Faster R-CNN (Ren et al., NeurIPS 2015), Mask R-CNN (He et al., ICCV
2017), RetinaNet (Lin et al., ICCV 2017), FCOS (Tian et al., ICCV 2019) — behind ``Detector``.

Labels: torchvision reserves 0 for background, so class id c is label c+1 (``num_classes = C+1``).
The internal transform's ``min_size``/``max_size`` are set to ``image_size`` so a canvas of that
size is not resized to 800 px.

Written here, because torchvision computes these only image by image with host syncs: the batched,
sync-free loss path (``TorchvisionDetector``), the device-side seeded sampler, the batched ROI
matcher and proposal filter. Everything else is torchvision's (heads, box coders, matchers for the
once-per-unit anchor assignment, box ops, NMS, losses).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.nn.modules.utils import _pair
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import MultiScaleRoIAlign, boxes as box_ops
from torchvision.ops import complete_box_iou_loss, distance_box_iou_loss, sigmoid_focal_loss

from icm.detectors.base import Detector, loss_branch, sum_terms
from icm.detectors.roi_align import RoutedRoIAlign
from icm.zoo.registry import attach_provenance, register
from icm.zoo.weights import load_state_dict, resolve, seeded

TORCHVISION_DETECTORS = (
    "fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn", "maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2",
    "retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn", "fcos_resnet18_fpn",
    "fasterrcnn_resnet18_fpn",
)


def _resnet18_fpn(returned_layers: list[int], extra_blocks=None, backbone_weights: str | None = None):
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor

    from icm.detectors.centernet import load_trunk

    resnet = torchvision.models.resnet18(weights=None)
    if backbone_weights:
        load_trunk(resnet, load_state_dict(resolve(backbone_weights, family="resnet18").path), backbone_weights)
    return _resnet_fpn_extractor(resnet, 5, returned_layers=returned_layers, extra_blocks=extra_blocks)


def _fcos_resnet18_fpn(weights=None, weights_backbone=None, num_classes=91, backbone_weights=None, **kwargs):
    """FCOS exactly as torchvision's ``fcos_resnet50_fpn`` builds it (P3–P7, P6/P7 from P5), on
    a ResNet-18: torchvision ships no such builder, and ResNet-50 is ~4× the compute, too much to
    train from scratch on the small sets this project trains its own detectors on.
    ``backbone_weights``: a ResNet-18 classifier's weights for the trunk."""
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    backbone = _resnet18_fpn([2, 3, 4], LastLevelP6P7(256, 256), backbone_weights)
    return torchvision.models.detection.FCOS(backbone, num_classes, **kwargs)


def _fasterrcnn_resnet18_fpn(weights=None, weights_backbone=None, num_classes=91, backbone_weights=None,
                             anchor_sizes=(16, 32, 64, 128, 256), **kwargs):
    """Faster R-CNN as torchvision's ``fasterrcnn_resnet50_fpn`` builds it (P2–P6), on a ResNet-18,
    with anchors one octave smaller by default (16–256 px: objects on 128–256 px canvases)."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    anchors = AnchorGenerator(tuple((int(a),) for a in anchor_sizes), ((0.5, 1.0, 2.0),) * len(anchor_sizes))
    return torchvision.models.detection.FasterRCNN(_resnet18_fpn([1, 2, 3, 4], None, backbone_weights), num_classes,
                                                   rpn_anchor_generator=anchors, **kwargs)


# names torchvision's ``get_model`` does not know; no hub weights
EXTRA_BUILDERS = {"fcos_resnet18_fpn": _fcos_resnet18_fpn, "fasterrcnn_resnet18_fpn": _fasterrcnn_resnet18_fpn}


# Boxes per NMS call. One call covers whole images, their boxes offset apart by (image, level)
# (torchvision's ``batched_nms`` coordinate trick); NMS costs grow with the square of the boxes in a
# call, so a batch larger than this is split into calls of whole images. The figures are
# torchvision's own crossovers between the offset trick and one call per group (``batched_nms``:
# 4000 coordinates on a CPU, 100 000 on a GPU; pytorch/vision#1311, #8925).
NMS_BOXES_PER_CALL = {"cpu": 1_000, "default": 25_000}

_M31 = (1 << 31) - 1


def _mix31(x: torch.Tensor) -> torch.Tensor:
    """A 31-bit integer hash (two multiply-xorshift rounds) on int64 tensors; every product stays
    below 2**63, so it is exact on any device."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M31
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M31
    return (x >> 16) ^ x


def sampling_keys(seeds: torch.Tensor, positions: torch.Tensor, salt: int = 0) -> torch.Tensor:
    """Random sort keys for candidates, B×N int64: a hash of (image seed, salt, candidate position)
    in the high bits and the position in the low bits, so keys are unique within an image and each
    image's keys depend on nothing but its seed — not on the batch, nor on the image's place in it."""
    mixed = _mix31((seeds.to(torch.int64) + salt * 0x2545F491) & _M31)
    return (_mix31((mixed[:, None] + positions * 0x61C88647) & _M31) << 31) | positions


def _largest(keys: torch.Tensor, candidates: torch.Tensor, count: torch.Tensor, most: int) -> torch.Tensor:
    """Per row, the ``count`` candidates with the largest keys (``count`` ≤ ``most``): one top-k for
    the whole batch, then a threshold at each row's count-th key (keys are unique)."""
    if most == 0:
        return torch.zeros_like(candidates)
    top = torch.where(candidates, keys, -1).topk(most, dim=1).values
    threshold = top.gather(1, (count - 1).clamp(min=0)[:, None])
    return candidates & (keys >= threshold) & (count > 0)[:, None]


def _giou_loss(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """torchvision's ``generalized_box_iou_loss`` (reduction "none"), the same arithmetic, with
    empty intersections zeroed by ``where`` instead of its boolean-mask assignment (a host sync)."""
    x1, y1, x2, y2 = boxes1.unbind(-1)
    x1g, y1g, x2g, y2g = boxes2.unbind(-1)
    left, top, right, bottom = torch.max(x1, x1g), torch.max(y1, y1g), torch.min(x2, x2g), torch.min(y2, y2g)
    inter = torch.where((bottom > top) & (right > left), (right - left) * (bottom - top), 0.0)
    union = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - inter
    enclosing = (torch.max(x2, x2g) - torch.min(x1, x1g)) * (torch.max(y2, y2g) - torch.min(y1, y1g))
    return 1 - (inter / (union + eps) - (enclosing - union) / (enclosing + eps))


class HashedSampler(BalancedPositiveNegativeSampler):
    """torchvision's balanced sampling rule (up to ``positive_fraction`` of ``batch_size_per_image``
    positives, negatives fill the rest), drawn on the device from :func:`sampling_keys` with each
    image's seed: the sample of an image is fixed by its seed, whatever else is in the batch.
    torchvision's sampler draws ``randperm`` from the global RNG, image by image, on the CPU.

    ``masks`` samples a B×N batch of labels (1 positive, 0 negative, other ignored) at once; calling
    the sampler keeps torchvision's interface (per-image label vectors → per-image uint8 masks,
    seeds from ``seeds``), so torchvision's own RPN/ROI heads use the same draws."""

    def __init__(self, batch_size_per_image: int, positive_fraction: float, salt: int):
        super().__init__(batch_size_per_image, positive_fraction)
        self.salt = salt
        self.seeds: list[int] = []

    def masks(self, labels: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor | None = None):
        n = labels.shape[1]
        if positions is None:
            positions = torch.arange(n, device=labels.device)
        keys = sampling_keys(seeds, positions, self.salt)
        positive, negative = labels >= 1, labels == 0
        most_positive = int(self.batch_size_per_image * self.positive_fraction)
        num_pos = positive.sum(1).clamp(max=most_positive)
        num_neg = torch.minimum(self.batch_size_per_image - num_pos, negative.sum(1))
        return (_largest(keys, positive, num_pos, min(most_positive, n)),
                _largest(keys, negative, num_neg, min(self.batch_size_per_image, n)))

    def __call__(self, matched_idxs):
        lengths = [len(m) for m in matched_idxs]
        labels = matched_idxs[0].new_full((len(lengths), max(lengths)), -1)
        for row, m in zip(labels, matched_idxs):
            row[:len(m)] = m
        seeds = [int(s) for s in self.seeds[:len(lengths)]] + [0] * max(0, len(lengths) - len(self.seeds))
        pos, neg = self.masks(labels, _host_to_device(seeds, labels.device))
        return ([p[:k].to(torch.uint8) for p, k in zip(pos, lengths)],
                [q[:k].to(torch.uint8) for q, k in zip(neg, lengths)])


def _host_to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """Small host values onto the device without a blocking copy (pinned memory, non_blocking)."""
    t = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _stack_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack per-image tensors padded (with zeros) along dim 0 to the longest: targets prepared as
    one unit already share a length; targets from different units may not."""
    most = max(len(t) for t in tensors)
    if any(len(t) != most for t in tensors):
        tensors = [F.pad(t, (0, 0) * (t.dim() - 1) + (0, most - len(t))) for t in tensors]
    return torch.stack(tensors)


def _orderable(x: torch.Tensor) -> torch.Tensor:
    """float32 values → int64 keys in the same order (IEEE bits, negatives mirrored)."""
    bits = x.float().contiguous().view(torch.int32).to(torch.int64)
    return torch.where(bits >= 0, bits, -(bits & 0x7FFFFFFF) - 1)


def _box_masks(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Filled-box masks (G×H×W uint8) for Mask R-CNN when a dataset has no segmentation: each box
    rounded to pixels, at least one pixel wide."""
    b = boxes.round().long()
    rows = torch.arange(height, device=boxes.device)
    cols = torch.arange(width, device=boxes.device)
    inside_y = (rows >= b[:, 1:2].clamp(min=0)) & (rows < torch.maximum(b[:, 3:4], b[:, 1:2] + 1))
    inside_x = (cols >= b[:, 0:1].clamp(min=0)) & (cols < torch.maximum(b[:, 2:3], b[:, 0:1] + 1))
    return (inside_y[:, :, None] & inside_x[:, None, :]).to(torch.uint8)


class GlobalAvgPool(nn.Module):
    """``AdaptiveAvgPool2d(1)`` as a mean over H and W: the same function (MobileNetV3's
    squeeze-excitation pooling), with a deterministic CUDA backward, which adaptive average
    pooling lacks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((-2, -1), keepdim=True)


def _replace_global_pools(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.AdaptiveAvgPool2d) and _pair(child.output_size) == (1, 1):
            setattr(module, name, GlobalAvgPool())
        else:
            _replace_global_pools(child)


@contextmanager
def _eval_mode(module: nn.Module):
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


@dataclass
class _Geometry:
    """What a canvas size fixes for a detector: the transform's output size (``resized`` when it
    differs from the input), the padded batch size, and the anchors with their FPN levels."""

    size: tuple[int, int]
    resized: bool
    scale: float
    padded: tuple[int, int]
    anchors: torch.Tensor
    levels: torch.Tensor
    per_level: list[int]


def _capture_fcos_matches(model, targets: list[dict], anchors: list[torch.Tensor], per_level: list[int]):
    """FCOS's assignment (centre sampling, per-level scale ranges, smallest-area tie-break) is inline
    in torchvision's ``FCOS.compute_loss``: run it and keep the matched indices it hands to the head,
    rather than copy it."""
    captured: list[torch.Tensor] = []

    def capture(targets, head_outputs, anchors, matched_idxs):
        captured.extend(matched_idxs)
        return {}
    model.head.compute_loss = capture
    try:
        model.compute_loss(targets, {}, anchors, per_level)
    finally:
        del model.head.compute_loss
    return captured


class TorchvisionDetector(Detector):
    """Losses for optimising inputs are batched and sync-free: one transform, backbone and head pass
    for the batch; everything that depends only on the ground truth (RPN / RetinaNet / FCOS anchor
    assignment, padded boxes, masks) built once per unit in ``prepare_targets``; ROI matching,
    sampling and every loss term computed for the whole batch at once, each image normalised over
    its own samples, so the result is the sum of each image's own loss (``batched=False``:
    torchvision's own forward image by image, the reference). Host syncs per step: the NMS calls and
    one for the ROI levels (Mask R-CNN: one more to gather its positive ROIs, one for their levels)."""

    family = "torchvision"

    def __init__(self, name: str, classes: list[str], image_size: int = 512, **model_kwargs):
        super().__init__(classes)
        self.name = name
        self.model = (EXTRA_BUILDERS.get(name) or partial(torchvision.models.get_model, name))(
            weights=None, weights_backbone=None, num_classes=len(classes) + 1,
            min_size=image_size, max_size=image_size, **model_kwargs)
        _replace_global_pools(self.model)
        self.samplers = []
        for salt, owner in enumerate((getattr(self.model, "rpn", None), getattr(self.model, "roi_heads", None)), 1):
            if owner is not None:
                old = owner.fg_bg_sampler
                owner.fg_bg_sampler = HashedSampler(old.batch_size_per_image, old.positive_fraction, salt)
                self.samplers.append(owner.fg_bg_sampler)
                for pool in ("box_roi_pool", "mask_roi_pool"):
                    if isinstance(getattr(owner, pool, None), MultiScaleRoIAlign):
                        setattr(owner, pool, RoutedRoIAlign.replacing(getattr(owner, pool)))
        t = self.model.transform
        self.register_buffer("mean", torch.tensor(t.image_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(t.image_std).view(1, -1, 1, 1), persistent=False)
        self._geometries: dict = {}

    @property
    def two_stage(self) -> bool:
        return hasattr(self.model, "rpn")

    def _tv_target(self, target: dict, image: torch.Tensor) -> dict:
        boxes = torch.as_tensor(target["boxes"], dtype=torch.float32, device=image.device).reshape(-1, 4)
        out = {"boxes": boxes,
               "labels": torch.as_tensor(target["labels"], dtype=torch.int64, device=image.device) + 1}
        if "maskrcnn" in self.name:
            out["masks"] = target["masks"] if "masks" in target else _box_masks(boxes, *image.shape[-2:])
        return out

    # -- geometry and targets, once per canvas size / unit ---------------------------------------

    def _geometry(self, image_size: tuple[int, int], device: torch.device) -> _Geometry:
        key = (tuple(image_size), str(device))
        if key not in self._geometries:
            t = self.model.transform
            h, w = image_size
            if t.fixed_size is not None:
                size, scale = (t.fixed_size[1], t.fixed_size[0]), 1.0
            else:
                scale = min(t.min_size[-1] / min(h, w), t.max_size / max(h, w))
                size = (int(math.floor(h * scale)), int(math.floor(w * scale)))
            d = t.size_divisible
            padded = (int(math.ceil(size[0] / d) * d), int(math.ceil(size[1] / d) * d))
            zeros = torch.zeros((1, 3, *padded), device=device)
            with torch.no_grad(), _eval_mode(self.model):
                feats = self.model.backbone(zeros)   # only the feature maps' sizes are used
            feats = list(feats.values()) if isinstance(feats, dict) else [feats]
            generator = self.model.rpn.anchor_generator if self.two_stage else self.model.anchor_generator
            anchors = generator(ImageList(zeros, [size]), feats)[0]
            per_level = [n * f.shape[-2] * f.shape[-1] for n, f in zip(generator.num_anchors_per_location(), feats)]
            levels = torch.cat([torch.full((n,), i, dtype=torch.int64, device=device) for i, n in enumerate(per_level)])
            self._geometries[key] = _Geometry(size, size != (h, w), scale, padded, anchors, levels, per_level)
        return self._geometries[key]

    def prepare_targets(self, targets: list[dict], image_size: tuple[int, int]) -> list[dict]:
        """Each target with what its ground truth alone fixes, for ``image_size`` canvases: boxes and
        labels padded to the unit's largest object count, the RPN's / RetinaNet's / FCOS's anchor
        assignment and regression targets, Mask R-CNN's masks."""
        if not targets:
            return targets
        first = targets[0]["boxes"]
        device = first.device if isinstance(first, torch.Tensor) else torch.device("cpu")
        geo = self._geometry(image_size, device)
        most = max(len(t["labels"]) for t in targets)
        return [self._prepare(t, tuple(image_size), geo, most, device) for t in targets]

    def _prepare(self, target: dict, image_size, geo: _Geometry, most: int, device) -> dict:
        boxes = torch.as_tensor(target["boxes"], dtype=torch.float32, device=device).reshape(-1, 4)
        labels = torch.as_tensor(target["labels"], dtype=torch.int64, device=device) + 1
        if geo.resized:
            boxes = resize_boxes(boxes, image_size, geo.size)
        g = len(labels)
        out = dict(target, tv_size=image_size,
                   tv_boxes=F.pad(boxes, (0, 0, 0, most - g)), tv_labels=F.pad(labels, (0, most - g)))
        anchors = geo.anchors
        if self.two_stage:
            rpn = self.model.rpn
            (rpn_labels,), (matched,) = rpn.assign_targets_to_anchors([anchors], [{"boxes": boxes}])
            regression = rpn.box_coder.encode_single(matched, anchors)
            out["tv_rpn_labels"] = rpn_labels
            out["tv_rpn_regression"] = torch.where((rpn_labels == 1)[:, None], regression, 0.0)
            if self.model.roi_heads.has_mask():
                if "masks" in target:
                    masks = torch.as_tensor(target["masks"], device=device)
                    if geo.resized:
                        masks = F.interpolate(masks[:, None].float(), size=geo.size)[:, 0].byte()
                else:
                    masks = _box_masks(boxes, *geo.size)
                out["tv_masks"] = F.pad(masks, (0, 0, 0, 0, 0, most - g))
            return out
        if isinstance(self.model, torchvision.models.detection.FCOS):
            (matched,) = _capture_fcos_matches(self.model, [{"boxes": boxes}], [anchors], geo.per_level)
        elif g:
            matched = self.model.proposal_matcher(box_ops.box_iou(boxes, anchors))
        else:
            matched = torch.full((len(anchors),), -1, dtype=torch.int64, device=device)
        foreground = matched >= 0
        index = matched.clamp(min=0)
        matched_boxes = torch.where(foreground[:, None], boxes[index], anchors) if g else anchors
        out["tv_classes"] = torch.where(foreground, labels[index], -1) if g else torch.full_like(matched, -1)
        if isinstance(self.model, torchvision.models.detection.FCOS):
            out["tv_matched_boxes"] = matched_boxes
            # torchvision's centre-ness target; background anchors (matched to themselves) never count
            ltrb = self.model.head.box_coder.encode(anchors, matched_boxes)
            lr, tb = ltrb[:, [0, 2]], ltrb[:, [1, 3]]
            ctrness = torch.sqrt((lr.min(-1).values / lr.max(-1).values) * (tb.min(-1).values / tb.max(-1).values))
            out["tv_ctrness"] = torch.where(foreground, ctrness, 0.0)
        else:
            out["tv_counted"] = matched != self.model.proposal_matcher.BETWEEN_THRESHOLDS
            head = self.model.head.regression_head
            if head._loss_type in ("l1", "smooth_l1"):
                out["tv_regression"] = torch.where(foreground[:, None], head.box_coder.encode_single(matched_boxes, anchors), 0.0)
            else:
                out["tv_regression"] = matched_boxes
        return out

    # -- losses ---------------------------------------------------------------------------------

    def loss(self, images, targets):
        if self.training:
            # Training the weights: one batched call (BatchNorm sees the whole batch); the
            # families average over the batch, so scale back to a per-image sum. Targets without
            # a seed draw one from the global RNG (fresh anchor/ROI samples each step, as
            # torchvision's sampler; reproducible under the training loop's seed).
            self._seed([t if "seed" in t else dict(t, seed=int(torch.randint(2 ** 31, ()))) for t in targets])
            with loss_branch(self.model, train_norm=True):
                terms = self.model(list(images), [self._tv_target(t, im) for t, im in zip(targets, images)])
            return {k: v * len(images) for k, v in terms.items()}
        with loss_branch(self.model, train_norm=False):
            if not self.batched:
                per_image = []
                for image, target in zip(images, targets):
                    self._seed([target])
                    per_image.append(self.model([image], [self._tv_target(target, image)]))
                return sum_terms(per_image)
            size = tuple(images.shape[-2:])
            if any(t.get("tv_size") != size for t in targets):
                targets = self.prepare_targets(targets, size)
            geo = self._geometry(size, images.device)
            batch = self._transform(images, geo)
            features = self.model.backbone(batch.tensors)
            if isinstance(features, torch.Tensor):
                features = OrderedDict([("0", features)])
            seeds = _host_to_device([int(t.get("seed", 0)) for t in targets], images.device)
            if self.two_stage:
                return self._two_stage_losses(batch, features, targets, seeds, geo)
            return self._dense_losses(features, targets, geo)

    def _transform(self, images: torch.Tensor, geo: _Geometry) -> ImageList:
        """``GeneralizedRCNNTransform`` for a whole batch of one size at once: normalise, resize only
        when the transform would change the size (at the canvas size it would interpolate by 1.0, an
        identity whose backward has no deterministic CUDA kernel), pad to ``size_divisible``."""
        t = self.model.transform
        x = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        if geo.resized:
            if t.fixed_size is not None:
                x = F.interpolate(x, size=geo.size, mode="bilinear", align_corners=False)
            else:
                x = F.interpolate(x, scale_factor=geo.scale, mode="bilinear", recompute_scale_factor=True,
                                  align_corners=False)
        if geo.padded != geo.size:
            x = F.pad(x, (0, geo.padded[1] - geo.size[1], 0, geo.padded[0] - geo.size[0]))
        return ImageList(x, [geo.size] * len(images))

    def features(self, images):
        feats = self.model.backbone((images - self.mean.to(images.dtype)) / self.std.to(images.dtype))
        return list(feats.values()) if isinstance(feats, dict) else [feats]

    def _seed(self, targets: list[dict]) -> None:
        for sampler in self.samplers:
            sampler.seeds = [int(t.get("seed", 0)) for t in targets]

    def _two_stage_losses(self, images: ImageList, features: OrderedDict, targets: list[dict],
                          seeds: torch.Tensor, geo: _Geometry) -> dict:
        """Faster / Mask R-CNN for the batch: RPN head, proposals (NMS over the batch), ROI
        matching and sampling, box (and mask) heads and their losses, all batched; each image's
        terms normalised over its own samples as torchvision's ``compute_loss`` / ``fastrcnn_loss``
        / ``maskrcnn_loss`` do for a single image."""
        rpn, roi = self.model.rpn, self.model.roi_heads
        n_images = len(targets)
        feats = list(features.values())
        objectness, deltas = concat_box_prediction_layers(*rpn.head(feats))    # image-major rows
        objectness = objectness.view(n_images, -1)
        n_anchors = objectness.shape[1]
        labels = torch.stack([t["tv_rpn_labels"] for t in targets])
        positive, negative = rpn.fg_bg_sampler.masks(labels, seeds)
        count = (positive | negative).sum(1, keepdim=True).clamp(min=1)
        losses = {
            "loss_objectness": (F.binary_cross_entropy_with_logits(objectness, labels.clamp(min=0), reduction="none")
                                * ((positive | negative) / count)).sum(),
            "loss_rpn_box_reg": (F.smooth_l1_loss(deltas.view(n_images, n_anchors, 4),
                                                  torch.stack([t["tv_rpn_regression"] for t in targets]),
                                                  beta=1 / 9, reduction="none") * (positive / count)[..., None]).sum(),
        }
        proposals = rpn.box_coder.decode_single(deltas.detach(), geo.anchors.repeat(n_images, 1))
        boxes, valid = self._proposals(proposals.view(n_images, n_anchors, 4), objectness.detach(), geo)

        # ROI candidates: each image's proposals, then its ground-truth boxes (add_gt_proposals)
        gt = _stack_padded([t["tv_boxes"] for t in targets])
        gt_labels = _stack_padded([t["tv_labels"] for t in targets])
        n_props, n_gt = boxes.shape[1], gt.shape[1]
        candidates = torch.cat([boxes, gt], 1)
        present = torch.cat([valid, gt_labels > 0], 1)
        slot = torch.arange(n_props + n_gt, device=boxes.device)
        # a candidate's position in torchvision's per-image list: its proposals, then its boxes
        position = torch.where(slot < n_props, slot, valid.sum(1, keepdim=True) + slot - n_props)
        matched, roi_labels = self._match_proposals(gt, gt_labels, candidates)
        roi_labels = torch.where(present, roi_labels, -1)
        positive, negative = roi.fg_bg_sampler.masks(roi_labels, seeds, position)
        chosen = positive | negative
        # the sampled candidates in torchvision's order (ascending position), padding after them
        n_slots = min(roi.fg_bg_sampler.batch_size_per_image, n_props + n_gt)
        take = torch.where(chosen, position, n_props + n_gt + slot).topk(n_slots, dim=1, largest=False).indices
        sampled = chosen.gather(1, take)
        roi_labels = roi_labels.gather(1, take).clamp(min=0)
        matched = matched.gather(1, take)
        roi_boxes = candidates.gather(1, take[..., None].expand(-1, -1, 4))
        positive = sampled & (roi_labels > 0)
        targets_reg = roi.box_coder.encode_single(gt.gather(1, matched[..., None].expand(-1, -1, 4)).view(-1, 4),
                                                  roi_boxes.view(-1, 4))
        targets_reg = torch.where(positive.view(-1, 1), targets_reg, 0.0)
        image_index = torch.arange(n_images, device=boxes.device, dtype=boxes.dtype)[:, None].expand(-1, n_slots)
        rois = torch.cat([image_index.reshape(-1, 1), roi_boxes.view(-1, 4)], 1)
        box_features = roi.box_head(roi.box_roi_pool(features, rois, images.image_sizes))
        class_logits, box_regression = roi.box_predictor(box_features)
        count = sampled.sum(1, keepdim=True).clamp(min=1)
        flat_labels = roi_labels.view(-1)
        chosen_regression = box_regression.view(len(flat_labels), -1, 4).gather(
            1, flat_labels[:, None, None].expand(-1, 1, 4))[:, 0]
        losses["loss_classifier"] = (F.cross_entropy(class_logits, flat_labels, reduction="none")
                                     * (sampled / count).view(-1)).sum()
        losses["loss_box_reg"] = (F.smooth_l1_loss(chosen_regression, targets_reg, beta=1 / 9, reduction="none")
                                  * (positive / count).view(-1, 1)).sum()
        if roi.has_mask():
            losses["loss_mask"] = self._mask_loss(features, images, targets, rois, positive, flat_labels,
                                                  matched, n_gt)
        return losses

    def _mask_loss(self, features, images, targets, rois, positive, flat_labels, matched, n_gt) -> torch.Tensor:
        """Mask R-CNN's mask term on the batch's positive ROIs (gathered with one host sync: the
        mask head is too heavy to run on padding), each image's BCE averaged over its own."""
        roi = self.model.roi_heads
        n_slots = positive.shape[1]
        flat = torch.nonzero(positive.view(-1)).squeeze(1)
        image = flat // n_slots
        mask_rois = rois[flat]
        logits = roi.mask_predictor(roi.mask_head(roi.mask_roi_pool(features, mask_rois, images.image_sizes)))
        m = logits.shape[-1]
        gt_masks = _stack_padded([t["tv_masks"] for t in targets]).flatten(0, 1)[:, None].to(rois.dtype)
        gt_rois = torch.cat([(image * n_gt + matched.view(-1)[flat]).to(rois.dtype)[:, None], mask_rois[:, 1:]], 1)
        # torchvision's project_masks_on_boxes; the forward kernel (no atomics), no gradient needed
        mask_targets = torch.ops.torchvision.roi_align(gt_masks, gt_rois, 1.0, m, m, -1, False)[:, 0]
        logits = logits.gather(1, flat_labels[flat][:, None, None, None].expand(-1, 1, m, m))[:, 0]
        weight = 1.0 / (positive.sum(1)[image] * (m * m))
        return (F.binary_cross_entropy_with_logits(logits, mask_targets, reduction="none") * weight[:, None, None]).sum()

    def _match_proposals(self, gt: torch.Tensor, gt_labels: torch.Tensor, candidates: torch.Tensor):
        """``RoIHeads.assign_targets_to_proposals`` for the batch (torchvision's ``Matcher`` takes one
        image's G×N matrix and filters with boolean masks): the matched ground truth (clamped, as
        torchvision) and each candidate's label (class, 0 background, -1 between thresholds)."""
        matcher = self.model.roi_heads.proposal_matcher
        iou = torch.vmap(box_ops.box_iou)(gt, candidates)
        iou = torch.where((gt_labels > 0)[..., None], iou, -1.0)      # padding rows never match
        quality, matched = iou.max(1)
        if matcher.allow_low_quality_matches:
            best = iou.amax(2, keepdim=True)
            matched_before = matched
        below = quality < matcher.low_threshold
        between = (quality >= matcher.low_threshold) & (quality < matcher.high_threshold)
        matched = torch.where(below, matcher.BELOW_LOW_THRESHOLD, torch.where(between, matcher.BETWEEN_THRESHOLDS, matched))
        if matcher.allow_low_quality_matches:
            highest = ((iou == best) & (gt_labels > 0)[..., None]).any(1)
            matched = torch.where(highest, matched_before, matched)
        labels = gt_labels.gather(1, matched.clamp(min=0))
        labels = torch.where(matched == matcher.BELOW_LOW_THRESHOLD, 0, labels)
        labels = torch.where(matched == matcher.BETWEEN_THRESHOLDS, -1, labels)
        return matched.clamp(min=0), labels

    def _proposals(self, proposals: torch.Tensor, objectness: torch.Tensor, geo: _Geometry):
        """``RegionProposalNetwork.filter_proposals`` for the batch without a per-image loop: per-level
        top-n, clipping, small-box and score filtering as masks, NMS per (image, level) in as few
        calls as the box count allows, then each image's best ``post_nms_top_n``. Returns B×P boxes
        (each image's in torchvision's order, by score) and which are real.

        Ties (equal objectness: flat regions such as a canvas's padding) are broken by anchor index
        throughout, so the proposals of an image never depend on the batch around it."""
        rpn = self.model.rpn
        n_images, n_anchors = objectness.shape
        order_key = _orderable(objectness) * 2 ** 32 + (2 ** 32 - 1 - torch.arange(n_anchors, device=objectness.device))
        top = rpn._get_top_n_idx(order_key, geo.per_level)                   # B×K, each level by key
        k = top.shape[1]
        if n_images >= 4095 or k >= 2 ** 20:
            raise ValueError(f"batch of {n_images} images × {k} proposals exceeds the proposal sort's key")
        score = torch.sigmoid(objectness.gather(1, top))
        boxes = box_ops.clip_boxes_to_image(proposals.gather(1, top[..., None].expand(-1, -1, 4)), geo.size)
        wh = boxes[..., 2:] - boxes[..., :2]
        valid = (wh >= rpn.min_size).all(-1) & (score >= rpn.score_thresh)
        n_levels = len(geo.per_level)
        group = torch.where(valid, torch.arange(n_images, device=top.device)[:, None] * n_levels + geo.levels[top],
                            n_images * n_levels)                          # invalid boxes: a group of their own
        # float64 offsets keep the coordinates exact whatever the group, so no IoU depends on where
        # an image sits in the batch; NMS sees ranks, not scores (ties broken by anchor index)
        shifted = boxes.double() + (group.double() * (max(geo.size) + 1))[..., None]
        rank = -torch.arange(k, device=top.device, dtype=torch.float64).expand(n_images, k)
        per_call = max(1, NMS_BOXES_PER_CALL.get(top.device.type, NMS_BOXES_PER_CALL["default"]) // k)
        keep = torch.cat([box_ops.nms(shifted[b:b + per_call].reshape(-1, 4), rank[b:b + per_call].reshape(-1),
                                      rpn.nms_thresh) + b * k for b in range(0, n_images, per_call)])
        # each image's survivors by score (ties: position), its first post_nms_top_n into B×P slots
        image = torch.where(valid.view(-1)[keep], keep // k, n_images)
        sort_key = (image << 51) | ((_M31 - _orderable(score.view(-1)[keep])) << 20) | (keep % k)
        sort_key, by = sort_key.sort()
        keep, image = keep[by], sort_key >> 51
        place = torch.arange(len(keep), device=keep.device) - torch.searchsorted(image, image)
        n_post = min(rpn.post_nms_top_n(), k)
        kept = (image < n_images) & (place < n_post)
        dest = torch.where(kept, image * n_post + place, n_images * n_post + torch.arange(len(keep), device=keep.device))
        out = boxes.new_zeros(n_images * n_post + len(keep), 4).index_copy(0, dest, boxes.reshape(-1, 4)[keep])
        real = kept.new_zeros(n_images * n_post + len(keep)).index_copy(0, dest, kept)
        return out[:n_images * n_post].view(n_images, n_post, 4), real[:n_images * n_post].view(n_images, n_post)

    def _dense_losses(self, features: OrderedDict, targets: list[dict], geo: _Geometry) -> dict:
        """RetinaNet / FCOS for the batch: the head once, each term's elements weighted by their
        image's 1 / max(1, foreground count) (torchvision's per-image normalisation)."""
        model = self.model
        head = model.head(list(features.values()))
        n_images = len(targets)
        classes = torch.stack([t["tv_classes"] for t in targets])
        foreground = classes >= 0
        norm = foreground.sum(1, keepdim=True).clamp(min=1)
        logits = head["cls_logits"]
        onehot = (classes[..., None] == torch.arange(logits.shape[-1], device=logits.device)).to(logits.dtype)
        focal = sigmoid_focal_loss(logits, onehot, reduction="none")
        fcos = isinstance(model, torchvision.models.detection.FCOS)
        counted = torch.ones_like(foreground) if fcos else torch.stack([t["tv_counted"] for t in targets])
        losses = {"classification": (focal * (counted / norm)[..., None]).sum()}
        weight = (foreground / norm).view(-1)
        regression = head["bbox_regression"]
        anchors = geo.anchors.expand(n_images, -1, -1)
        if fcos:
            matched = torch.stack([t["tv_matched_boxes"] for t in targets])
            predicted = model.head.box_coder.decode(regression, anchors)
            losses["bbox_regression"] = (_giou_loss(predicted.view(-1, 4), matched.view(-1, 4)) * weight).sum()
            ctrness = torch.stack([t["tv_ctrness"] for t in targets])
            losses["bbox_ctrness"] = (F.binary_cross_entropy_with_logits(head["bbox_ctrness"][..., 0], ctrness,
                                                                         reduction="none").view(-1) * weight).sum()
            return losses
        reg_head = model.head.regression_head
        target = torch.stack([t["tv_regression"] for t in targets]).view(-1, 4)
        regression = regression.reshape(-1, 4)
        if reg_head._loss_type == "l1":
            per_box = F.l1_loss(regression, target, reduction="none").sum(1)
        elif reg_head._loss_type == "smooth_l1":
            per_box = F.smooth_l1_loss(regression, target, reduction="none", beta=1.0).sum(1)
        else:
            predicted = reg_head.box_coder.decode_single(regression, anchors.reshape(-1, 4))
            if reg_head._loss_type == "giou":
                per_box = _giou_loss(predicted, target)
            else:   # torchvision's, with its boolean-mask intersection (host syncs)
                iou_loss = {"diou": distance_box_iou_loss, "ciou": complete_box_iou_loss}[reg_head._loss_type]
                per_box = iou_loss(predicted, target, reduction="none", eps=1e-7)
        losses["bbox_regression"] = (per_box * weight).sum()
        return losses

    @torch.no_grad()
    def predict(self, images, score_threshold: float = 0.05):
        was_training = self.model.training
        self.model.eval()
        try:
            outputs = self.model(list(images))
        finally:
            self.model.train(was_training)
        results = []
        for out in outputs:
            keep = (out["scores"] >= score_threshold) & (out["labels"] > 0)   # 0: torchvision's background
            results.append({"boxes": out["boxes"][keep], "scores": out["scores"][keep],
                            "labels": out["labels"][keep] - 1})
        return results


def _torchvision_hub(name: str):
    def url(spec: str) -> str:
        _, _, tag = spec.partition(":")
        return torchvision.models.get_model_weights(name)[tag or "DEFAULT"].url
    return url


@register("detector", *TORCHVISION_DETECTORS)
def build_torchvision_detector(name: str, classes: list[str], weights: str = "random",
                               image_size: int = 512, **model_kwargs) -> TorchvisionDetector:
    """``model_kwargs`` go to torchvision's builder, e.g. ``box_batch_size_per_image=128`` or
    ``rpn_post_nms_top_n_train=300`` for a lighter Faster R-CNN."""
    resolved = resolve(weights, hub=None if name in EXTRA_BUILDERS else _torchvision_hub(name), family=name)
    with seeded(resolved.seed):
        det = TorchvisionDetector(name, classes, image_size=image_size, **model_kwargs)
    if resolved.path is not None:
        state = load_state_dict(resolved.path)
        if any(k.startswith("model.") for k in state):
            det.load_state_dict(state)
        else:
            det.model.load_state_dict(state)
    attach_provenance(det, name, "torchvision", resolved)
    return det
