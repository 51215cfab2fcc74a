"""Per-worker training loop for codecs: any CompressAI codec with the RD loss, or UG-ICM (AAAI
2025) with its three stages. Ray-free; ``icm.train.ray_trainer.fit`` runs it on Ray Train.

Samples are ``{"x", "target", "boxes"}`` rows — a random crop of the image, the same crop of its
machine target (the image itself, or its MAA image), and the object boxes in crop coordinates
(flattened xyxy) — made on the CPU side by the stream's decode (``icm.train.inputs.crop_record``).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

import torch.nn.functional as F
from torch import nn

from icm.codecs.adapt_icmh import AdaptICMH
from icm.codecs.dynamic import DynamicCodec
from icm.codecs.ugicm import UGICM
from compressai.losses import RateDistortionLoss

from icm.losses import ClipDistance, UGICMLoss, bpp_of
from icm.losses.ugicm import STAGE_DEFAULTS
from icm.losses.task import PRESETS, DetectorTrainingLoss, FeaturePerceptualLoss, ResNetFeatures
from icm.maa.stage import build_from_spec
from icm.train.session import Session
from icm.train.stream import step_seed
from icm.zoo import build_classifier, build_clip, build_codec


def upload_tensorboard(local_dir: str, uri: str) -> None:
    """Copy the local TensorBoard logs to the job's out_dir in object storage."""
    from icm.data.storage import Storage, parent_location

    Storage(parent_location(uri)).upload_dir(local_dir, uri.rstrip("/").rsplit("/", 1)[-1])


def to_tensors(batch: list[dict], device) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    def stack(key):
        return torch.from_numpy(np.stack([np.asarray(r[key]) for r in batch])).permute(0, 3, 1, 2).float().div(255)
    boxes = [torch.as_tensor(np.asarray(r["boxes"], np.float32)).reshape(-1, 4).to(device) for r in batch]
    labels = [torch.as_tensor(np.asarray(r.get("labels", np.zeros(len(b), np.int64)), np.int64)).reshape(-1)
              for r, b in zip(batch, boxes)]
    return stack("x").to(device), stack("target").to(device), boxes, labels


def split_parameters(model: torch.nn.Module) -> tuple[list, list]:
    """CompressAI's split: the entropy bottleneck's ``.quantiles`` go to the aux optimizer."""
    main, aux = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (aux if name.endswith(".quantiles") else main).append(p)
    return main, aux


def build_training_codec(config: dict) -> torch.nn.Module:
    spec = dict(config["codec"])
    return build_codec(spec.pop("name"), **spec)


class LearningRateSchedule:
    """The learning-rate schedule of the main optimizer, from ``lr_schedule`` in the config:

    * ``{type: plateau, every: 100, factor: 0.1, patience: 10}`` (default) — CompressAI's
      ``ReduceLROnPlateau(optimizer, "min")``, stepped every ``every`` steps on the mean loss of
      those steps (CompressAI steps it per epoch on the test loss; streams have no epochs of fixed
      size, and the training loss is what every worker has);
    * ``{type: multistep, milestones: [steps…], gamma: 0.1}`` — the step schedule many ICM papers use;
    * ``{type: none}``."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: dict | None):
        cfg = dict(cfg or {"type": "plateau"})
        self.kind = cfg.pop("type", "plateau")
        self.every = int(cfg.pop("every", 100))
        self.losses: list[float] = []
        if self.kind == "plateau":
            self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, "min", factor=float(cfg.get("factor", 0.1)), patience=int(cfg.get("patience", 10)))
        elif self.kind == "multistep":
            self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
                optimizer, [int(m) for m in cfg.get("milestones", [])], gamma=float(cfg.get("gamma", 0.1)))
        elif self.kind == "none":
            self.scheduler = None
        else:
            raise ValueError(f"lr_schedule type {self.kind!r} is not one of plateau, multistep, none")

    def step(self, step: int, loss: float) -> None:
        """After optimiser step number ``step`` (1-based) whose loss was ``loss``."""
        if self.kind == "multistep":
            self.scheduler.step()
        elif self.kind == "plateau":
            self.losses.append(loss)
            if step % self.every == 0:
                self.scheduler.step(float(np.mean(self.losses)))
                self.losses = []

    def state_dict(self) -> dict:
        return {"scheduler": self.scheduler.state_dict() if self.scheduler else {},
                "losses": torch.tensor(self.losses, dtype=torch.float64)}

    def load_state_dict(self, state: dict) -> None:
        if self.scheduler is not None and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
        self.losses = [float(v) for v in state.get("losses", torch.zeros(0))]


class Objective:
    """What one training method optimises: which codec it takes, which of its parameters train,
    and the loss terms of a batch (``loss`` first; ``mse`` is the human-side MSE for PSNR).
    ``defaults`` are the method's loss settings where the config gives none, and
    ``clip_max_norm`` its gradient clipping: both are written into the config by
    ``with_method_defaults``, so the resolved config shows what ran."""

    codec_type: type = nn.Module
    clip_max_norm: float = 1.0   # CompressAI's example and the UG-ICM authors

    @classmethod
    def defaults(cls, loss_cfg: dict) -> dict:
        return {}

    def __init__(self, loss_cfg: dict, config: dict, model: nn.Module, device):
        pass

    def set_trainable(self, model: nn.Module) -> None:
        pass

    def terms(self, net, x, target, boxes, labels, step) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class RDObjective(Objective):
    """Any CompressAI codec: CompressAI's own ``λ·255²·MSE + bpp``."""

    @classmethod
    def defaults(cls, loss_cfg):
        return {"lmbda": 0.0130}

    def __init__(self, loss_cfg, config, model, device):
        super().__init__(loss_cfg, config, model, device)
        self.criterion = RateDistortionLoss(lmbda=float(loss_cfg["lmbda"]))

    def terms(self, net, x, target, boxes, labels, step):
        out = self.criterion(net(x), x)
        return {**out, "mse": out["mse_loss"]}


