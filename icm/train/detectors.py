"""Per-worker training loop for detectors behind the ``Detector`` interface (Faster R-CNN,
CenterNet, ...), on the same letterboxed canvases MAA optimises. YOLO trains with ultralytics'
own trainer instead (``train_yolo``)."""

from __future__ import annotations

import math
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from icm.data.records import load_record
from icm.detectors.base import total
from icm.maa.canvas import boxes_to_canvas, letterbox, to_tensor
from icm.train.inputs import ok_record
from icm.train.session import Session
from icm.train.stream import Stream, row_rng, step_seed
from icm.zoo import build_detector


class LossModule(nn.Module):
    """Wraps a detector so DDP sees one forward that returns the summed training loss."""

    def __init__(self, detector):
        super().__init__()
        self.detector = detector

    def forward(self, images, targets):
        terms = self.detector.loss(images, targets)
        return total(terms), {k: float(v.detach()) for k, v in terms.items()}


def canvas_sample(record: dict, canvas: int, flip: bool) -> tuple[torch.Tensor, dict]:
    image, _, placement = letterbox(to_tensor(record["image"]), canvas)
    boxes = boxes_to_canvas(record["boxes"], placement)
    if flip:
        image = image.flip(-1)
        boxes = torch.stack([canvas - boxes[:, 2], boxes[:, 1], canvas - boxes[:, 0], boxes[:, 3]], 1)
    return image, {"boxes": boxes, "labels": torch.as_tensor(np.asarray(record["class_ids"]), dtype=torch.int64)}


def record_stream(refs: list[dict], seed: int, in_process: bool = True, num_cpus: float = 1) -> Stream:
    """A detector's training stream: the images in a new order each epoch (a function of seed and
    epoch), decoded in the train worker (``in_process``: a few hundred small images, where Ray
    Data tasks would cost more than the decoding) or by Ray Data tasks (large sets)."""
    return Stream(items=refs, decode=ok_record, seed=seed, in_process=in_process, num_cpus=num_cpus)


@torch.no_grad()
def recalibrate_norm_stats(det, batches: list[tuple[torch.Tensor, list[dict]]]) -> None:
    """Recompute BatchNorm running statistics as exact averages over ``batches`` ("precise BN").

    Detectors trained briefly from scratch keep poor running statistics — torchvision's
    MobileNetV3 uses momentum 0.01, so after a few hundred steps they are still near their
    initial values — and eval mode (what MAA and inference use) then sees a different network.
    """
    norms = [m for m in det.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or not batches:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    was_training = det.training
    det.train()
    for images, targets in batches:
        det.loss(images, targets)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    det.train(was_training)


def train_detector_loop(config: dict[str, Any], session: Session) -> None:
    """config: name, classes, canvas, epochs, total_steps (optimiser steps of all epochs, for the
    learning-rate schedule), batch_size, lr, weight_decay, seed, weights,
    model_kwargs, checkpoint_every (epochs), threads (torch CPU threads), precise_bn_batches
    (batches used to recompute BatchNorm statistics after the last epoch; 0 disables). Metrics and
    checkpoints carry ``train_s``: the training seconds of the run over all its sessions (resumes)."""
    seed = int(config.get("seed", 0))
    torch.manual_seed(seed)
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    det = build_detector(config["name"], config["classes"], weights=config.get("weights", f"random:{seed}"),
                         image_size=int(config["canvas"]), **(config.get("model_kwargs") or {}))
    det.train()
    module = session.prepare(LossModule(det))
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=float(config.get("lr", 1e-3)),
                            weight_decay=float(config.get("weight_decay", 1e-4)))
    epochs = int(config["epochs"])
    # Per step: linear warm-up (fresh heads on a pretrained trunk), then cosine to 5 % of lr over
    # ``total_steps``; without it, a constant lr.
    total_steps = int(config.get("total_steps") or 0)
    warmup = min(100, max(total_steps // 10, 1))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 1.0 if not total_steps else min(1.0, (s + 1) / warmup)
        * (0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)) * 0.95 + 0.05))
    start_epoch, step, train_s = 0, 0, 0.0
    state = session.restore()
    if state is not None:
        det.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch, step = int(state["epoch"]) + 1, int(state["step"])
        train_s = float(state.get("train_s", 0.0))
    batch_size = int(config.get("batch_size", 8))
    canvas = int(config["canvas"])
    every = int(config.get("checkpoint_every", 1))
    for epoch in range(start_epoch, epochs):
        epoch_started = time.time()
        losses = []
        for batch in session.batches("train", epoch, batch_size):   # a new order each epoch (the stream's)
            samples = [canvas_sample(rec, canvas, flip=bool(row_rng(seed, epoch, rec["source_id"]).random() < 0.5))
                       for rec in batch]
            x = torch.stack([image for image, _ in samples]).to(session.device)
            tg = [{k: v.to(session.device) for k, v in t.items()} for _, t in samples]
            torch.manual_seed(step_seed(seed, step, session.rank))   # detector samplers draw from it
            loss, _ = module(x, tg)
            opt.zero_grad(set_to_none=True)
            (loss / len(samples)).backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            opt.step()
            sched.step()
            losses.append(loss.item() / len(samples))
            step += 1
            session.progress(step, total_steps or step)
        if epoch == epochs - 1 and int(config.get("precise_bn_batches", 16)) > 0:
            calib, images, targets = [], [], []
            for rec in session.records("train", epoch):
                image, target = canvas_sample(rec, canvas, flip=False)
                images.append(image)
                targets.append({k: v.to(session.device) for k, v in target.items()})
                if len(images) == batch_size:
                    calib.append((torch.stack(images).to(session.device), targets))
                    images, targets = [], []
                if len(calib) == int(config.get("precise_bn_batches", 16)):
                    break
            recalibrate_norm_stats(det, calib)
        train_s += time.time() - epoch_started
        metrics = {"epoch": epoch, "step": step, "loss": float(np.mean(losses)) if losses else float("nan"),
                   "lr": opt.param_groups[0]["lr"], "train_s": train_s}
        last = epoch == epochs - 1
        state = None
        if session.rank == 0 and ((epoch + 1) % every == 0 or last):
            state = {"model": det.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "epoch": epoch, "step": step, "name": config["name"], "classes": list(config["classes"]),
                     "train_s": train_s}
        session.report(metrics, state)


