"""Ultralytics YOLO (Redmon & Farhadi 2018 YOLOv3; Jocher et al. YOLOv5/v8/11) behind ``Detector``.

The loss is ultralytics' own ``v8DetectionLoss`` (box IoU + cls BCE + DFL). Over a batch it
normalises by the whole batch's target-score sum and scales by the batch size, which would make
one image's loss depend on its neighbours (TRAPS.md). So the network runs once over the batch,
ultralytics' task-aligned assigner runs once over the padded batch (it is batched over images
already), and each term is summed per image and divided by that image's own target-score sum:
each image gets exactly the loss it has alone, in one criterion call with no host sync. The
ground truth is laid out the way the criterion reads it once per unit (``prepare_targets``).
Inputs are padded bottom/right to a multiple of the model stride with gray 114/255, as
ultralytics letterboxes.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map

from icm.detectors.base import Detector, loss_branch, sum_terms
from icm.zoo.registry import attach_provenance, register
from icm.zoo.weights import SAFE_CHECKPOINT_FIX, WeightsUnavailable, load_state_dict, refusal_reason, resolve, seeded

YOLO_NAMES = ("yolov3", "yolov3-tiny", "yolov5n", "yolov5s", "yolov8n", "yolov8s", "yolov8m",
              "yolo11n", "yolo11s")
ASSETS_URL = "https://github.com/ultralytics/assets/releases/download/v8.3.0/{}"


class YoloDetector(Detector):
    family = "ultralytics"
    supports_autocast = True

    def __init__(self, cfg: str, classes: list[str]):
        super().__init__(classes)
        from ultralytics.cfg import get_cfg
        from ultralytics.nn.tasks import DetectionModel

        self.cfg = cfg
        self.model = DetectionModel(cfg, nc=len(classes), verbose=False)
        self.model.args = get_cfg()  # a yaml-built model has no .args; the loss reads its gains
        self.stride = int(self.model.stride.max())
        self._anchor_cache: dict = {}

    def _pad(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        ph, pw = (-h) % self.stride, (-w) % self.stride
        return F.pad(images, (0, pw, 0, ph), value=114 / 255) if ph or pw else images

    def _network(self, x: torch.Tensor):
        """The head's training outputs for padded inputs ``x``, in float32 whatever the autocast."""
        with self.network_autocast(x.device.type):
            out = self.model(self.network_input(x))
        return tree_map(lambda t: t.float() if torch.is_tensor(t) and t.is_floating_point() else t, out)

    def fold_batchnorm(self) -> None:
        """ultralytics' own ``fuse``: BatchNorm folded into its ``Conv`` blocks' convolutions."""
        self.model.fuse(verbose=False)

    def _criterion(self, device):
        crit = getattr(self.model, "criterion", None)
        if crit is None or crit.device != device:
            self.model.criterion = self.model.init_criterion()
        return self.model.criterion

    def _padded_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        h, w = image_size
        return h + (-h) % self.stride, w + (-w) % self.stride

    @staticmethod
    def _yolo_batch(target: dict, img: torch.Tensor) -> dict:
        """One image's ground truth the way ultralytics' loss reads it (normalised xywh)."""
        h, w = img.shape[-2:]
        boxes = torch.as_tensor(target["boxes"], dtype=torch.float32, device=img.device).reshape(-1, 4)
        xywh = torch.stack([(boxes[:, 0] + boxes[:, 2]) / 2 / w, (boxes[:, 1] + boxes[:, 3]) / 2 / h,
                            (boxes[:, 2] - boxes[:, 0]) / w, (boxes[:, 3] - boxes[:, 1]) / h], 1)
        return {"img": img, "batch_idx": torch.zeros(len(boxes), device=img.device),
                "cls": torch.as_tensor(target["labels"], dtype=torch.float32, device=img.device).reshape(-1, 1),
                "bboxes": xywh}

    def prepare_targets(self, targets, image_size):
        """Each image's ground truth as the criterion's padded ``(1, M, 5)`` rows (class, pixel
        xyxy; zero rows pad to the unit's most objects ``M``), built by the criterion's own
        ``preprocess`` once per unit rather than at each of its ~270 loss calls."""
        device = next(self.model.parameters()).device
        criterion = self._criterion(device)
        size = self._padded_size(image_size)
        scale = torch.tensor(size, dtype=torch.float32, device=device)[[1, 0, 1, 0]]
        rows = []
        for target in targets:
            batch = self._yolo_batch(target, torch.empty(1, 3, *size, device=device))
            flat = torch.cat((batch["batch_idx"].view(-1, 1), batch["cls"], batch["bboxes"]), 1)
            rows.append(criterion.preprocess(flat, 1, scale_tensor=scale))
        most = max((r.shape[1] for r in rows), default=0)
        return [{**t, "yolo": (size, F.pad(r, (0, 0, 0, most - r.shape[1])))} for t, r in zip(targets, rows)]

    def _ground_truth(self, targets: list[dict], image_size: tuple[int, int]) -> torch.Tensor:
        """The batch's ``(B, M, 5)`` ground truth: the prepared rows concatenated (one op), or
        prepared here when the targets were not prepared for this size."""
        size = self._padded_size(image_size)
        if not all(t.get("yolo", (None,))[0] == size for t in targets):
            targets = self.prepare_targets(targets, image_size)
        rows = [t["yolo"][1] for t in targets]
        most = max(r.shape[1] for r in rows)
        return torch.cat([r if r.shape[1] == most else F.pad(r, (0, 0, 0, most - r.shape[1])) for r in rows])

    def _anchors(self, feats: list[torch.Tensor], criterion) -> tuple[torch.Tensor, torch.Tensor]:
        """ultralytics' anchor points and strides for feature maps of these shapes, made once:
        ``make_anchors`` builds them on the host and copies them over at every call."""
        from ultralytics.utils.tal import make_anchors

        key = (tuple(tuple(f.shape[2:]) for f in feats), feats[0].device)
        if key not in self._anchor_cache:
            # the assigner's strides are a Python list: the criterion's tensor would be read back per level
            points, strides = make_anchors([f.detach().float() for f in feats], criterion.assigner.stride, 0.5)
            self._anchor_cache = {key: (points, strides)}
        return self._anchor_cache[key]

    def loss(self, images, targets):
        from ultralytics.utils.loss import v8DetectionLoss

        criterion = self._criterion(images.device)
        with loss_branch(self.model, train_norm=self.training):
            if not self.batched:   # one forward per image: the reference the batched path is tested against
                per_image = []
                for image, target in zip(images, targets):
                    img = self._pad(image[None])
                    loss, _ = criterion(self._network(img), self._yolo_batch(target, img))
                    per_image.append({"box": loss[0], "cls": loss[1], "dfl": loss[2]})
                return sum_terms(per_image)
            x = self._pad(images)
            preds = criterion.parse_output(self._network(x))
        if type(criterion) is v8DetectionLoss and criterion.use_dfl:
            box, cls, dfl = per_image_detection_loss(criterion, preds, self._ground_truth(targets, images.shape[-2:]),
                                                     self._anchors(preds["feats"], criterion))
            return {"box": box.sum(), "cls": cls.sum(), "dfl": dfl.sum()}
        # Another head's criterion (an end-to-end or reg_max-1 yaml given as ``yolo:``): one call per
        # image's slice, each normalised by that image alone.
        per_image = []
        for i, target in enumerate(targets):
            sliced = {k: ([f[i:i + 1] for f in v] if isinstance(v, list) else v[i:i + 1]) for k, v in preds.items()}
            loss, _ = criterion.loss(sliced, self._yolo_batch(target, x[i:i + 1]))
            per_image.append({"box": loss[0], "cls": loss[1], "dfl": loss[2]})
        return sum_terms(per_image)

    def features(self, images):
        """The maps the Detect head reads (P3–P5), captured by a forward pre-hook."""
        captured = []
        hook = self.model.model[-1].register_forward_pre_hook(lambda _m, args: captured.append(list(args[0])))
        try:
            with loss_branch(self.model, train_norm=self.training):
                self.model(self._pad(images))
        finally:
            hook.remove()
        return captured[0]

    @torch.no_grad()
    def predict(self, images, score_threshold: float = 0.05):
        from ultralytics.utils.nms import non_max_suppression

        was_training = self.model.training
        self.model.eval()
        try:
            raw = self.model(self._pad(images))
        finally:
            self.model.train(was_training)
        dets = non_max_suppression(raw, conf_thres=score_threshold, iou_thres=0.45, max_det=300)
        return [{"boxes": d[:, :4], "scores": d[:, 4], "labels": d[:, 5].long()} for d in dets]