class UGICMObjective(Objective):
    """UG-ICM stages 1–3 (``icm.losses.ugicm``, the authors' weights per stage as defaults);
    stages 2–3 train only the decoder side."""

    codec_type = UGICM

    @classmethod
    def defaults(cls, loss_cfg):
        stage = int(loss_cfg.get("stage", 1))
        if stage not in STAGE_DEFAULTS:
            raise ValueError(f"loss.stage={stage}: UG-ICM has stages {sorted(STAGE_DEFAULTS)}")
        return {"stage": stage, **STAGE_DEFAULTS[stage]}

    def __init__(self, loss_cfg, config, model, device):
        super().__init__(loss_cfg, config, model, device)
        self.stage = int(loss_cfg["stage"])
        clip = None
        if needs_clip(loss_cfg):
            clip_cfg = loss_cfg.get("clip") or {}
            clip = ClipDistance(build_clip(clip_cfg.get("name", "ViT-B-32"), clip_cfg.get("weights", "random"))).to(device)
        self.criterion = UGICMLoss(float(loss_cfg["lmbda"]), float(loss_cfg["lmbda_machine"]),
                                   float(loss_cfg["lmbda_clip"]), clip, stage=self.stage,
                                   lmbda_instance=float(loss_cfg.get("lmbda_instance", 0)))

    def set_trainable(self, model):
        if self.stage >= 2:  # stage 2/3: only the synthesis transform, its blocks and the condition MLP train
            model.requires_grad_(False)
            for p in model.decoder_parameters():
                p.requires_grad_(True)

    def terms(self, net, x, target, boxes, labels, step):
        if self.stage >= 3:  # every sample decoded both ways from its one latent
            beta = torch.cat([torch.zeros(len(x)), torch.ones(len(x))]).to(x.device)
            out = self.criterion(net(x, UGICM.BOTH), x, target, beta, boxes)
        else:
            beta = (torch.rand(len(x)) < 0.5).float().to(x.device)
            out = self.criterion(net(x, beta), x, target, beta, boxes)
        return {**out, "mse": out["mse_human"]}


class AdaptICMHObjective(Objective):
    """Adapt-ICMH: ``task_λ·perceptual(clamp(x̂, 0, 1), x) + bpp``; only the adapters train, with no
    gradient clipping (as the authors). ``loss``: ``task`` (classification | detection),
    ``task_lmbda`` or ``preset`` (0–3: the authors' task_λ values — their rate points only with
    their feature network and input scaling, ``icm.losses.task.PRESETS``), ``model`` (a zoo spec:
    a torchvision ResNet for classification, a detector for detection)."""

    codec_type = AdaptICMH
    clip_max_norm = 0.0

    @classmethod
    def defaults(cls, loss_cfg):
        task = loss_cfg.get("task", "detection")
        if task not in PRESETS:
            raise ValueError(f"loss.task {task!r} is not one of {sorted(PRESETS)}")
        preset = loss_cfg.get("preset")
        return {"task": task, "task_lmbda": PRESETS[task][int(1 if preset is None else preset)]}

    def __init__(self, loss_cfg, config, model, device):
        super().__init__(loss_cfg, config, model, device)
        task = loss_cfg["task"]
        self.task_lmbda = float(loss_cfg["task_lmbda"])
        spec = dict(loss_cfg.get("model") or {})
        if task == "classification":
            net = ResNetFeatures(build_classifier(spec.get("name", "resnet50"), spec.get("weights", "random")))
        else:
            net = build_from_spec(spec, list(config.get("dataset_classes") or []), int(config.get("canvas", 512)))
        self.perceptual = FeaturePerceptualLoss(task, net).to(device)

    def set_trainable(self, model):
        model.freeze_base()

    def terms(self, net, x, target, boxes, labels, step):
        out = net(x)
        n, _, h, w = x.shape
        bpp = bpp_of(out["likelihoods"], n * h * w)
        perceptual = self.perceptual(out["x_hat"].clamp(0, 1), x)   # as the authors: the task network sees [0, 1]
        return {"loss": self.task_lmbda * perceptual + bpp, "bpp_loss": bpp, "perceptual": perceptual,
                "mse": F.mse_loss(out["x_hat"], x).detach()}


