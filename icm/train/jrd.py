"""The OW-JRD predictor's per-worker training loop (Ray-free; ``icm.train.ray_trainer.fit`` runs it
on Ray Train): cross-entropy over (original, distorted) pairs with the authors' optimiser — SGD,
lr 0.01, momentum 0.9, weight decay 1e-4 — and cosine decay to 1 % of the lr over ``steps``;
only the fusion head trains (the backbone is frozen). Records: ``{"original", "distorted"}``
(canvas² × 3 uint8) and ``label`` (0 recognised, 1 not)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from icm.jrd.predictor import build_predictor
from icm.train.codec import batches
from icm.train.session import Session


def pair_tensors(batch: list[dict], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    def stack(key):
        return torch.from_numpy(np.stack([np.asarray(r[key]) for r in batch])).permute(0, 3, 1, 2).float().div(255)
    labels = torch.as_tensor([int(r["label"]) for r in batch], dtype=torch.int64)
    return stack("original").to(device), stack("distorted").to(device), labels.to(device)


def train_jrd_loop(config: dict[str, Any], session: Session) -> torch.nn.Module:
    """config: canvas, backbone_weights, steps, batch_size, lr, momentum, weight_decay,
    checkpoint_every, log_every, seed, threads."""
    torch.manual_seed(int(config.get("seed", 0)))
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    model = build_predictor(config.get("backbone_weights", "random"), int(config.get("canvas", 640))).to(session.device)
    params = [p for p in model.parameters() if p.requires_grad]
    lr, steps = float(config.get("lr", 0.01)), int(config["steps"])
    opt = torch.optim.SGD(params, lr=lr, momentum=float(config.get("momentum", 0.9)),
                          weight_decay=float(config.get("weight_decay", 1e-4)))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=0.01 * lr)
    step, epoch, skip = 0, 0, 0
    state = session.restore()
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        step, epoch, skip = int(state["step"]), int(state["epoch"]), int(state["batch"])
    net = session.prepare(model)
    batch_size = int(config.get("batch_size", 64))
    every, log_every = int(config.get("checkpoint_every", 200)), int(config.get("log_every", 20))
    window, started = [], time.time()
    while step < steps:
        seen = False
        for index, batch in enumerate(batches(session.records("train", epoch), batch_size)):
            seen = True
            if index < skip:
                continue
            original, distorted, labels = pair_tensors(batch, session.device)
            net.train()
            logits = net(original, distorted)
            loss = F.cross_entropy(logits, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            step += 1
            session.progress(step, steps)
            window.append({"loss": float(loss.detach()),
                           "accuracy": float((logits.argmax(1) == labels).float().mean())})
            last = step >= steps
            if step % log_every == 0 or step % every == 0 or last:
                metrics = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
                metrics |= {"step": step, "epoch": epoch, "lr": opt.param_groups[0]["lr"],
                            "pairs_per_s": len(window) * batch_size * session.world_size / max(time.time() - started, 1e-9)}
                save = session.rank == 0 and (step % every == 0 or last)
                session.report(metrics, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                         "schedule": schedule.state_dict(), "step": step, "epoch": epoch,
                                         "batch": index + 1} if save else None)
                window, started = [], time.time()
            if last:
                break
        if not seen:
            raise RuntimeError("the training split yielded no batch: fewer pairs than batch_size?")
        if step < steps:
            epoch, skip = epoch + 1, 0
    return model


@torch.no_grad()
def predict_pairs(model: torch.nn.Module, rows: list[dict], batch_size: int = 64, device="cpu") -> list[int]:
    """Predicted labels (0 recognised, 1 not) of decoded pairs."""
    model.eval().to(device)
    out = []
    for i in range(0, len(rows), batch_size):
        original, distorted, _ = pair_tensors(rows[i:i + batch_size], device)
        out += model(original, distorted).argmax(1).tolist()
    return out
