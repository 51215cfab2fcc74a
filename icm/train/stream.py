"""The training stream: which rows each train worker sees, and in which order, as a function of
(seed, epoch) alone — so a resumed or restarted run sees exactly what the uninterrupted one saw.

A ``Stream`` is a list of light ``items`` in a fixed order (image references, pair references,
unit shards), an optional ``expand`` (an item → its raw rows: a shard → its pairs, an image →
its object crops) and a ``decode`` (a raw row → a training row, or None for bad input). Epoch
``e`` of a run with ``W`` workers:

1. the items are permuted by ``rng(seed, e)`` and shared out: dealt in turn (worker ``r`` takes
   ``r::W``), or — where the items' row counts (``sizes``) are known — cut into ``W`` spans of
   equal row count, as MosaicML streaming partitions samples over ranks;
2. each worker cuts its share into windows of ``window`` consecutive items;
3. inside a window the raw rows of its items are permuted by ``rng(seed, e, worker, window)``
   (MosaicML's shuffle of samples within a block of shards; with ``window: 1`` and one row per
   item, step 1 alone is a full row-level shuffle);
4. each raw row is decoded — through Ray Data on the cluster's CPUs, order preserved
   (``icm.train.ray_trainer``), or in the process itself (``LocalSession``, ``in_process``).

A worker's position in an epoch is ``(window, raw rows of it consumed)``. Checkpoints carry every
worker's position; a resumed worker starts there and skips what was consumed without decoding it
— the deterministic mid-epoch resumption of torchdata's ``StatefulDataLoader`` and MosaicML
streaming, written here on Ray Data. Random augmentation draws from ``row_rng(seed, epoch, key)``:
a function of the row, not of the worker, the position or the time it is decoded at.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np


@dataclass(frozen=True)
class Stream:
    """``items``: picklable, in a fixed order (sorted by id: the order is part of the run).
    ``expand(item, epoch)`` → raw rows (default: the item is its one raw row). ``decode(raw,
    epoch)`` → the training row, or None to drop it (default: the raw row itself).
    ``shuffle: False`` keeps the items' and rows' own order every epoch (replays, debugging).
    ``num_cpus``: per Ray Data task. ``in_process``: read in the train worker itself, without
    Ray Data (small sets, where tasks would cost more than the decoding). ``sizes``: each item's
    raw row count, where items expand to many rows of known number (``worker_windows``)."""

    items: Sequence[Any]
    expand: Callable[[Any, int], Sequence[Any]] | None = None
    decode: Callable[[Any, int], Any] | None = None
    seed: int = 0
    shuffle: bool = True
    window: int = 1
    num_cpus: float = 1
    in_process: bool = False
    sizes: Sequence[int] | None = None


def row_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """The random generator of one row in one epoch (crops, flips, jitter)."""
    digest = int.from_bytes(hashlib.sha256(str(key).encode()).digest()[:8], "little")
    return np.random.default_rng([int(seed), int(epoch), digest])


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of one optimiser step on one worker (quantisation noise, dropout, detector
    samplers): a resumed run draws what the uninterrupted one drew at that step."""
    return int(seed) * 1_000_003 + int(step) * 101 + int(rank)


def worker_windows(stream: Stream, epoch: int, rank: int, world_size: int) -> list[list[tuple[int, int, int | None]]]:
    """This worker's windows of epoch ``epoch``, each a list of parts ``(item index, first raw
    row, end raw row or None for all)``. Without ``sizes`` the permuted items are dealt in turn
    (worker ``r`` takes ``r::world_size``); with them the epoch's rows are cut into ``world_size``
    equal spans and each worker takes the items of its span — so a few large items (unit shards)
    still give every worker the same number of rows, and each item is read by at most the two
    workers whose spans it straddles."""
    n = len(stream.items)
    order = np.random.default_rng([int(stream.seed), int(epoch)]).permutation(n) if stream.shuffle else np.arange(n)
    if stream.sizes is None:
        parts = [(int(i), 0, None) for i in order[rank::world_size]]
    else:
        sizes = np.asarray(stream.sizes, np.int64)[order]
        ends = np.cumsum(sizes)
        total = int(ends[-1]) if n else 0
        lo, hi = total * rank // world_size, total * (rank + 1) // world_size
        parts = [(int(i), int(max(lo - (e - z), 0)), int(min(hi, e) - (e - z)))
                 for i, z, e in zip(order, sizes, ends) if z and e - z < hi and e > lo]
    window = max(1, int(stream.window))
    return [parts[j:j + window] for j in range(0, len(parts), window)]