@cache
def _sync_free_assigner_class():
    """ultralytics' ``TaskAlignedAssigner`` without host syncs, overriding the two methods that
    have one: ``get_box_metrics`` gathers the candidates with ``nonzero`` (here computed densely
    over (image, ground truth, anchor): the same values, zero off the candidates, at B·M·A memory;
    the assigner's own per-image retry still catches an OOM), and ``select_candidates_in_gts``
    copies its minimum box side to the device as a new tensor at every call (a blocking
    host-to-device copy on CUDA; here a Python scalar)."""
    from ultralytics.utils.ops import xywh2xyxy, xyxy2xywh
    from ultralytics.utils.tal import TaskAlignedAssigner

    class SyncFreeTaskAlignedAssigner(TaskAlignedAssigner):
        def select_candidates_in_gts(self, xy_centers, gt_bboxes, mask_gt, eps=1e-9):
            xywh = xyxy2xywh(gt_bboxes)
            small = ((xywh[..., 2:] < self.stride_val) * mask_gt).bool()
            xywh[..., 2:] = torch.where(small, float(self.stride_val), xywh[..., 2:])
            lt, rb = xywh2xyxy(xywh).unsqueeze(2).chunk(2, 3)
            mask = xy_centers[:, 0] - lt[..., 0] > eps
            mask &= xy_centers[:, 1] - lt[..., 1] > eps
            mask &= rb[..., 0] - xy_centers[:, 0] > eps
            mask &= rb[..., 1] - xy_centers[:, 1] > eps
            return mask

        def get_box_metrics(self, pd_scores, pd_bboxes, gt_labels, gt_bboxes, mask_gt, **extra):
            if extra:
                return super().get_box_metrics(pd_scores, pd_bboxes, gt_labels, gt_bboxes, mask_gt, **extra)
            na = pd_bboxes.shape[-2]
            mask_gt = mask_gt.bool()   # (b, max_num_obj, h*w)
            labels = gt_labels.long().squeeze(-1).clamp(min=0)
            bbox_scores = pd_scores.gather(2, labels.unsqueeze(1).expand(-1, na, -1)).transpose(1, 2)
            overlaps = self.iou_calculation(gt_bboxes.unsqueeze(2).expand(-1, -1, na, -1),
                                            pd_bboxes.unsqueeze(1).expand(-1, self.n_max_boxes, -1, -1))
            overlaps = torch.where(mask_gt, overlaps, torch.zeros((), dtype=overlaps.dtype, device=overlaps.device))
            align_metric = torch.where(mask_gt, bbox_scores.pow(self.alpha) * overlaps.pow(self.beta),
                                       torch.zeros((), dtype=bbox_scores.dtype, device=bbox_scores.device))
            return align_metric, overlaps

    return SyncFreeTaskAlignedAssigner