class DynamicObjective(Objective):
    """Dynamic adaptation: the detector's training losses (batch mean) on x̄ = g_t(x̂).
    ``dynamic``: the codec frozen and run as it decodes (eval mode: rounded latents, x̂ clamped),
    only g_t trains (``λ_m·L_det(x̄)``; bpp is reported, constant); ``dynamic_joint``:
    ``R + λ_h·255²·MSE(x, x̂) + λ_m·L_det(x̄)``, codec and g_t together (the codec in train mode)."""

    codec_type = DynamicCodec

    @classmethod
    def defaults(cls, loss_cfg):
        return {"lmbda": 0.0130, "lmbda_machine": 1.0}

    def __init__(self, loss_cfg, config, model, device):
        super().__init__(loss_cfg, config, model, device)
        self.joint = loss_cfg["type"] == "dynamic_joint"
        self.lmbda_h, self.lmbda_m = float(loss_cfg["lmbda"]), float(loss_cfg["lmbda_machine"])
        spec = dict(loss_cfg.get("detector") or {})
        classes = list(config.get("dataset_classes") or [])
        detector = build_from_spec(spec, classes, int(config.get("canvas", 512)))
        self.detector_loss = DetectorTrainingLoss(detector, classes, spec.get("class_map")).to(device)

    def set_trainable(self, model):
        model.freeze_codec(not self.joint)

    def terms(self, net, x, target, boxes, labels, step):
        out = net(x)
        n, _, h, w = x.shape
        bpp = bpp_of(out["likelihoods"], n * h * w)
        mse = F.mse_loss(out["x_hat"], x)
        detection = self.detector_loss(out["x_bar"], boxes, labels, seed=step)
        loss = self.lmbda_m * detection + (bpp + self.lmbda_h * 255 ** 2 * mse if self.joint else 0)
        return {"loss": loss, "bpp_loss": bpp.detach(), "detection": detection, "mse": mse.detach()}


OBJECTIVES = {"rd": RDObjective, "ugicm": UGICMObjective, "adapt_icmh": AdaptICMHObjective,
              "dynamic": DynamicObjective, "dynamic_joint": DynamicObjective}


def needs_clip(loss_cfg: dict) -> bool:
    """Whether a UG-ICM loss has a CLIP term: the global one, or stage 3's instance one."""
    return float(loss_cfg.get("lmbda_clip") or 0) > 0 or (
        int(loss_cfg.get("stage", 1)) >= 3 and float(loss_cfg.get("lmbda_instance") or 0) > 0)


def with_method_defaults(config: dict) -> dict:
    """``config`` with its training method's defaults written in where it gives none: the loss
    settings (``Objective.defaults``, e.g. UG-ICM's per-stage weights) and ``clip_max_norm``."""
    loss = dict(config.get("loss") or {"type": "rd"})
    if loss.get("type") not in OBJECTIVES:
        raise ValueError(f"loss type {loss.get('type')!r} is not one of {sorted(OBJECTIVES)}")
    objective = OBJECTIVES[loss["type"]]
    loss = {**objective.defaults(loss), **{k: v for k, v in loss.items() if v is not None}}
    clip_max_norm = config.get("clip_max_norm")
    return {**config, "loss": loss,
            "clip_max_norm": float(objective.clip_max_norm if clip_max_norm is None else clip_max_norm)}


