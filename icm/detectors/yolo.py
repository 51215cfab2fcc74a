"""Ultralytics YOLO (Redmon & Farhadi 2018 YOLOv3; Jocher et al. YOLOv5/v8/11) behind ``Detector``.

The loss is ultralytics' own ``v8DetectionLoss`` (box IoU + cls BCE + DFL). Over a batch it
normalises by the whole batch's target-score sum and scales by the batch size, which would make
one image's loss depend on its neighbours; so the network runs once over the batch and the loss
is computed on each image's slice of the head outputs (per-image assignment and normalisation,
exactly the loss of that image alone), then summed. Inputs are padded bottom/right to a multiple
of the model stride with gray 114/255, as ultralytics letterboxes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from icm.detectors.base import Detector, loss_branch, sum_terms
from icm.zoo.registry import attach_provenance, register
from icm.zoo.weights import WeightsUnavailable, load_state_dict, resolve, seeded

YOLO_NAMES = ("yolov3", "yolov3-tiny", "yolov5n", "yolov5s", "yolov8n", "yolov8s", "yolov8m",
              "yolo11n", "yolo11s")
ASSETS_URL = "https://github.com/ultralytics/assets/releases/download/v8.3.0/{}"


class YoloDetector(Detector):
    family = "ultralytics"

    def __init__(self, cfg: str, classes: list[str]):
        super().__init__(classes)
        from ultralytics.cfg import get_cfg
        from ultralytics.nn.tasks import DetectionModel

        self.cfg = cfg
        self.model = DetectionModel(cfg, nc=len(classes), verbose=False)
        self.model.args = get_cfg()  # a yaml-built model has no .args; the loss reads its gains
        self.stride = int(self.model.stride.max())

    def _pad(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        ph, pw = (-h) % self.stride, (-w) % self.stride
        return F.pad(images, (0, pw, 0, ph), value=114 / 255) if ph or pw else images

    def _criterion(self, device):
        crit = getattr(self.model, "criterion", None)
        if crit is None or crit.device != device:
            self.model.criterion = self.model.init_criterion()
        return self.model.criterion

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

    def loss(self, images, targets):
        criterion = self._criterion(images.device)
        per_image = []
        with loss_branch(self.model, train_norm=self.training):
            if self.batched:
                x = self._pad(images)
                preds = criterion.parse_output(self.model(x))
                for i, target in enumerate(targets):
                    sliced = {k: ([f[i:i + 1] for f in v] if isinstance(v, list) else v[i:i + 1])
                              for k, v in preds.items()}
                    loss, _ = criterion.loss(sliced, self._yolo_batch(target, x[i:i + 1]))
                    per_image.append({"box": loss[0], "cls": loss[1], "dfl": loss[2]})
            else:   # one forward per image (the reference the batched path is tested against)
                for image, target in zip(images, targets):
                    img = self._pad(image[None])
                    loss, _ = criterion(self.model(img), self._yolo_batch(target, img))
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


def _yolo_hub(spec: str) -> str:
    return ASSETS_URL.format(spec.partition(":")[2])


def _load_ultralytics(path) -> dict[str, torch.Tensor]:
    """An ultralytics ``.pt`` through its own safe loader (weights_only with an allow-list)."""
    from ultralytics.nn.tasks import torch_safe_load

    ckpt, _ = torch_safe_load(str(path), safe_only=True)
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
        state = (_load_ultralytics(resolved.path) if resolved.path.suffix == ".pt"
                 else load_state_dict(resolved.path))
        target = det if any(k.startswith("model.model.") for k in state) else det.model
        missing, unexpected = target.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise WeightsUnavailable(
                f"weights {weights!r} do not fit {name} with {len(classes)} classes: "
                f"{len(missing)} missing and {len(unexpected)} unexpected keys (e.g. {(missing or unexpected)[:3]})")
    attach_provenance(det, name, "ultralytics", resolved)
    return det
