"""CenterNet — "Objects as Points" (Zhou, Wang & Krähenbühl, arXiv:1904.07850, 2019).

ResNet backbone → three stride-2 deconvolutions to stride 4 → heatmap (C), size (2) and offset
(2) heads. Loss as published: penalty-reduced pixel-wise focal loss on the heatmap (α=2, β=4),
0.1·L1 on box sizes and 1·L1 on centre offsets, each normalised by the image's object count;
Gaussian splats with CornerNet's radius at ``min_overlap=0.7``.

``centernet_resnet*`` is the paper's ResNet variant (upsampling from the last stage only);
``centernet_resnet*_skip`` adds the skip connections of its DLA-34 variant in their simplest
form: after each deconvolution the ResNet stage of the same stride is added back through a 1×1
projection (as TTFNet's ResNet "shortcuts", Liu et al., AAAI 2020). On small images the last stage is a
few cells wide, several objects share a cell and their classes blur; the skips carry the
stride-16/8/4 features that keep them apart.

Written here because no maintained package ships a trainable CenterNet for torch 2.x.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from icm.detectors.base import Detector, loss_branch
from icm.zoo.registry import attach_provenance, register
from icm.zoo.weights import load_state_dict, resolve, seeded

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKBONES = {"centernet_resnet18": ("resnet18", 512), "centernet_resnet34": ("resnet34", 512),
             "centernet_resnet50": ("resnet50", 2048)}
SKIP_BACKBONES = {f"{name}_skip": spec for name, spec in BACKBONES.items()}
STAGE_CHANNELS = {"resnet18": (64, 128, 256), "resnet34": (64, 128, 256), "resnet50": (256, 512, 1024)}


def gaussian_radius(height: float, width: float, min_overlap: float = 0.7) -> float:
    """CornerNet's radius: the largest corner shift keeping IoU ≥ ``min_overlap`` (3 cases)."""
    a1, b1 = 1, height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + math.sqrt(b1 ** 2 - 4 * a1 * c1)) / 2
    a2, b2 = 4, 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    r2 = (b2 + math.sqrt(b2 ** 2 - 4 * a2 * c2)) / 2
    a3, b3 = 4 * min_overlap, -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + math.sqrt(b3 ** 2 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


class CenterNet(Detector):
    family = "centernet"
    stride = 4
    supports_autocast = True

    def __init__(self, classes: list[str], backbone: str = "resnet18", feat_channels: int = 512,
                 head_channels: int = 64, skips: bool = False):
        super().__init__(classes)
        resnet = torchvision.models.get_model(backbone, weights=None)
        self.backbone = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool,
                                      resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)
        stages, in_ch = [], feat_channels
        for out_ch in (256, 128, 64):
            stages.append(nn.Sequential(nn.ConvTranspose2d(in_ch, out_ch, 4, stride=2, padding=1, bias=False),
                                        nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)))
            in_ch = out_ch
        # Without skips the three stages form one Sequential, as the paper's ResNet variant.
        self.upsample = nn.ModuleList(stages) if skips else nn.Sequential(*(m for st in stages for m in st))
        # 1×1 projections of layer3, layer2, layer1 onto the stride-16, 8, 4 deconvolution outputs.
        self.laterals = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch))
            for c, out_ch in zip(reversed(STAGE_CHANNELS[backbone]), (256, 128, 64))) if skips else None

        def head(out_ch: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(64, head_channels, 3, padding=1), nn.ReLU(inplace=True),
                                 nn.Conv2d(head_channels, out_ch, 1))
        self.heatmap, self.size, self.offset = head(len(classes)), head(2), head(2)
        nn.init.constant_(self.heatmap[-1].bias, -2.19)  # prior 0.1, as the paper
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def _pad(self, images):
        h, w = images.shape[-2:]
        ph, pw = (-h) % 32, (-w) % 32
        return F.pad(images, (0, pw, 0, ph), value=0.5) if ph or pw else images

    def _upsampled(self, images):
        x = (self._pad(images) - self.mean) / self.std
        if self.laterals is None:
            return self.upsample(self.backbone(x))
        stages = []
        for i, layer in enumerate(self.backbone):
            x = layer(x)
            if i in (4, 5, 6):  # layer1 (stride 4), layer2 (8), layer3 (16)
                stages.append(x)
        for deconv, lateral, skip in zip(self.upsample, self.laterals, reversed(stages)):
            x = F.relu(deconv(x) + lateral(skip))
        return x

    def features(self, images):
        return [self._upsampled(images)]

    def forward(self, images: torch.Tensor):
        feats = self._upsampled(images)
        return self.heatmap(feats), self.size(feats), self.offset(feats)

    def _network(self, images: torch.Tensor):
        """Heatmap, size and offset maps in float32 whatever the autocast (the loss is float32)."""
        with self.network_autocast(images.device.type):
            outputs = self(self.network_input(images))
        return tuple(o.float() for o in outputs)

    @torch.no_grad()
    def _targets(self, target: dict, out_h: int, out_w: int, device):
        hm = torch.zeros(self.num_classes, out_h, out_w, device=device)
        boxes = torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4) / self.stride
        labels = torch.as_tensor(target["labels"], dtype=torch.int64).reshape(-1)
        centers, sizes, offsets = [], [], []
        ys, xs = torch.arange(out_h, device=device).view(-1, 1), torch.arange(out_w, device=device).view(1, -1)
        for (x1, y1, x2, y2), cls in zip(boxes.tolist(), labels.tolist()):
            w, h = x2 - x1, y2 - y1
            if w <= 0 or h <= 0:
                continue
            radius = max(0, int(gaussian_radius(math.ceil(h), math.ceil(w))))
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            ix, iy = min(int(cx), out_w - 1), min(int(cy), out_h - 1)
            sigma = (2 * radius + 1) / 6
            g = torch.exp(-((xs - ix) ** 2 + (ys - iy) ** 2) / (2 * sigma ** 2))
            g = torch.where(((xs - ix).abs() <= radius) & ((ys - iy).abs() <= radius), g, torch.zeros_like(g))
            hm[cls] = torch.maximum(hm[cls], g)
            centers.append(iy * out_w + ix)
            sizes.append([w, h])
            offsets.append([cx - ix, cy - iy])
        return (hm, torch.tensor(centers, dtype=torch.long, device=device),
                torch.tensor(sizes, device=device).reshape(-1, 2), torch.tensor(offsets, device=device).reshape(-1, 2))

    @staticmethod
    def focal_loss(logits: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each image's focal-loss sum and its number of positives (both of shape (B,)), for
        (B, C, H, W) logits and Gaussian heatmaps."""
        pred = logits.sigmoid().clamp(1e-4, 1 - 1e-4)
        pos = gt.eq(1).float()
        neg_weights = (1 - gt) ** 4
        pos_loss = (torch.log(pred) * (1 - pred) ** 2 * pos).sum((1, 2, 3))
        neg_loss = (torch.log(1 - pred) * pred ** 2 * neg_weights * (1 - pos)).sum((1, 2, 3))
        return -(pos_loss + neg_loss), pos.sum((1, 2, 3))

    def _output_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        h, w = image_size
        return (h + (-h) % 32) // self.stride, (w + (-w) % 32) // self.stride

    def prepare_targets(self, targets, image_size):
        """Heatmap, centres, sizes and offsets of each image, built once (an MAA unit makes ~270
        loss calls on the same targets); centres, sizes and offsets padded to the unit's most
        objects, with a mask of the real ones, so a batch's targets concatenate in one op each."""
        out_h, out_w = self._output_size(image_size)
        device = self.mean.device
        built = [self._targets(t, out_h, out_w, device) for t in targets]
        most = max((len(centers) for _, centers, _, _ in built), default=0)
        prepared = []
        for t, (hm, centers, sizes, offsets) in zip(targets, built):
            pad = most - len(centers)
            valid = torch.cat([torch.ones(len(centers), device=device), torch.zeros(pad, device=device)])
            prepared.append({**t, "centernet": (out_h, out_w, (
                hm[None], F.pad(centers, (0, pad))[None], F.pad(sizes, (0, 0, 0, pad))[None],
                F.pad(offsets, (0, 0, 0, pad))[None], valid[None]))})
        return prepared

    def _batch_targets(self, targets: list[dict], out_size: tuple[int, int], image_size: tuple[int, int]):
        """The batch's (heatmaps, centres, sizes, offsets, valid), concatenated from the prepared
        targets (prepared here when they were not, for this size)."""
        if not all(t.get("centernet", (None, None))[:2] == out_size for t in targets):
            targets = self.prepare_targets(targets, image_size)
        parts = [t["centernet"][2] for t in targets]
        most = max(p[1].shape[1] for p in parts)
        if any(p[1].shape[1] != most for p in parts):   # prepared in different units
            parts = [(hm, F.pad(c, (0, most - c.shape[1])), F.pad(s, (0, 0, 0, most - s.shape[1])),
                      F.pad(o, (0, 0, 0, most - o.shape[1])), F.pad(v, (0, most - v.shape[1])))
                     for hm, c, s, o, v in parts]
        return [torch.cat(column) for column in zip(*parts)]

    def loss(self, images, targets):
        if not self.batched:
            return self._per_image_loss(images, targets)
        with loss_branch(self, train_norm=self.training):
            hm_logits, size_pred, off_pred = self._network(images)
        hm, centers, sizes, offsets, valid = self._batch_targets(targets, tuple(hm_logits.shape[2:]),
                                                                 tuple(images.shape[2:]))
        focal, num_pos = self.focal_loss(hm_logits, hm)
        n = valid.sum(1).clamp(min=1)      # per image, normalised by its own object count
        index = centers.unsqueeze(1).expand(-1, 2, -1)
        size_l1 = (size_pred.flatten(2).gather(2, index).transpose(1, 2) - sizes).abs().sum(-1)
        off_l1 = (off_pred.flatten(2).gather(2, index).transpose(1, 2) - offsets).abs().sum(-1)
        return {"heatmap": (focal / num_pos.clamp(min=1)).sum(), "size": (0.1 * (size_l1 * valid).sum(1) / n).sum(),
                "offset": ((off_l1 * valid).sum(1) / n).sum()}

    def _per_image_loss(self, images, targets):
        """One forward and one loss per image: the reference the batched loss is tested against."""
        terms = {"heatmap": images.new_zeros(()), "size": images.new_zeros(()), "offset": images.new_zeros(())}
        for image, target in zip(images, targets):
            with loss_branch(self, train_norm=self.training):
                hm_logits, size_pred, off_pred = self._network(image[None])
            hm, centers, sizes, offsets = self._targets(target, *hm_logits.shape[2:], images.device)
            focal, num_pos = self.focal_loss(hm_logits, hm[None])
            terms["heatmap"] = terms["heatmap"] + focal[0] / max(float(num_pos), 1.0)
            if len(centers):
                n = len(centers)
                s = size_pred[0].flatten(1)[:, centers].t()
                o = off_pred[0].flatten(1)[:, centers].t()
                terms["size"] = terms["size"] + 0.1 * F.l1_loss(s, sizes, reduction="sum") / n
                terms["offset"] = terms["offset"] + F.l1_loss(o, offsets, reduction="sum") / n
        return terms

    @torch.no_grad()
    def predict(self, images, score_threshold: float = 0.05, top_k: int = 100):
        was_training = self.training
        self.eval()
        try:
            hm_logits, size_pred, off_pred = self(images)
        finally:
            self.train(was_training)
        heat = hm_logits.sigmoid()
        heat = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)
        b, c, h, w = heat.shape
        scores, idx = heat.flatten(1).topk(min(top_k, c * h * w))
        results = []
        for i in range(b):
            cls, pix = idx[i] // (h * w), idx[i] % (h * w)
            ys, xs = (pix // w).float(), (pix % w).float()
            off = off_pred[i].flatten(1)[:, pix]
            wh = size_pred[i].flatten(1)[:, pix].clamp(min=0)   # a negative size would invert the box
            cx, cy = xs + off[0], ys + off[1]
            boxes = torch.stack([cx - wh[0] / 2, cy - wh[1] / 2, cx + wh[0] / 2, cy + wh[1] / 2], 1) * self.stride
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, images.shape[-1])
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, images.shape[-2])
            keep = scores[i] >= score_threshold
            results.append({"boxes": boxes[keep], "scores": scores[i][keep], "labels": cls[keep]})
        return results


