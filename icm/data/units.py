"""The per-unit stage every data-generation job builds on (no Ray here: Ray calls it).

A job cuts its inputs into fixed work units (``icm.data.ray_io.work_units``). A stage is a
callable class, built once per worker (models load in ``__init__``), that turns one unit into
output files plus manifest rows, writes the unit's manifest shard last (so a unit with a shard is
complete), and never raises for a bad image: that image's row gets ``status="error"``.
"""

from __future__ import annotations

import json
import re
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from icm.data.manifest import ManifestStore, manifest_row

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def output_relpath(source_id: str, suffix: str = ".png", prefix: str = "images") -> str:
    """A safe relative output path derived from a ``source_id`` (never escapes the output dir)."""
    parts = [(_UNSAFE.sub("_", p) or "_") for p in source_id.split("/") if p not in ("", ".", "..")]
    parts = [p if p not in (".", "..") else "_" for p in parts]
    stem = "/".join(parts) or "_"
    return f"{prefix}/{Path(stem).with_suffix('').as_posix()}{suffix}"


class UnitStage:
    """Subclasses implement ``process_unit(refs) -> list of manifest rows``."""

    extra_schema = None

    def __init__(self, out_dir: str, params: dict[str, Any], models: list[dict] | None = None,
                 seed: int = 0):
        self.store = ManifestStore(out_dir, self.extra_schema)
        self.storage = self.store.storage     # outputs go here: a local directory or a URI
        self.params = params
        self.models = models or []
        self.seed = seed

    def row(self, ref: dict, *, status: str, started_at: float, output_path: str = "",
            error: str = "", seed: int | None = None, **extra) -> dict[str, Any]:
        return manifest_row(source_id=ref["source_id"], source_path=str(Path(ref.get("root", "")) / ref.get("path", "")),
                            output_path=output_path, status=status, error=error,
                            params=self.params, models=self.models,
                            seed=self.seed if seed is None else seed, started_at=started_at,
                            duration_s=time.time() - started_at, **extra)

    def process_unit(self, refs: list[dict]) -> list[dict[str, Any]]:
        raise NotImplementedError

    def run_unit(self, unit: dict) -> list[dict[str, Any]]:
        self.unit_id = unit["unit_id"]
        started = time.time()
        try:
            rows = self.process_unit(unit["refs"])
        except Exception as exc:  # noqa: BLE001 - the unit fails as rows, the job goes on
            reason = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
            rows = [self.error_row(ref, reason, started) for ref in unit["refs"]]
        self.store.write_unit(unit["unit_id"], rows)
        return rows

    def error_row(self, ref: dict, reason: str, started_at: float) -> dict[str, Any]:
        """An error row; subclasses with extra columns fill them with empty values."""
        return self.row(ref, status="error", error=reason, started_at=started_at)

    def load_unit(self, batch: dict[str, np.ndarray], i: int) -> dict:
        """Unit ``i`` of a Ray batch; stages fed by an earlier stage also take its output here."""
        return json.loads(str(batch["unit_json"][i]))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        unit_ids, rows_json = [], []
        for i in range(len(batch["unit_json"])):
            unit = self.load_unit(batch, i)
            rows = self.run_unit(unit)
            unit_ids.append(unit["unit_id"])
            rows_json.append(json.dumps(rows, default=_json_default))
        return {"unit_id": np.array(unit_ids), "rows_json": np.array(rows_json)}


def _json_default(obj):
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
