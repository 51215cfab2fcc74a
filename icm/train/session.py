"""What a training loop needs from its runner, so loops stay Ray-free and unit-testable.

``icm.train.ray_trainer.RayTrainSession`` implements it on Ray Train (DDP, checkpoints, resume);
``LocalSession`` implements it in-process for tests, single-machine runs and debugging. Both read
the same ``Stream`` (``icm.train.stream``) and keep its position in every checkpoint, so a run
resumed anywhere — inside an epoch too — continues with the rows the uninterrupted run would have
seen next.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch

from icm.train.stream import Stream, local_rows


class Session(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def batches(self, split: str, epoch: int, batch_size: int) -> Iterator[list[dict]]: ...

    def records(self, split: str, epoch: int) -> Iterator[dict]: ...

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module: ...

    def report(self, metrics: dict[str, float], state: dict[str, Any] | None = None) -> None: ...

    def restore(self) -> dict[str, Any] | None: ...

    def progress(self, done: int, total: int) -> None:
        """Steps done of ``total``, for the runner's progress line (called after every step)."""


def save_state(state: dict[str, Any], directory: str | Path) -> Path:
    """Checkpoint contents are tensors, numbers and strings only, so they load with weights_only."""
    path = Path(directory) / "state.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_state(directory: str | Path) -> dict[str, Any]:
    return torch.load(Path(directory) / "state.pt", map_location="cpu", weights_only=True)


class StreamSession:
    """The stream side of a session, whatever runs it: full batches from each worker's position,
    the same number on every worker (an epoch ends for all when one worker runs out, as DDP
    needs), every worker's position saved with each checkpoint and restored from it, and the
    steps the run was resumed at (``resumed_at``: provenance, in every checkpoint)."""

    rank = 0
    world_size = 1

    def __init__(self, streams: dict[str, Stream]):
        self.streams = streams
        self._at: dict[str, list[int]] = {}      # split → [epoch, window, raw rows consumed] of this worker
        self._start: dict[str, list[int]] = {}   # split → the same, restored from the checkpoint
        self._resumed_at: list[int] = []

    # what a runner provides
    def _rows(self, split: str, epoch: int, start: tuple[int, int]) -> Iterator[tuple[int, int, Any]]:
        return local_rows(self.streams[split], epoch, self.rank, self.world_size, start)

    def _all(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every worker."""
        return flag

    def _gather(self, obj: Any) -> list[Any]:
        """``obj`` of every worker, by rank."""
        return [obj]

    def _save(self, metrics: dict, state: dict | None) -> None:
        raise NotImplementedError

    def _load(self) -> dict | None:
        raise NotImplementedError

    # the Session protocol
    def records(self, split: str, epoch: int) -> Iterator[dict]:
        """This worker's rows of an epoch from its beginning (a pass that trains nothing)."""
        for _, _, row in self._rows(split, epoch, (0, 0)):
            yield row

    def batches(self, split: str, epoch: int, batch_size: int) -> Iterator[list[dict]]:
        """Full batches of this worker's rows of ``epoch``, from the restored position when the
        checkpoint was taken inside this epoch."""
        restored = self._start.pop(split, None)
        start = (restored[1], restored[2]) if restored and restored[0] == epoch else (0, 0)
        self._at[split] = [epoch, *start]
        rows = self._rows(split, epoch, start)
        yielded = 0
        while True:
            batch, last = [], None
            for w, k, row in rows:
                batch.append(row)
                last = (w, k)
                if len(batch) == batch_size:
                    break
            if not self._all(len(batch) == batch_size):
                break
            self._at[split] = [epoch, last[0], last[1] + 1]
            yielded += 1
            yield batch
        if not yielded and start == (0, 0):
            raise RuntimeError(f"the {split!r} stream yielded no batch of {batch_size} in epoch {epoch}: fewer "
                               f"usable rows than batch_size × workers ({self.world_size})?")

    def report(self, metrics: dict, state: dict | None = None) -> None:
        """Every worker calls it at the same steps (Ray Train's ``report`` is collective)."""
        positions = self._gather(dict(self._at))
        if state is not None:
            state = {**state, "resumed_at": list(self._resumed_at), "stream": {
                split: {"epoch": at[0], "world_size": self.world_size,
                        "positions": [p[split][1:] if split in p else [0, 0] for p in positions]}
                for split, at in self._at.items()}}
        self._save(metrics, state)

    def restore(self) -> dict[str, Any] | None:
        state = self._load()
        if state is None:
            return None
        self._resumed_at = [int(s) for s in state.get("resumed_at", [])] + [int(state.get("step", 0))]
        notes = []
        for split, saved in (state.get("stream") or {}).items():
            if int(saved["world_size"]) == self.world_size:
                w, k = (int(v) for v in saved["positions"][self.rank])
                self._start[split] = [int(saved["epoch"]), w, k]
                notes.append(f"{split} epoch {saved['epoch']} from window {w}, row {k}")
            else:   # another worker count cuts the epoch into other shares: that epoch starts over
                notes.append(f"{split} epoch {saved['epoch']} from its start (the checkpoint had "
                             f"{saved['world_size']} workers, this run {self.world_size})")
        if self.rank == 0:
            print(f"[icm] resuming from the checkpoint at step {state.get('step', 0)}: " + ("; ".join(notes) or
                  "no stream position"), flush=True)
        return state


class LocalSession(StreamSession):
    """One process, checkpoints under ``checkpoint_dir``. ``datasets``: per split, a ``Stream``
    or a list of ready rows (read in their order every epoch). ``progress(done, total)`` is called
    after every step and ``on_report(metrics, checkpointed)`` at every report (a console line)."""

    def __init__(self, datasets: dict[str, list[dict] | Stream], checkpoint_dir: str | Path,
                 device: str | torch.device = "cpu", progress: Callable[[int, int], None] | None = None,
                 on_report: Callable[[dict, bool], None] | None = None):
        super().__init__({k: v if isinstance(v, Stream) else Stream(items=v, shuffle=False) for k, v in datasets.items()})
        self.checkpoint_dir = Path(checkpoint_dir)
        self.device = torch.device(device)
        self.reports: list[dict[str, float]] = []
        self._progress = progress
        self._on_report = on_report

    def progress(self, done: int, total: int) -> None:
        if self._progress is not None:
            self._progress(done, total)

    def prepare(self, module):
        return module.to(self.device)

    def _save(self, metrics, state):
        self.reports.append(dict(metrics))
        if state is not None:
            save_state(state, self.checkpoint_dir)
        if self._on_report is not None:
            self._on_report(metrics, state is not None)

    def _load(self):
        return load_state(self.checkpoint_dir) if (self.checkpoint_dir / "state.pt").is_file() else None


def metrics_note(metrics: dict, checkpoint: bool) -> str:
    """A report's headline figures, as a log line or a progress line shows them."""
    shown = ", ".join(f"{k} {metrics[k]:.4g}" for k in ("loss", "bpp_loss", "psnr", "accuracy", "samples_per_s",
                                                          "pairs_per_s") if k in metrics)
    return shown + (" (checkpoint)" if checkpoint else "")


def progress_line(metrics: dict, checkpoint: bool) -> str:
    return f"[icm] step {metrics.get('step')}: {metrics_note(metrics, checkpoint)}"
