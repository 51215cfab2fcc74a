"""The per-unit stage every data-generation job builds on (no Ray here: Ray calls it).

A job cuts the images that have no manifest row yet into work units
(``icm.data.ray_io.work_units``). A stage is a callable class, built once per worker (models load
in ``__init__``), that turns one unit into output files plus manifest rows and writes the unit's
manifest shard last, so an image with a row is done. A bad image is a final ``status="error"``
row. A failure of the unit as a whole (CUDA out of memory, a lost filesystem) is retried
``unit_retries`` times in place; if it persists, the unit writes no shard and is reported as
failed, so the next run of the job retries its images.

Compute and I/O overlap when Ray Data runs two calls of one actor at once (``overlap_io``
stages on a GPU, ``icm.data.ray_io.run_units``): ``prepare_unit`` (decoding) and the writes a
unit queued with ``write_later`` (PNG encoding, uploads, then the shard) run outside the stage's
compute lock, ``process_unit`` inside it, so one unit decodes and writes while the other computes.
Whatever ``process_unit`` reads or sets on ``self`` is therefore only touched under the lock.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
import traceback
from typing import Any, Callable

import numpy as np

from icm.data.manifest import ManifestStore, manifest_row
from icm.data.ray_io import check_worker_code_origin
from icm.data.storage import join_location

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def output_relpath(source_id: str, suffix: str = ".png", prefix: str = "images") -> str:
    """A safe relative output path, unique per ``source_id``, that never escapes the output dir.

    The id's own name is kept whole (``img.jpg`` → ``img.jpg.png``, so ``img.jpg`` and ``img.png``
    stay apart); when making it safe changed anything (``a b.png`` → ``a_b.png``), a hash of the
    id is appended, so ``a b.png`` and ``a_b.png`` stay apart too."""
    parts = ["_" if p == ".." else (_UNSAFE.sub("_", p) or "_") for p in source_id.split("/") if p not in ("", ".")]
    stem = "/".join(parts) or "_"
    if stem != source_id:
        stem += "-" + hashlib.sha1(source_id.encode()).hexdigest()[:10]
    return f"{prefix}/{stem}{suffix}"


class UnitStage:
    """Subclasses implement ``process_unit(refs) -> list of manifest rows``; stages that set
    ``overlap_io`` also move decoding into ``prepare_unit`` and writes into ``write_later``."""

    extra_schema = None
    overlap_io = False   # True: two calls of one GPU actor may run at once (decode/write beside compute)

    def __init__(self, out_dir: str, params: dict[str, Any], models: list[dict] | None = None,
                 seed: int = 0, unit_retries: int = 1):
        check_worker_code_origin()   # an actor on a node that joined after the driver's check
        self.store = ManifestStore(out_dir, self.extra_schema)
        self.storage = self.store.storage     # outputs go here: a local directory or a URI
        self.params = params
        self.models = models or []
        self.seed = seed
        self.unit_retries = unit_retries
        self.failure = ""
        self.runtime: dict | str = getattr(self, "runtime", "")   # set by stages that compute with torch
        self.prepared: Any = None             # prepare_unit's result, while process_unit runs
        self._compute = threading.Lock()
        self._writes: list[Callable[[], Any]] = []

    def row(self, ref: dict, *, status: str, started_at: float, output_path: str = "",
            error: str = "", seed: int | None = None, **extra) -> dict[str, Any]:
        return manifest_row(source_id=ref["source_id"], source_path=join_location(ref.get("root", ""), ref.get("path", "")),
                            output_path=output_path, status=status, error=error,
                            params=self.params, models=self.models,
                            seed=self.seed if seed is None else seed, started_at=started_at,
                            duration_s=time.time() - started_at, runtime=self.runtime, **extra)

    def prepare_unit(self, unit: dict) -> Any:
        """CPU work for ``unit`` that needs none of the stage's models (decoding), run outside
        the compute lock; ``process_unit`` finds its result in ``self.prepared``."""
        return None

    def process_unit(self, refs: list[dict]) -> list[dict[str, Any]]:
        raise NotImplementedError

    def write_later(self, write: Callable[[], Any]) -> None:
        """Queue one write of the unit ``process_unit`` is running (a closure over the bytes or
        table to write, never over ``self``'s per-unit state); it runs after ``process_unit``,
        outside the compute lock, before the unit's shard."""
        self._writes.append(write)

    def run_unit(self, unit: dict) -> list[dict[str, Any]] | None:
        """The unit's rows, or None when the unit failed as a whole ``1 + unit_retries`` times
        (``self.failure`` then says why); only a finished unit writes its shard."""
        rows, self.failure = self._run_unit(unit)
        return rows

    def _run_unit(self, unit: dict) -> tuple[list[dict[str, Any]] | None, str]:
        failure = ""
        for attempt in range(1 + self.unit_retries):
            try:
                prepared = self.prepare_unit(unit)
                with self._compute:
                    self.unit_id, self.prepared, self._writes = unit["unit_id"], prepared, []
                    try:
                        rows = self.process_unit(unit["refs"])
                    finally:
                        writes, self.prepared, self._writes = self._writes, None, []
                for write in writes:
                    write()
                self.store.write_unit(unit["unit_id"], rows)
                return rows, ""
            except Exception as exc:  # noqa: BLE001 - the unit is retried, then reported; the job goes on
                failure = f"{type(exc).__name__}: {exc}"
                print(f"[icm] unit {unit['unit_id']} failed (attempt {attempt + 1} of {1 + self.unit_retries}): "
                      f"{failure}", flush=True)
                traceback.print_exc()
        return None, failure

    def error_row(self, ref: dict, reason: str, started_at: float) -> dict[str, Any]:
        """An error row; subclasses with extra columns fill them with empty values."""
        return self.row(ref, status="error", error=reason, started_at=started_at)

    def load_unit(self, batch: dict[str, np.ndarray], i: int) -> dict:
        """Unit ``i`` of a Ray batch; stages fed by an earlier stage also take its output here
        (into the returned unit: two calls may be loading at once)."""
        return json.loads(str(batch["unit_json"][i]))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        unit_ids, rows_json, failures = [], [], []
        for i in range(len(batch["unit_json"])):
            unit = self.load_unit(batch, i)
            rows, failure = self._run_unit(unit)
            unit_ids.append(unit["unit_id"])
            rows_json.append(json.dumps(rows or [], default=_json_default))
            failures.append(failure)
        return {"unit_id": np.array(unit_ids), "rows_json": np.array(rows_json), "failure": np.array(failures)}


def _json_default(obj):
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
