"""torchvision detectors — Faster R-CNN (Ren et al., NeurIPS 2015), Mask R-CNN (He et al., ICCV
2017), RetinaNet (Lin et al., ICCV 2017), FCOS (Tian et al., ICCV 2019) — behind ``Detector``.

Labels: torchvision reserves 0 for background, so class id c is label c+1 (``num_classes = C+1``).
The internal transform's ``min_size``/``max_size`` are set to ``image_size`` so a canvas of that
size is not resized to 800 px.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial

import torch
import torchvision
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
from torchvision.models.detection.image_list import ImageList

from icm.detectors.base import Detector, loss_branch, sum_terms
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


class SeededSampler(BalancedPositiveNegativeSampler):
    """torchvision's sampler draws from the global RNG; this one draws from its own generator,
    re-seeded for each image with that image's seed (``seeds``), so each image's anchor/ROI
    sample is fixed by its seed whatever else is in the batch."""

    def __init__(self, batch_size_per_image: int, positive_fraction: float):
        super().__init__(batch_size_per_image, positive_fraction)
        self.generator = torch.Generator()
        self.seeds: list[int] = []

    def __call__(self, matched_idxs):
        pos_idx, neg_idx = [], []
        for k, matched in enumerate(matched_idxs):
            if k < len(self.seeds):
                self.generator.manual_seed(self.seeds[k])
            positive = torch.where(matched >= 1)[0]
            negative = torch.where(matched == 0)[0]
            num_pos = min(int(self.batch_size_per_image * self.positive_fraction), positive.numel())
            num_neg = min(self.batch_size_per_image - num_pos, negative.numel())
            perm1 = torch.randperm(positive.numel(), generator=self.generator)[:num_pos].to(positive.device)
            perm2 = torch.randperm(negative.numel(), generator=self.generator)[:num_neg].to(negative.device)
            pos_mask = torch.zeros_like(matched, dtype=torch.uint8)
            neg_mask = torch.zeros_like(matched, dtype=torch.uint8)
            pos_mask[positive[perm1]] = 1
            neg_mask[negative[perm2]] = 1
            pos_idx.append(pos_mask)
            neg_idx.append(neg_mask)
        return pos_idx, neg_idx


def _box_masks(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Filled-box masks for Mask R-CNN when a dataset has no segmentation."""
    masks = torch.zeros((len(boxes), height, width), dtype=torch.uint8, device=boxes.device)
    for i, (x1, y1, x2, y2) in enumerate(boxes.round().long().tolist()):
        masks[i, max(y1, 0):max(y2, y1 + 1), max(x1, 0):max(x2, x1 + 1)] = 1
    return masks