def _torchvision_backbone_hub(backbone: str):
    def url(spec: str) -> str:
        _, _, tag = spec.partition(":")
        return torchvision.models.get_model_weights(backbone)[tag or "DEFAULT"].url
    return url


def load_trunk(resnet: nn.Module, state: dict, where: str) -> None:
    """A ResNet classifier's weights into ``resnet``, whatever its classifier head (ImageNet's
    1000 classes, or a backbone pretrained here on another label set): every other key must match."""
    trunk = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = resnet.load_state_dict(trunk, strict=False)
    bad = [k for k in missing if not k.startswith("fc.")] + list(unexpected)
    if bad:
        raise ValueError(f"backbone weights {where}: not a {type(resnet).__name__} state dict ({bad[:4]} …)")


@register("detector", *BACKBONES, *SKIP_BACKBONES)
def build_centernet(name: str, classes: list[str], weights: str = "random",
                    backbone_weights: str | None = None, **_) -> CenterNet:
    """``weights``: a full CenterNet checkpoint; ``backbone_weights``: ImageNet weights for the
    ResNet only (e.g. ``torchvision:DEFAULT``) when training from scratch."""
    backbone, channels = BACKBONES.get(name) or SKIP_BACKBONES[name]
    resolved = resolve(weights, family=name)
    with seeded(resolved.seed):
        det = CenterNet(classes, backbone=backbone, feat_channels=channels, skips=name in SKIP_BACKBONES)
    if resolved.path is not None:
        det.load_state_dict(load_state_dict(resolved.path))
    elif backbone_weights:
        bb = resolve(backbone_weights, hub=_torchvision_backbone_hub(backbone), family=backbone)
        resnet = torchvision.models.get_model(backbone, weights=None)
        load_trunk(resnet, load_state_dict(bb.path), backbone_weights)
        det.backbone.load_state_dict(nn.Sequential(
            resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool, resnet.layer1, resnet.layer2,
            resnet.layer3, resnet.layer4).state_dict())
    attach_provenance(det, name, "centernet", resolved)
    return det
