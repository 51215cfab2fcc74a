"""Per-worker training loop for codecs: any CompressAI codec with the RD loss, or UG-ICM (AAAI
2025) with its three stages. Ray-free; ``icm.train.ray_trainer.fit`` runs it on Ray Train.

Samples are ``{"x", "target", "boxes"}`` rows — a random crop of the image, the same crop of its
machine target (the image itself, or its MAA image), and the object boxes in crop coordinates
(flattened xyxy) — made on the CPU side by ``crop_pair``.
"""

from __future__ import annotations

import json
import time
from typing import Any, Iterator

import numpy as np
import torch

from icm.codecs.ugicm import UGICM
from icm.data.records import decode_rgb, load_record
from icm.data.writers import decode_png
from compressai.losses import RateDistortionLoss

from icm.losses import ClipDistance, UGICMLoss
from icm.train.session import Session
from icm.zoo import build_clip, build_codec


def crop_pair(image: np.ndarray, target: np.ndarray, boxes: np.ndarray, size: int,
              rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One random ``size`` crop and horizontal flip, the same for the image, its machine target
    and its boxes (TRAPS.md: a crop applied to an image must be applied to its MAA target).
    Images smaller than the crop are padded by edge replication."""
    if image.shape != target.shape:
        raise ValueError(f"image {image.shape} and machine target {target.shape} differ in size")
    h, w = image.shape[:2]
    pad = ((0, max(0, size - h)), (0, max(0, size - w)), (0, 0))
    if any(p[1] for p in pad[:2]):
        image, target = np.pad(image, pad, mode="edge"), np.pad(target, pad, mode="edge")
        h, w = image.shape[:2]
    top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    x = image[top:top + size, left:left + size]
    t = target[top:top + size, left:left + size]
    b = np.asarray(boxes, np.float32).reshape(-1, 4) - np.array([left, top, left, top], np.float32)
    b = b.clip(0, size)
    b = b[(b[:, 2] - b[:, 0] >= 2) & (b[:, 3] - b[:, 1] >= 2)]
    if rng.random() < 0.5:
        x, t = x[:, ::-1], t[:, ::-1]
        b = np.stack([size - b[:, 2], b[:, 1], size - b[:, 0], b[:, 3]], 1) if len(b) else b
    return {"x": np.ascontiguousarray(x), "target": np.ascontiguousarray(t),
            "boxes": b.reshape(-1).astype(np.float32)}


# The Ray Data step of the training input (it lives here, not in the driver, because Ray workers
# must import it).
def read_target(path: str) -> np.ndarray:
    """A machine target image (an MAA output) from a local path or an object-store URI."""
    if "://" in path:
        import pyarrow.fs as pafs

        fs, key = pafs.FileSystem.from_uri(path)
        with fs.open_input_stream(key) as f:
            return decode_png(f.read())
    return decode_rgb(path)[0]


def decode_and_crop(batch: dict[str, np.ndarray], size: int, targets: dict[str, str],
                    min_side: int = 1) -> dict[str, np.ndarray]:
    """A Ray Data batch of image references → one fresh random crop + flip of each decodable image,
    the same crop of its machine target (its MAA image, else itself) and of its boxes. Decoding
    happens here, every epoch, so the training set is streamed, never held in memory."""
    rng = np.random.default_rng()
    crops = []
    for ref_json in batch["ref_json"]:
        record = load_record(json.loads(str(ref_json)), min_side=min_side)
        if record["status"] != "ok":
            continue
        path = targets.get(record["source_id"])
        target = read_target(path) if path else record["image"]
        if target.shape != record["image"].shape:
            raise ValueError(f"MAA target {path} is {target.shape}, its source {record['source_id']} "
                             f"{record['image'].shape}: the MAA job ran on other images")
        crops.append(crop_pair(record["image"], target, record["boxes"], size, rng))
    if not crops:
        return {"x": np.zeros((0, size, size, 3), np.uint8), "target": np.zeros((0, size, size, 3), np.uint8),
                "boxes": np.zeros((0,), object)}
    boxes = np.empty(len(crops), object)
    boxes[:] = [c["boxes"] for c in crops]
    return {"x": np.stack([c["x"] for c in crops]), "target": np.stack([c["target"] for c in crops]),
            "boxes": boxes}


def upload_tensorboard(local_dir: str, uri: str) -> None:
    """Copy the local TensorBoard logs to the job's out_dir in object storage."""
    from icm.data.storage import Storage, parent_location

    Storage(parent_location(uri)).upload_dir(local_dir, uri.rstrip("/").rsplit("/", 1)[-1])


def batches(rows: Iterator[dict], batch_size: int) -> Iterator[list[dict]]:
    batch = []
    for row in rows:
        batch.append(row)
        if len(batch) == batch_size:
            yield batch
            batch = []


def to_tensors(batch: list[dict], device) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    def stack(key):
        return torch.from_numpy(np.stack([np.asarray(r[key]) for r in batch])).permute(0, 3, 1, 2).float().div(255)
    boxes = [torch.as_tensor(np.asarray(r["boxes"], np.float32)).reshape(-1, 4).to(device) for r in batch]
    return stack("x").to(device), stack("target").to(device), boxes


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


def train_codec_loop(config: dict[str, Any], session: Session) -> torch.nn.Module:
    """config: codec (zoo spec: name, quality, weights, channels, ...), steps, batch_size, lr,
    aux_lr, clip_max_norm (gradient clipping of the main parameters, default 1.0 as CompressAI's
    example and the UG-ICM authors; 0 turns it off), lr_schedule (``LearningRateSchedule``), loss
    (``rd``: lmbda | ``ugicm``: stage, lmbda, lmbda_machine, lmbda_clip, clip {name, weights}),
    checkpoint_every, log_every, seed, threads, tensorboard_dir. Returns the trained (unwrapped)
    model. A resumed run continues at the saved step, epoch and batch with the saved optimiser and
    schedule, so with a deterministic record order it equals an uninterrupted run."""
    seed = int(config.get("seed", 0))
    torch.manual_seed(seed)
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    model = build_training_codec(config).to(session.device)
    loss_cfg = config.get("loss", {"type": "rd"})
    conditional = isinstance(model, UGICM)
    if conditional != (loss_cfg["type"] == "ugicm"):
        raise ValueError(f"loss {loss_cfg['type']!r} does not fit codec {config['codec']['name']!r}: "
                         "ugicm:<arch> codecs train with the ugicm loss, plain codecs with rd")
    stage = int(loss_cfg.get("stage", 1))
    if stage >= 2:  # stage 2/3: only the synthesis transform, its blocks and the condition MLP train
        model.requires_grad_(False)
        for p in model.decoder_parameters():
            p.requires_grad_(True)
    main_params, aux_params = split_parameters(model)
    opt = torch.optim.Adam(main_params, lr=float(config.get("lr", 1e-4)))
    aux_opt = torch.optim.Adam(aux_params, lr=float(config.get("aux_lr", 1e-3))) if aux_params else None
    schedule = LearningRateSchedule(opt, config.get("lr_schedule"))
    clip_max_norm = float(config.get("clip_max_norm", 1.0))
    step, epoch, skip = 0, 0, 0
    state = session.restore()
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if aux_opt is not None:
            aux_opt.load_state_dict(state["aux_optimizer"])
        schedule.load_state_dict(state.get("lr_schedule", {}))
        step, epoch, skip = int(state["step"]), int(state["epoch"]), int(state["batch"])
    net = session.prepare(model)
    if conditional:
        clip = None
        if float(loss_cfg.get("lmbda_clip", 0)) > 0:
            clip_cfg = loss_cfg.get("clip") or {}
            clip = ClipDistance(build_clip(clip_cfg.get("name", "ViT-B-32"), clip_cfg.get("weights", "random"))
                                ).to(session.device)
        criterion = UGICMLoss(float(loss_cfg.get("lmbda", 0.0022)), float(loss_cfg.get("lmbda_machine", 0.0011)),
                              float(loss_cfg.get("lmbda_clip", 0)), clip, instance=stage >= 3)
    else:
        criterion = RateDistortionLoss(lmbda=float(loss_cfg.get("lmbda", 0.0130)))  # CompressAI's: λ·255²·MSE + bpp
    writer = None
    if session.rank == 0 and config.get("tensorboard_dir"):
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(config["tensorboard_dir"])
    steps, batch_size = int(config["steps"]), int(config.get("batch_size", 8))
    every, log_every = int(config.get("checkpoint_every", 100)), int(config.get("log_every", 10))
    started, window = time.time(), []
    while step < steps:
        seen = False
        for index, batch in enumerate(batches(session.records("train", epoch), batch_size)):
            seen = True
            if index < skip:  # resuming inside an epoch: these batches were trained on already
                continue
            x, target, boxes = to_tensors(batch, session.device)
            # The quantisation noise and β come from the global RNG, seeded per step and rank so a
            # resumed run draws what the uninterrupted one would have.
            torch.manual_seed(seed * 1_000_003 + step * 101 + session.rank)
            if conditional and stage >= 3:  # every sample decoded both ways from its one latent
                beta = torch.cat([torch.zeros(len(batch)), torch.ones(len(batch))]).to(session.device)
                terms = criterion(net(x, UGICM.BOTH), x, target, beta, boxes)
            elif conditional:
                beta = (torch.rand(len(batch)) < 0.5).float().to(session.device)
                terms = criterion(net(x, beta), x, target, beta, boxes)
            else:
                terms = criterion(net(x), x)
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
            schedule.step(step, float(terms["loss"].detach()))
            window.append({k: float(v.detach()) for k, v in terms.items()}
                          | {"aux_loss": float(aux.detach()), "lr": lr})
            last = step >= steps
            if step % log_every == 0 or step % every == 0 or last:
                metrics = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
                mse_key = "mse_human" if conditional else "mse_loss"
                metrics |= {"step": step, "epoch": epoch, "samples_per_s": len(window) * batch_size * session.world_size
                            / max(time.time() - started, 1e-9)}
                if metrics[mse_key] > 0:
                    metrics["psnr"] = float(10 * np.log10(1.0 / metrics[mse_key]))
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
                                         "step": step, "epoch": epoch, "batch": index + 1} if save else None)
                window, started = [], time.time()
            if last:
                break
        if not seen:
            raise RuntimeError("the training split yielded no batch: fewer images than batch_size?")
        if step < steps:
            epoch, skip = epoch + 1, 0
    if writer is not None:
        writer.close()
    return model