class TorchvisionDetector(Detector):
    family = "torchvision"

    def __init__(self, name: str, classes: list[str], image_size: int = 512, **model_kwargs):
        super().__init__(classes)
        self.name = name
        self.model = (EXTRA_BUILDERS.get(name) or partial(torchvision.models.get_model, name))(
            weights=None, weights_backbone=None, num_classes=len(classes) + 1,
            min_size=image_size, max_size=image_size, **model_kwargs)
        self.samplers = []
        for owner in (getattr(self.model, "rpn", None), getattr(self.model, "roi_heads", None)):
            if owner is not None and hasattr(owner, "fg_bg_sampler"):
                old = owner.fg_bg_sampler
                owner.fg_bg_sampler = SeededSampler(old.batch_size_per_image, old.positive_fraction)
                self.samplers.append(owner.fg_bg_sampler)

    def _tv_target(self, target: dict, image: torch.Tensor) -> dict:
        boxes = torch.as_tensor(target["boxes"], dtype=torch.float32, device=image.device).reshape(-1, 4)
        out = {"boxes": boxes,
               "labels": torch.as_tensor(target["labels"], dtype=torch.int64, device=image.device) + 1}
        if "maskrcnn" in self.name:
            out["masks"] = target.get("masks", _box_masks(boxes, image.shape[-2], image.shape[-1]))
        return out

    def loss(self, images, targets):
        if self.training:
            # Training the weights: one batched call (BatchNorm sees the whole batch); the
            # families average over the batch, so scale back to a per-image sum.
            self._seed(targets)
            with loss_branch(self.model, train_norm=True):
                terms = self.model(list(images), [self._tv_target(t, im) for t, im in zip(targets, images)])
            return {k: v * len(images) for k, v in terms.items()}
        # Optimising inputs: the families' losses normalise over the whole batch (sampled
        # anchors and ROIs, foreground counts), so each image's loss is computed on its own. The
        # networks run once over the batch (backbone, FPN, RPN and ROI heads, dense heads); target
        # assignment, sampling (seeded per image) and each loss's normalisation are per image.
        with loss_branch(self.model, train_norm=False):
            if not self.batched:
                per_image = []
                for image, target in zip(images, targets):
                    self._seed([target])
                    per_image.append(self.model([image], [self._tv_target(target, image)]))
                return sum_terms(per_image)
            tv_targets = [self._tv_target(t, im) for t, im in zip(targets, images)]
            batch, tv_targets = self.model.transform(list(images), tv_targets)
            features = self.model.backbone(batch.tensors)
            if isinstance(features, torch.Tensor):
                features = OrderedDict([("0", features)])
            self._seed(targets)
            if hasattr(self.model, "rpn") and not self.model.roi_heads.has_mask():
                return sum_terms(self._two_stage_losses(batch, features, tv_targets))
            if hasattr(self.model, "rpn"):   # Mask R-CNN: its mask loss normalises over the batch's ROIs
                per_image = []
                for i, target in enumerate(targets):
                    self._seed([target])
                    one = ImageList(batch.tensors[i:i + 1], [batch.image_sizes[i]])
                    feats = OrderedDict((k, v[i:i + 1]) for k, v in features.items())
                    proposals, rpn_losses = self.model.rpn(one, feats, [tv_targets[i]])
                    _, roi_losses = self.model.roi_heads(feats, proposals, one.image_sizes, [tv_targets[i]])
                    per_image.append({**rpn_losses, **roi_losses})
                return sum_terms(per_image)
            return sum_terms(self._dense_losses(batch, features, tv_targets))

    def features(self, images):
        t = self.model.transform
        mean = torch.as_tensor(t.image_mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        std = torch.as_tensor(t.image_std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        feats = self.model.backbone((images - mean) / std)
        return list(feats.values()) if isinstance(feats, dict) else [feats]

    def _seed(self, targets: list[dict]) -> None:
        for sampler in self.samplers:
            sampler.seeds = [int(t.get("seed", 0)) for t in targets]

    def _two_stage_losses(self, images: ImageList, features: OrderedDict, targets: list[dict]) -> list[dict]:
        """Faster R-CNN's RPN and ROI heads run over the whole batch, as ``GeneralizedRCNN``
        does; their losses are computed image by image (torchvision's ``compute_loss`` and
        ``fastrcnn_loss`` normalise over whatever they are given)."""
        from torchvision.models.detection.roi_heads import fastrcnn_loss
        from torchvision.models.detection.rpn import concat_box_prediction_layers

        rpn, roi = self.model.rpn, self.model.roi_heads
        feats = list(features.values())
        objectness, deltas = rpn.head(feats)
        anchors = rpn.anchor_generator(images, feats)
        n = len(anchors)
        per_level = [o[0].shape[0] * o[0].shape[1] * o[0].shape[2] for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)   # image-major rows
        proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(n, -1, 4)
        boxes, _ = rpn.filter_proposals(proposals, objectness, images.image_sizes, per_level)
        labels, matched = rpn.assign_targets_to_anchors(anchors, targets)
        regression = rpn.box_coder.encode(matched, anchors)
        seeds = list(rpn.fg_bg_sampler.seeds)
        losses = []
        for i, rows in enumerate(torch.arange(len(objectness), device=objectness.device).chunk(n)):
            rpn.fg_bg_sampler.seeds = seeds[i:i + 1]
            obj, reg = rpn.compute_loss(objectness[rows], deltas[rows], [labels[i]], [regression[i]])
            losses.append({"loss_objectness": obj, "loss_rpn_box_reg": reg})
        rpn.fg_bg_sampler.seeds = seeds
        sampled, _, roi_labels, roi_regression = roi.select_training_samples(boxes, targets)
        box_features = roi.box_head(roi.box_roi_pool(features, sampled, images.image_sizes))
        class_logits, box_regression = roi.box_predictor(box_features)
        start = 0
        for i, props in enumerate(sampled):
            rows = slice(start, start + len(props))
            start += len(props)
            cls, box = fastrcnn_loss(class_logits[rows], box_regression[rows], [roi_labels[i]], [roi_regression[i]])
            losses[i] |= {"loss_classifier": cls, "loss_box_reg": box}
        return losses

    def _dense_losses(self, images: ImageList, features: OrderedDict, targets: list[dict]) -> list[dict]:
        """RetinaNet / FCOS: the head over the whole batch, each image's loss on its slice."""
        model = self.model
        feats = list(features.values())
        head_outputs = model.head(feats)
        anchors = model.anchor_generator(images, feats)
        fcos = isinstance(model, torchvision.models.detection.FCOS)
        per_level = [x.size(2) * x.size(3) for x in feats]
        losses = []
        for i, target in enumerate(targets):
            sliced = {k: v[i:i + 1] for k, v in head_outputs.items()}
            if fcos:
                losses.append(model.compute_loss([target], sliced, [anchors[i]], per_level))
            else:
                losses.append(model.compute_loss([target], sliced, [anchors[i]]))
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