def object_crops(record: dict, rng: np.random.Generator, side: int, background: int) -> list[tuple[torch.Tensor, int]]:
    """Square crops of a record's objects (jittered around each box, label = its class id) and
    ``background`` crops that overlap no box (label = the number of classes)."""
    image = to_tensor(record["image"])
    h, w = image.shape[-2:]
    boxes = np.asarray(record["boxes"], dtype=np.float64).reshape(-1, 4)
    windows = []
    for (x1, y1, x2, y2), cls in zip(boxes, record["class_ids"]):
        size = max(x2 - x1, y2 - y1) * rng.uniform(1.1, 1.6)
        cx, cy = (x1 + x2) / 2 + rng.uniform(-0.1, 0.1) * size, (y1 + y2) / 2 + rng.uniform(-0.1, 0.1) * size
        windows.append(((cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2), int(cls)))
    n_classes = int(record.get("num_classes") or 0)
    for _ in range(background * 8):
        if sum(label == n_classes for _, label in windows) >= background:
            break
        size = rng.uniform(16, max(17.0, min(h, w) / 2))
        x0, y0 = rng.uniform(0, w - size), rng.uniform(0, h - size)
        if all(x0 >= b[2] or x0 + size <= b[0] or y0 >= b[3] or y0 + size <= b[1] for b in boxes):
            windows.append(((x0, y0, x0 + size, y0 + size), n_classes))
    out = []
    for (x0, y0, x1, y1), label in windows:
        x0, y0 = int(max(0, x0)), int(max(0, y0))
        x1, y1 = int(min(w, max(x1, x0 + 2))), int(min(h, max(y1, y0 + 2)))
        crop = torch.nn.functional.interpolate(image[None, :, y0:y1, x0:x1], size=(side, side), mode="bilinear",
                                               align_corners=False)[0]
        out.append((crop.flip(-1) if rng.random() < 0.5 else crop, label))
    return out


def record_crops(ref: dict, epoch: int, num_classes: int, side: int, seed: int) -> list[dict]:
    """The crop stream's expand: a reference → its object crops and one background crop (none
    when it does not decode), jittered by ``row_rng(seed, epoch, source_id)``."""
    record = load_record(ref)
    if record["status"] != "ok":
        return []
    rng = row_rng(seed, epoch, record["source_id"])
    return [{"crop": crop, "label": label}
            for crop, label in object_crops({**record, "num_classes": num_classes}, rng, side, background=1)]


def crop_stream(refs: list[dict], num_classes: int, side: int, seed: int, window: int = 16) -> Stream:
    """The backbone pretraining stream: the crops of ``window`` images at a time shuffled
    together, a new order each epoch; read in the train worker (small sets)."""
    return Stream(items=refs, expand=partial(record_crops, num_classes=num_classes, side=side, seed=seed), seed=seed,
                  window=window, in_process=True)


