"""The OW-JRD predictor's per-worker training loop (Ray-free; ``icm.train.ray_trainer.fit`` runs it
on Ray Train): cross-entropy over (original, distorted) pairs with the authors' optimiser — SGD,
lr 0.01, momentum 0.9, weight decay 1e-4 — and cosine decay to 1 % of the lr over ``steps``;
only the fusion head trains (the backbone is frozen). Records: ``{"original", "distorted"}``
(canvas² × 3 uint8) and ``label`` (0 recognised, 1 not)."""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from icm.data.storage import Storage
from icm.jrd.predictor import build_predictor, decode_pair, pairs_from_export, pairs_from_run_unit, unit_shards
from icm.train.session import Session
from icm.train.stream import Stream, step_seed


def pair_tensors(batch: list[dict], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    def stack(key):
        return torch.from_numpy(np.stack([np.asarray(r[key]) for r in batch])).permute(0, 3, 1, 2).float().div(255)
    labels = torch.as_tensor([int(r["label"]) for r in batch], dtype=torch.int64)
    return stack("original").to(device), stack("distorted").to(device), labels.to(device)


def train_jrd_loop(config: dict[str, Any], session: Session) -> torch.nn.Module:
    """config: canvas, backbone_weights, steps, batch_size, lr, momentum, weight_decay,
    checkpoint_every, log_every, seed, threads."""
    seed = int(config.get("seed", 0))
    torch.manual_seed(seed)
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    model = build_predictor(config.get("backbone_weights", "random"), int(config.get("canvas", 640))).to(session.device)
    params = [p for p in model.parameters() if p.requires_grad]
    lr, steps = float(config.get("lr", 0.01)), int(config["steps"])
    opt = torch.optim.SGD(params, lr=lr, momentum=float(config.get("momentum", 0.9)),
                          weight_decay=float(config.get("weight_decay", 1e-4)))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=0.01 * lr)
    step, epoch = 0, 0
    state = session.restore()
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        step, epoch = int(state["step"]), int(state["epoch"])
    net = session.prepare(model)
    batch_size = int(config.get("batch_size", 64))
    every, log_every = int(config.get("checkpoint_every", 200)), int(config.get("log_every", 20))
    window, started = [], time.time()
    while step < steps:
        # shuffled pairs (the stream's order is a function of seed and epoch), from the
        # checkpoint's position when resuming inside this epoch
        for batch in session.batches("train", epoch, batch_size):
            original, distorted, labels = pair_tensors(batch, session.device)
            torch.manual_seed(step_seed(seed, step, session.rank))   # the head's dropout
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
                                         "schedule": schedule.state_dict(), "step": step, "epoch": epoch}
                               if save else None)
                window, started = [], time.time()
            if last:
                break
        if step < steps:
            epoch += 1
    return model


def pair_row(ref: dict, epoch: int, canvas: int) -> dict:
    """The predictor stream's decode: a pair reference (the export's paths or a parquet run's
    inline PNG bytes) → its padded crops, label, and the keys that identify it."""
    return {"label": int(ref["label"]), "name": ref["name"], "level": int(ref["level"]), **decode_pair(ref, canvas)}


@torch.no_grad()
def predict_pairs(model: torch.nn.Module, rows: list[dict], batch_size: int = 64, device="cpu") -> list[int]:
    """Predicted labels (0 recognised, 1 not) of decoded pairs."""
    model.eval().to(device)
    out = []
    for i in range(0, len(rows), batch_size):
        original, distorted, _ = pair_tensors(rows[i:i + batch_size], device)
        out += model(original, distorted).argmax(1).tolist()
    return out


def pair_stream(source: dict, split: str, canvas: int, split_of: dict[str, str] | None, data: dict | None = None,
                seed: int = 0) -> Stream:
    """The predictor's training stream, shuffled at the row level each epoch as a function of
    (seed, epoch) — the authors train with ``DataLoader(shuffle=True)``; stored order would put one
    image's objects over consecutive levels, labels nearly all 0 or all 1, in each batch.

    * ``export_dir`` (the authors' layout): one item per pair, so the epoch's permutation is a full
      shuffle of the split's pairs.
    * ``run_dir`` (the JRD job's parquet shards, the pairs' PNG bytes inline): one item per unit
      shard; each epoch the shards are permuted, the epoch's pairs cut into equal spans, one per
      worker (by the shards' pair counts), and the pairs of every ``data.shuffle_window``
      consecutive shards of a span (default 8) shuffled together, MosaicML-style — a shard is read
      about once per epoch, and a batch mixes the images of that many units, their objects and
      levels."""
    data = data or {}
    decode = partial(pair_row, canvas=canvas)
    cpus = float(data.get("num_cpus", 1))
    if source.get("export_dir"):
        return Stream(items=pairs_from_export(source["export_dir"], split), decode=decode, seed=seed, num_cpus=cpus)
    shards = unit_shards(source["run_dir"])
    return Stream(items=shards, decode=decode, seed=seed, num_cpus=cpus,
                  expand=partial(shard_pairs, run_dir=source["run_dir"], ladder=source["ladder"], split=split,
                                 split_of=split_of), window=int(data.get("shuffle_window", 8)),
                  sizes=[shard_size(source["run_dir"], s, source["ladder"], split, split_of) for s in shards])


def shard_pairs(shard: str, epoch: int, run_dir: str, ladder: str, split: str, split_of: dict[str, str]) -> list[dict]:
    """The stream's expand for a parquet run: one unit shard → its pairs of ``split``."""
    return list(pairs_from_run_unit(run_dir, shard, ladder, split, split_of))


def shard_size(run_dir: str, shard: str, ladder: str, split: str, split_of: dict[str, str]) -> int:
    """How many pairs ``shard_pairs`` gives, from the shard's object rows alone (no crop read):
    the stream shares the epoch's pairs out equally by it."""
    objects = Storage(run_dir).read_table(f"objects/{shard}", ["source_id", "ladder", "recognised_pristine", "levels"])
    return sum(int(o["levels"]) for o in objects.to_pylist()
               if o["ladder"] == ladder and o["recognised_pristine"] and split_of.get(o["source_id"]) == split)
