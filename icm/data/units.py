"""The per-unit stage every data-generation job builds on (no Ray here: Ray calls it).

A job cuts the images that have no manifest row yet into work units
(``icm.data.ray_io.work_units``). A stage is a callable class, built once per worker (models load
in ``__init__``), that turns one unit into output files plus manifest rows and writes the unit's
manifest shard last, so an image with a row is done. A bad image is a final ``status="error"``
row. A failure of the unit as a whole (CUDA out of memory, a lost filesystem) is retried
``unit_retries`` times in place; if it persists, the unit writes no shard and is reported as
failed, so the next run of the job retries its images.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import traceback
from typing import Any

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
    """Subclasses implement ``process_unit(refs) -> list of manifest rows``."""

    extra_schema = None

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

    def row(self, ref: dict, *, status: str, started_at: float, output_path: str = "",
            error: str = "", seed: int | None = None, **extra) -> dict[str, Any]:
        return manifest_row(source_id=ref["source_id"], source_path=join_location(ref.get("root", ""), ref.get("path", "")),
                            output_path=output_path, status=status, error=error,
                            params=self.params, models=self.models,
                            seed=self.seed if seed is None else seed, started_at=started_at,
                            duration_s=time.time() - started_at, runtime=self.runtime, **extra)

    def process_unit(self, refs: list[dict]) -> list[dict[str, Any]]:
        raise NotImplementedError

    def run_unit(self, unit: dict) -> list[dict[str, Any]] | None:
        """The unit's rows, or None when the unit failed as a whole ``1 + unit_retries`` times
        (``self.failure`` then says why); only a finished unit writes its shard."""
        self.unit_id = unit["unit_id"]
        self.failure = ""
        for attempt in range(1 + self.unit_retries):
            try:
                rows = self.process_unit(unit["refs"])
            except Exception as exc:  # noqa: BLE001 - the unit is retried, then reported; the job goes on
                self.failure = f"{type(exc).__name__}: {exc}"
                print(f"[icm] unit {self.unit_id} failed (attempt {attempt + 1} of {1 + self.unit_retries}): "
                      f"{self.failure}", flush=True)
                traceback.print_exc()
                continue
            self.store.write_unit(unit["unit_id"], rows)
            self.failure = ""
            return rows
        return None

    def error_row(self, ref: dict, reason: str, started_at: float) -> dict[str, Any]:
        """An error row; subclasses with extra columns fill them with empty values."""
        return self.row(ref, status="error", error=reason, started_at=started_at)

    def load_unit(self, batch: dict[str, np.ndarray], i: int) -> dict:
        """Unit ``i`` of a Ray batch; stages fed by an earlier stage also take its output here."""
        return json.loads(str(batch["unit_json"][i]))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        unit_ids, rows_json, failures = [], [], []
        for i in range(len(batch["unit_json"])):
            unit = self.load_unit(batch, i)
            rows = self.run_unit(unit)
            unit_ids.append(unit["unit_id"])
            rows_json.append(json.dumps(rows or [], default=_json_default))
            failures.append(self.failure)
        return {"unit_id": np.array(unit_ids), "rows_json": np.array(rows_json), "failure": np.array(failures)}


def _json_default(obj):
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