def window_rows(stream: Stream, parts: Sequence[tuple[Any, int, int | None, int | None]], key: tuple[int, int],
                epoch: int, skip: int = 0) -> Iterator[tuple[int, Any]]:
    """``(k, row)`` for the raw rows ``k ≥ skip`` of one window that decode to a row; rows before
    ``skip`` are neither decoded nor returned. ``parts``: ``(item, first, end, size)``, ``size``
    the item's expected raw row count (checked) or None; ``key``: (worker, window), which seeds
    the window's shuffle."""
    raw = []
    for item, first, end, size in parts:
        rows = stream.expand(item, epoch) if stream.expand else (item,)
        if size is not None and len(rows) != size:
            raise ValueError(f"stream item {item!r} expands to {len(rows)} rows where its listed size is {size}: the "
                             "data changed since the stream was built; start the training job again")
        raw.extend(rows[first:end])
    if stream.shuffle and len(raw) > 1:
        raw = [raw[i] for i in np.random.default_rng([int(stream.seed), int(epoch), *key]).permutation(len(raw))]
    for k in range(skip, len(raw)):
        row = stream.decode(raw[k], epoch) if stream.decode else raw[k]
        if row is not None:
            yield k, row


def window_parts(stream: Stream, window: list[tuple[int, int, int | None]]) -> list[tuple[Any, int, int | None, int | None]]:
    """A window's parts with their items (what ``window_rows`` takes)."""
    return [(stream.items[i], first, end, None if stream.sizes is None else int(stream.sizes[i]))
            for i, first, end in window]


def local_rows(stream: Stream, epoch: int, rank: int, world_size: int, start: tuple[int, int] = (0, 0)
               ) -> Iterator[tuple[int, int, Any]]:
    """``(w, k, row)`` of this worker's epoch from position ``start``, read in this process."""
    windows = worker_windows(stream, epoch, rank, world_size)
    for w in range(start[0], len(windows)):
        for k, row in window_rows(stream, window_parts(stream, windows[w]), (rank, w), epoch,
                                  start[1] if w == start[0] else 0):
            yield w, k, row


class WindowRows:
    """The Ray Data task of a stream (``icm.train.ray_trainer.ray_data_rows``): windows ``{parts,
    rank, w, skip}`` → their decoded rows ``{w, k, row}`` (pickled: any dict of arrays, ragged boxes
    or bytes crosses unchanged), emitted as they are decoded. It lives here, Ray-free, so the
    tasks import only this module and the stream's decode."""

    def __init__(self, stream: Stream, epoch: int, rows_per_batch: int = 16):
        self.stream, self.epoch, self.rows_per_batch = stream, epoch, rows_per_batch

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        out: list[tuple[int, int, bytes]] = []
        for payload, rank, w, skip in zip(batch["parts"], batch["rank"], batch["w"], batch["skip"]):
            for k, row in window_rows(self.stream, pickle.loads(payload), (int(rank), int(w)), self.epoch, int(skip)):
                out.append((int(w), k, pickle.dumps(row, protocol=5)))
                if len(out) == self.rows_per_batch:
                    yield self._columns(out)
                    out = []
        if out:
            yield self._columns(out)

    @staticmethod
    def _columns(rows):
        column = np.empty(len(rows), object)
        column[:] = [r[2] for r in rows]
        return {"w": np.array([r[0] for r in rows], np.int64), "k": np.array([r[1] for r in rows], np.int64),
                "row": column}