def train_codec_loop(config: dict[str, Any], session: Session) -> torch.nn.Module:
    """config: codec (zoo spec: name, quality, weights, channels, ...), steps, batch_size, lr,
    aux_lr, clip_max_norm (gradient clipping of the main parameters; default the method's:
    1.0 as CompressAI's example and the UG-ICM authors, 0 — off — for Adapt-ICMH), lr_schedule (``LearningRateSchedule``), loss
    (``type``: one of ``OBJECTIVES``, with that method's settings), dataset_classes and canvas
    (for detector losses), checkpoint_every, log_every, seed, threads, tensorboard_dir. Returns
    the trained (unwrapped) model. A resumed run continues at the saved step, epoch and stream
    position with the saved optimiser and schedule: it equals an uninterrupted run bit for bit."""
    config = with_method_defaults(config)
    seed = int(config.get("seed", 0))
    torch.manual_seed(seed)
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    model = build_training_codec(config).to(session.device)
    loss_cfg = config["loss"]
    objective = OBJECTIVES[loss_cfg["type"]](loss_cfg, config, model, session.device)
    wrappers = (UGICM, AdaptICMH, DynamicCodec)
    if (objective.codec_type is nn.Module and isinstance(model, wrappers)) or not isinstance(model, objective.codec_type):
        raise ValueError(f"loss {loss_cfg['type']!r} does not fit codec {config['codec']['name']!r}: ugicm:<arch> "
                         "trains with ugicm, adapt_icmh:<arch> with adapt_icmh, dynamic:<arch> with dynamic or "
                         "dynamic_joint, plain codecs with rd")
    objective.set_trainable(model)
    main_params, aux_params = split_parameters(model)
    opt = torch.optim.Adam(main_params, lr=float(config.get("lr", 1e-4)))
    aux_opt = torch.optim.Adam(aux_params, lr=float(config.get("aux_lr", 1e-3))) if aux_params else None
    schedule = LearningRateSchedule(opt, config.get("lr_schedule"))
    clip_max_norm = config["clip_max_norm"]
    step, epoch = 0, 0
    state = session.restore()
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if aux_opt is not None:
            aux_opt.load_state_dict(state["aux_optimizer"])
        schedule.load_state_dict(state.get("lr_schedule", {}))
        step, epoch = int(state["step"]), int(state["epoch"])
    net = session.prepare(model)
    writer = None
    if session.rank == 0 and config.get("tensorboard_dir"):
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(config["tensorboard_dir"])
    steps, batch_size = int(config["steps"]), int(config.get("batch_size", 8))
    every, log_every = int(config.get("checkpoint_every", 100)), int(config.get("log_every", 10))
    started, window = time.time(), []
    while step < steps:
        # from the checkpoint's position when resuming inside this epoch
        for batch in session.batches("train", epoch, batch_size):
            x, target, boxes, labels = to_tensors(batch, session.device)
            # The quantisation noise and β come from the global RNG, seeded per step and rank so a
            # resumed run draws what the uninterrupted one would have.
            torch.manual_seed(step_seed(seed, step, session.rank))
            terms = objective.terms(net, x, target, boxes, labels, step)
            # One backward of the RD loss plus the aux loss (which reaches only .quantiles): with
            # separate backwards DDP replicas drifted apart (TRAPS.md); this keeps them bitwise equal.
            aux = model.aux_loss() if aux_opt is not None else x.new_zeros(())
            opt.zero_grad(set_to_none=True)
            if aux_opt is not None:
                aux_opt.zero_grad(set_to_none=True)
            (terms["loss"] + aux).backward()
            if clip_max_norm > 0:
                torch.nn.utils.clip_grad_norm_(main_params, clip_max_norm)
            lr = opt.param_groups[0]["lr"]
            opt.step()
            if aux_opt is not None:
                aux_opt.step()
            step += 1
            session.progress(step, steps)
            schedule.step(step, float(terms["loss"].detach()))
            window.append({k: float(v.detach()) for k, v in terms.items()}
                          | {"aux_loss": float(aux.detach()), "lr": lr})
            last = step >= steps
            if step % log_every == 0 or step % every == 0 or last:
                metrics = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
                metrics |= {"step": step, "epoch": epoch, "samples_per_s": len(window) * batch_size * session.world_size
                            / max(time.time() - started, 1e-9)}
                if metrics["mse"] > 0:
                    metrics["psnr"] = float(10 * np.log10(1.0 / metrics["mse"]))
                save = session.rank == 0 and (step % every == 0 or last)
                if writer is not None:
                    for k, v in metrics.items():
                        if k not in ("step", "epoch"):
                            writer.add_scalar(f"train/{k}", v, step)
                    writer.flush()
                    if save and config.get("tensorboard_upload"):
                        upload_tensorboard(config["tensorboard_dir"], config["tensorboard_upload"])
                session.report(metrics, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                         "aux_optimizer": aux_opt.state_dict() if aux_opt else {},
                                         "lr_schedule": schedule.state_dict(),
                                         "step": step, "epoch": epoch} if save else None)
                window, started = [], time.time()
            if last:
                break
        if step < steps:
            epoch += 1
    if writer is not None:
        writer.close()
    return model