def sync_free_assigner(assigner):
    """A sync-free copy of ``assigner`` (same hyper-parameters), kept on it for later calls."""
    if not hasattr(assigner, "_sync_free"):
        assigner._sync_free = _sync_free_assigner_class()(topk=assigner.topk, num_classes=assigner.num_classes, alpha=assigner.alpha,
                                  beta=assigner.beta, stride=assigner.stride, eps=assigner.eps,
                                  topk2=assigner.topk2)
    return assigner._sync_free


def per_image_detection_loss(criterion, preds: dict, gt: torch.Tensor, anchors) -> tuple[torch.Tensor, ...]:
    """ultralytics' ``v8DetectionLoss`` of each image alone — (box, cls, dfl), each of shape (B,),
    gains applied, not scaled by the batch size — for the whole batch in one pass.

    ``gt`` is the padded (B, M, 5) ground truth of ``criterion.preprocess``. The assignment is the
    criterion's own (batched over images). Written here because ultralytics divides every term by
    the *batch's* target-score sum and gathers the foreground with ``nonzero`` (a host sync): this
    sums each term per image over all anchors (zero weight off the foreground) and divides by the
    image's own sum, as ``v8DetectionLoss.get_assigned_targets_and_loss`` does for one image.
    ``anchors``: ``make_anchors`` of the feature maps (points, strides), which depend on their
    shapes only."""
    from ultralytics.utils.metrics import bbox_iou
    from ultralytics.utils.tal import bbox2dist

    pred_distri = preds["boxes"].permute(0, 2, 1).contiguous().float()
    pred_scores = preds["scores"].permute(0, 2, 1).contiguous().float()
    anchor_points, stride_tensor = anchors
    gt_labels, gt_bboxes = gt.split((1, 4), 2)
    mask_gt = gt_bboxes.sum(2, keepdim=True).gt_(0.0)
    pred_bboxes = criterion.bbox_decode(anchor_points, pred_distri)   # grid units, (B, A, 4)
    _, target_bboxes, target_scores, fg_mask, _ = sync_free_assigner(criterion.assigner)(
        pred_scores.detach().sigmoid(), (pred_bboxes.detach() * stride_tensor).type(gt_bboxes.dtype),
        anchor_points * stride_tensor, gt_labels, gt_bboxes, mask_gt)
    score_sum = target_scores.sum((1, 2)).clamp(min=1)   # (B,): each image's own normaliser

    bce = criterion.bce(pred_scores, target_scores.to(pred_scores.dtype))
    if criterion.class_weights is not None:
        bce = bce * criterion.class_weights
    cls = bce.sum((1, 2)) / score_sum

    weight = target_scores.sum(-1)   # (B, A), zero off the foreground
    # Off the foreground the target is the prediction itself (zero weight either way): a finite,
    # well-conditioned CIoU there, so no 0·inf in the backward.
    target_bboxes = torch.where(fg_mask.unsqueeze(-1), target_bboxes / stride_tensor, pred_bboxes.detach())
    iou = bbox_iou(pred_bboxes, target_bboxes, xywh=False, CIoU=True).squeeze(-1)
    box = ((1.0 - iou) * weight).sum(1) / score_sum
    dfl_loss = criterion.bbox_loss.dfl_loss
    target_ltrb = bbox2dist(anchor_points, target_bboxes, dfl_loss.reg_max - 1)
    dfl = dfl_loss(pred_distri.view(-1, dfl_loss.reg_max), target_ltrb.view(-1, 4)).view(weight.shape)
    dfl = (dfl * weight).sum(1) / score_sum
    return box * criterion.hyp.box, cls * criterion.hyp.cls, dfl * criterion.hyp.dfl