def train_backbone_loop(config: dict[str, Any], session: Session) -> None:
    """Pretrain a torchvision ResNet trunk as a classifier of object crops (each class, plus
    background) of the detection set — ImageNet pretraining in miniature, for detectors trained
    here from scratch: their backbones start from features of the objects they will detect.
    config: name (a torchvision ResNet), classes, steps, batch_size, lr, crop (side, px), seed,
    threads; the rows are ``crop_stream``'s. A checkpoint after each pass over the set."""
    import torchvision

    seed = int(config.get("seed", 0))
    torch.manual_seed(seed)
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    classes = list(config["classes"])
    net = torchvision.models.get_model(config["name"], weights=None, num_classes=len(classes) + 1)
    module = session.prepare(net)
    steps, batch_size = int(config["steps"]), int(config.get("batch_size", 64))
    lr = float(config.get("lr", 2e-3))
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    step, epoch, train_s = 0, 0, 0.0
    state = session.restore()
    if state is not None:
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, epoch = int(state["step"]), int(state["epoch"]) + 1
        train_s = float(state.get("train_s", 0.0))
    mean = torch.tensor([0.485, 0.456, 0.406], device=session.device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=session.device).view(1, 3, 1, 1)
    while step < steps:
        epoch_started = time.time()
        correct, seen, losses = 0, 0, []
        for batch in session.batches("train", epoch, batch_size):   # object crops, shuffled (crop_stream)
            x = (torch.stack([r["crop"] for r in batch]).to(session.device) - mean) / std
            y = torch.tensor([r["label"] for r in batch], device=session.device)
            logits = module(x)
            loss = torch.nn.functional.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            session.progress(step, steps)
            correct, seen = correct + int((logits.argmax(1) == y).sum()), seen + len(y)
            losses.append(loss.item())
            if step >= steps:
                break
        save = session.rank == 0
        train_s += time.time() - epoch_started
        session.report({"epoch": epoch, "step": step, "loss": float(np.mean(losses)) if losses else float("nan"),
                        "train_accuracy": correct / max(seen, 1), "train_s": train_s},
                       {"model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        "step": step, "epoch": epoch, "name": config["name"], "classes": classes,
                        "train_s": train_s} if save else None)
        epoch += 1


def train_yolo(config: dict[str, Any], data_yaml: str | Path, project_dir: str | Path,
               progress: Callable[[int, int], None] | None = None) -> Path:
    """Train a YOLO detector with ultralytics' own trainer (offline: no plots, no AMP check
    download); returns the path of its best ``.pt``. Resumes an interrupted run of the same name.
    ``init``: a ``.pt`` to start from (fine-tuning another domain's detector) instead of random
    weights; ``train_args``: further ``model.train`` arguments, overriding these defaults (``warmup_epochs``,
    ``optimizer``, ``val: false`` to validate after the last epoch only, …). ``progress(done,
    total)`` gets the training batches done after each one (ultralytics' own bars are off unless
    ``YOLO_VERBOSE``)."""
    from ultralytics import YOLO

    def with_progress(model):
        if progress is not None:
            done = [0]

            def epoch_start(trainer):
                done[0] = trainer.epoch * len(trainer.train_loader)

            def batch_end(trainer):
                done[0] += 1
                progress(done[0], trainer.epochs * len(trainer.train_loader))

            model.add_callback("on_train_epoch_start", epoch_start)
            model.add_callback("on_train_batch_end", batch_end)
        return model

    project_dir = Path(project_dir)
    name = config.get("run_name", config["name"])
    last = project_dir / name / "weights" / "last.pt"
    best = project_dir / name / "weights" / "best.pt"
    if best.is_file() and (project_dir / name / "DONE").is_file():
        return best
    if last.is_file():
        model = with_progress(YOLO(str(last)))
        model.train(resume=True)
    else:
        model = with_progress(YOLO(str(config["init"]) if config.get("init") else f"{config['name']}.yaml"))
        args = dict(data=str(data_yaml), epochs=int(config["epochs"]), imgsz=int(config["canvas"]),
                    batch=int(config.get("batch_size", 16)), device=config.get("device", "cpu"),
                    workers=int(config.get("workers", 0)), project=str(project_dir), name=name, exist_ok=True,
                    seed=int(config.get("seed", 0)), deterministic=True, plots=False, amp=False, val=True,
                    pretrained=bool(config.get("init")), verbose=False, lr0=float(config.get("lr", 0.01)),
                    mosaic=float(config.get("mosaic", 1.0)), close_mosaic=int(config.get("close_mosaic", 2)))
        model.train(**{**args, **(config.get("train_args") or {})})
    (project_dir / name / "DONE").write_text("ok")
    return best
