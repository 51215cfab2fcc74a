"""The manifest contract every job shares: one parquet row per output, with its provenance.

Columns (``CONTRACT``): ``source_id`` (stable: dataset + image id), ``source_path``,
``output_path`` (relative to the job's output dir), ``status`` (ok / error / skipped), ``error``,
``params`` (JSON of the resolved job parameters), ``models`` (JSON list of {name, family, weights,
sha256}), ``seed``; and the volatile columns (``VOLATILE``) ``node_id``, ``started_at``,
``duration_s`` that comparisons ignore. Jobs add their own columns after these.

A job writes one shard per work unit under ``<out>/manifest/`` (atomically), so a resumed job
knows which images are done (they have a row); ``consolidate`` joins the shards into
``<out>/manifest.parquet``. Shards are read in parallel (object stores answer each GET in tens of
milliseconds; a 118 k-image job has thousands of shards). A row is final: ``status="error"`` is
only ever written for bad input, never for a storage fault (``icm.data.storage.StorageUnavailable``
fails the unit instead, so a rerun retries its images).
``<out>`` is a local directory or an object-store URI (``icm.data.storage``).
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from icm.config import canonical_json
from icm.data.storage import Storage, resolve_location

CONTRACT = pa.schema([
    ("source_id", pa.string()),
    ("source_path", pa.string()),
    ("output_path", pa.string()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("params", pa.string()),
    ("models", pa.string()),
    ("seed", pa.int64()),
    ("node_id", pa.string()),
    ("started_at", pa.float64()),
    ("duration_s", pa.float64()),
    ("runtime", pa.string()),
])
VOLATILE = ("node_id", "started_at", "duration_s", "runtime")
CONSOLIDATE_GROUP = 256   # shards read and joined at a time
STATUSES = ("ok", "error", "skipped")


def model_provenance(name: str, family: str, weights: str, sha256: str) -> dict[str, str]:
    """One entry of the ``models`` column; ``sha256`` is the weights file's or ``random:<seed>``."""
    return {"name": name, "family": family, "weights": weights, "sha256": sha256}


def current_node_id() -> str:
    """The Ray node id when running inside Ray, else the host name."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - provenance must never fail a job
        pass
    return socket.gethostname()


def manifest_row(*, source_id: str, source_path: str, output_path: str = "", status: str,
                 error: str = "", params: dict | str, models: list[dict] | str, seed: int,
                 started_at: float, duration_s: float, node_id: str | None = None, runtime: dict | str = "",
                 **extra: Any) -> dict[str, Any]:
    if status not in STATUSES:
        raise ValueError(f"status {status!r} is not one of {STATUSES}")
    return {
        "source_id": source_id, "source_path": source_path, "output_path": output_path,
        "status": status, "error": error,
        "params": params if isinstance(params, str) else canonical_json(params),
        "models": models if isinstance(models, str) else canonical_json(models),
        "seed": int(seed), "node_id": node_id or current_node_id(),
        "started_at": float(started_at), "duration_s": float(duration_s),
        "runtime": runtime if isinstance(runtime, str) else canonical_json(runtime), **extra,
    }


def to_table(rows: list[dict[str, Any]], extra_schema: pa.Schema | None = None) -> pa.Table:
    schema = CONTRACT
    if extra_schema is not None:
        for f in extra_schema:
            if f.name not in schema.names:
                schema = schema.append(f)
    missing = [c for c in CONTRACT.names if rows and c not in rows[0]]
    if missing:
        raise ValueError(f"manifest rows miss contract columns {missing}")
    return pa.Table.from_pylist(rows, schema=schema)


class ManifestStore:
    """Per-unit manifest shards under ``<out>/manifest/`` plus the consolidated file."""

    def __init__(self, out_dir: str | Path, extra_schema: pa.Schema | None = None):
        self.storage = Storage(out_dir)
        self.extra_schema = extra_schema

    def done_units(self) -> set[str]:
        return {name.removesuffix(".parquet") for name in self.storage.list("manifest", ".parquet")}

    def done_source_ids(self) -> set[str]:
        """Images that have a row (ok or error) in some shard: done, never processed again."""
        return {sid for t in self.storage.read_tables("manifest", ["source_id"]) for sid in t["source_id"].to_pylist()}

    def write_unit(self, unit_id: str, rows: list[dict[str, Any]]) -> str:
        return self.storage.write_table(f"manifest/{unit_id}.parquet", to_table(rows, self.extra_schema))

    def consolidate(self, name: str = "manifest.parquet", source_ids: set[str] | None = None) -> str:
        """Join the shards into ``<out>/<name>`` — only the rows of ``source_ids`` when given (the
        job's current images; rows of images since removed or cut by ``limit`` stay in their
        shards); returns where it went (a path or a URI). Shards are read in groups, each joined
        into one contiguous table at once: 15 k tables of 8 rows, held side by side, would take
        several times the memory of their rows."""
        names = self.storage.list("manifest", ".parquet")
        if not names:
            raise FileNotFoundError(f"no manifest shards under {self.storage.display('manifest')}")
        wanted = None if source_ids is None else pa.array(sorted(source_ids), pa.string())
        parts = []
        for start in range(0, len(names), CONSOLIDATE_GROUP):
            group = self.storage.read_tables("manifest", names=names[start:start + CONSOLIDATE_GROUP])
            part = pa.concat_tables(group, promote_options="default")
            if wanted is not None:
                part = part.filter(pc.is_in(part["source_id"], wanted))
            parts.append(part.combine_chunks())
        table = pa.concat_tables(parts, promote_options="default")
        del parts
        table = table.take(pc.sort_indices(table["source_id"]))
        self.storage.write_table(name, table)
        return self.storage.display(name)


def status_counts(manifest: str | Path) -> tuple[dict[str, int], str]:
    """``({status: rows}, first error)`` of a consolidated manifest (a path or a URI)."""
    fs, path = resolve_location(manifest)
    table = pq.read_table(path, filesystem=fs, columns=["status", "source_id", "error"])
    values, rows = pc.value_counts(table["status"]).flatten()
    errors = table.filter(pc.equal(table["status"], "error")).slice(0, 1).to_pylist()
    first = f"{errors[0]['source_id']}: {errors[0]['error']}" if errors else ""
    return dict(zip(values.to_pylist(), rows.to_pylist())), first


def comparable(table_or_path: pa.Table | str | Path):
    """A manifest as a pandas frame sorted by ``source_id`` without the volatile columns."""
    table = table_or_path if isinstance(table_or_path, pa.Table) else pq.read_table(table_or_path)
    df = table.drop_columns([c for c in VOLATILE if c in table.column_names]).to_pandas()
    return df.sort_values("source_id", kind="stable").reset_index(drop=True)
