"""What a training loop needs from its runner, so loops stay Ray-free and unit-testable.

``pipelines/train_harness.py`` implements it on Ray Train (DDP, checkpoints, resume);
``LocalSession`` implements it in-process for tests and single-machine debugging.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch


class Session(Protocol):
    rank: int
    world_size: int
    device: torch.device

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


class LocalSession:
    """One process, records from in-memory lists, checkpoints under ``checkpoint_dir``."""

    rank = 0
    world_size = 1

    def __init__(self, datasets: dict[str, list[dict]], checkpoint_dir: str | Path,
                 device: str | torch.device = "cpu", progress: Callable[[int, int], None] | None = None):
        self.datasets = datasets
        self.checkpoint_dir = Path(checkpoint_dir)
        self.device = torch.device(device)
        self.reports: list[dict[str, float]] = []
        self._progress = progress

    def progress(self, done: int, total: int) -> None:
        if self._progress is not None:
            self._progress(done, total)

    def records(self, split: str, epoch: int) -> Iterator[dict]:
        yield from self.datasets[split]

    def prepare(self, module):
        return module.to(self.device)

    def report(self, metrics, state=None):
        self.reports.append(dict(metrics))
        if state is not None:
            save_state(state, self.checkpoint_dir)

    def restore(self):
        return load_state(self.checkpoint_dir) if (self.checkpoint_dir / "state.pt").is_file() else None