def _yolo_hub(spec: str) -> str:
    return ASSETS_URL.format(spec.partition(":")[2])


ULTRALYTICS_CLASSES = ("ultralytics.", "torch.", "collections.", "builtins.", "pathlib.")   # its loader's allow-list, roughly


def load_ultralytics(path) -> dict[str, torch.Tensor]:
    """An ultralytics ``.pt`` through its own safe loader (weights_only with an allow-list of
    ultralytics' and torch's module classes: nothing else in the file is built or run)."""
    import pickle

    from ultralytics.nn.tasks import torch_safe_load

    try:
        ckpt, _ = torch_safe_load(str(path), safe_only=True)
    except (TypeError, pickle.UnpicklingError) as exc:
        raise WeightsUnavailable(f"cannot load ultralytics checkpoint {path} with its safe loader: "
                                 f"{refusal_reason(path, exc, ULTRALYTICS_CLASSES)}; {SAFE_CHECKPOINT_FIX}") from None
    module = ckpt.get("ema") or ckpt.get("model")
    if module is None:
        raise WeightsUnavailable(f"{path} holds no ultralytics model ('ema' or 'model')")
    return {k: v.float() for k, v in module.state_dict().items()}


@register("detector", *YOLO_NAMES, "yolo:")
def build_yolo(name: str, classes: list[str], weights: str = "random", **_) -> YoloDetector:
    """``name`` is a model yaml known to ultralytics (``yolov8n``) or ``yolo:<yaml path or name>``."""
    cfg = name.partition(":")[2] if name.startswith("yolo:") else f"{name}.yaml"
    resolved = resolve(weights, hub=_yolo_hub, family=name)
    with seeded(resolved.seed):
        det = YoloDetector(cfg, classes)
    if resolved.path is not None:
        state = (load_ultralytics(resolved.path) if resolved.path.suffix == ".pt"
                 else load_state_dict(resolved.path))
        target = det if any(k.startswith("model.model.") for k in state) else det.model
        missing, unexpected = target.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise WeightsUnavailable(
                f"weights {weights!r} do not fit {name} with {len(classes)} classes: "
                f"{len(missing)} missing and {len(unexpected)} unexpected keys (e.g. {(missing or unexpected)[:3]})")
    attach_provenance(det, name, "ultralytics", resolved)
    return det
