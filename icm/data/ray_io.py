"""Ray Data adapters for the data layer (the only Ray import in ``icm``).

* ``records_dataset(reader)`` — one row per image; only the lightweight references are created on
  the driver, decoding (``load_record``) runs inside the Ray workers.
* ``select_refs(reader, limit)`` / ``work_units(refs, unit_size, done)`` — the job's images
  (sorted by ``source_id``, the first ``limit``) and the units of those not yet done (no manifest
  row): a resumed job, a raised ``limit`` or files added to the dataset never skip or redo an
  image. Unit ids are hashes of their members, so they never collide with earlier units.
* ``init_ray`` — connect to a cluster (``address`` / ``RAY_ADDRESS``, as under ``ray job
  submit``) or start a local one bound to a loopback address.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections import Counter
from functools import partial
from typing import Any

import numpy as np

from icm.data.readers import Reader
from icm.data.records import load_record

DEFAULT_LOCAL_NODE_IP = "127.0.0.2" if sys.platform.startswith("linux") else None


def init_ray(address: str | None = None, num_cpus: int | None = None,
             node_ip_address: str | None = None, **kwargs) -> None:
    """Connect to ``address`` (or ``$RAY_ADDRESS``), else start a local cluster on a loopback
    address (``$ICM_RAY_NODE_IP``, default 127.0.0.2 on Linux: Ray rewrites 127.0.0.1)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
        return
    node_ip = node_ip_address or os.environ.get("ICM_RAY_NODE_IP") or DEFAULT_LOCAL_NODE_IP
    extra = {"_node_ip_address": node_ip} if node_ip else {}
    ray.init(num_cpus=num_cpus, include_dashboard=False, **extra, **kwargs)


PACKAGES = ("icm", "icm.codecs", "icm.data", "icm.detectors", "icm.jrd", "icm.losses", "icm.maa", "icm.metrics",
            "icm.train", "icm.zoo")


def import_origins() -> dict:
    """Where this process imports ``icm`` and each of its subpackages from, and its working dir."""
    import importlib

    files = {}
    for name in PACKAGES:
        try:
            files[name] = importlib.import_module(name).__file__
        except ImportError as exc:
            files[name] = f"nowhere ({type(exc).__name__}: {exc})"
    return {"cwd": os.getcwd(), "node_id": _node_id(), "files": files}


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def _outside_working_dir(origins: dict) -> list[str]:
    return [f"{origins['node_id'] or 'driver'}: {name} from {path}" for name, path in origins["files"].items()
            if not os.path.realpath(path).startswith(os.path.realpath(origins["cwd"]) + os.sep)]


def _uploaded_working_dir() -> bool:
    import ray

    return ray.is_initialized() and bool((ray.get_runtime_context().runtime_env or {}).get("working_dir"))


def check_code_origin() -> dict | None:
    """For a driver submitted as a job with an uploaded working dir (``ray job submit
    --working-dir``): verify that the driver and a worker on every alive node import ``icm`` and
    all its subpackages from that uploaded copy, not from an installed one. An upload that left
    files out (a runtime-env ``excludes`` pattern matching ``icm/data/``) then fails here, at
    start, instead of with ``ModuleNotFoundError`` on nodes without the package, or silently on
    nodes with an older one. Nodes that join later (autoscaled GPU workers) unpack the same
    package; each stage actor checks its own process as it starts (``check_worker_code_origin``).
    Returns what was checked (None when there is no working dir)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not _uploaded_working_dir():
        return None
    probe = ray.remote(num_cpus=0)(import_origins)
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    origins = [import_origins()] + ray.get([probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        node, soft=False)).remote() for node in nodes])
    bad = [line for o in origins for line in _outside_working_dir(o)]
    if bad:
        raise RuntimeError("the job's uploaded working dir is not what the nodes run — " + "; ".join(bad[:5])
                           + ". Check the runtime env's excludes (anchor directories: /data/, not data/)")
    print(f"[icm] code origin: icm and its {len(PACKAGES) - 1} subpackages imported from the uploaded working "
          f"dir by the driver and on {len(nodes)} node(s); actors on nodes that join later check themselves",
          flush=True)
    return {"nodes": len(nodes), "packages": list(PACKAGES)}


def check_worker_code_origin() -> None:
    """In a worker of a job with an uploaded working dir: raise unless every ``icm`` module this
    process has imported comes from that dir. Stage actors call it as they start, so a node that
    joined after the driver's ``check_code_origin`` (an autoscaled GPU worker) is checked too.
    A no-op outside Ray and without a working dir."""
    import sys

    try:
        if not _uploaded_working_dir():
            return
    except ImportError:
        return
    files = {name: getattr(module, "__file__", None) or "" for name, module in list(sys.modules.items())
             if name == "icm" or name.startswith("icm.")}
    bad = _outside_working_dir({"cwd": os.getcwd(), "node_id": _node_id(), "files": files})
    if bad:
        raise RuntimeError("this worker does not run the job's uploaded working dir — " + "; ".join(bad[:5]))


def run_on_worker(fn, *args, num_gpus: float = 0, num_cpus: float = 1):
    """``fn(*args)`` in a Ray worker with these resources (e.g. a probe on a GPU node), its result."""
    import ray

    return ray.get(ray.remote(num_gpus=num_gpus or None, num_cpus=num_cpus)(fn).remote(*args))


def assigned_gpu_ids() -> list:
    """The GPUs Ray gave this worker (empty outside Ray, and where Ray is not installed)."""
    try:
        import ray
    except ImportError:
        return []
    return list(ray.get_gpu_ids()) if ray.is_initialized() else []


def _record_row(ref: dict[str, Any], min_side: int) -> dict[str, Any]:
    record = load_record(ref, min_side=min_side)
    if record["image"] is None:  # keep the column a tensor column: empty image for error rows
        record["image"] = np.zeros((0, 0, 3), np.uint8)
    return record


def records_dataset(reader: Reader, min_side: int = 1, override_num_blocks: int | None = None,
                    num_cpus: float = 1):
    """A ``ray.data.Dataset`` of decoded records, decoded in the workers (``num_cpus`` each:
    below 1 leaves room for training workers on a small machine)."""
    import ray

    refs = [r.to_dict() for r in reader.refs()]
    ds = ray.data.from_items(refs, override_num_blocks=override_num_blocks)
    return ds.map(partial(_record_row, min_side=min_side), num_cpus=num_cpus)


def select_refs(reader: Reader, limit: int | None = None) -> list[dict[str, Any]]:
    """The job's images: refs sorted by ``source_id``, the first ``limit`` of them."""
    refs = sorted((r.to_dict() for r in reader.refs()), key=lambda r: r["source_id"])
    repeated = sorted(i for i, n in Counter(r["source_id"] for r in refs).items() if n > 1)
    if repeated:
        raise ValueError(f"dataset {reader.name!r} gives several images the same source_id: {repeated[:5]}")
    return refs if limit is None else refs[:int(limit)]


def refs_dataset(refs: list[dict[str, Any]], max_blocks: int = 200):
    """A ``ray.data.Dataset`` of image references (``{"ref_json"}`` rows) whose blocks come in a
    new random order every time it is iterated (every training epoch): decoding runs downstream,
    in the workers, so nothing but references is ever held."""
    import json

    import ray

    rows = [{"ref_json": json.dumps(r)} for r in refs]
    return ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), max_blocks))).randomize_block_order()


def unit_id(source_ids: list[str]) -> str:
    return "unit-" + hashlib.sha1("\n".join(source_ids).encode()).hexdigest()[:16]


def work_units(refs: Reader | list[dict[str, Any]], unit_size: int, limit: int | None = None,
               done: set[str] | frozenset = frozenset()) -> list[dict[str, Any]]:
    """Units of ``unit_size`` images among ``refs`` (a reader: ``select_refs(reader, limit)``)
    whose ``source_id`` is not in ``done``, in ``source_id`` order."""
    if unit_size < 1:
        raise ValueError(f"unit_size must be ≥ 1, got {unit_size}")
    if isinstance(refs, Reader):
        refs = select_refs(refs, limit)
    todo = [r for r in refs if r["source_id"] not in done]
    chunks = [todo[i:i + unit_size] for i in range(0, len(todo), unit_size)]
    return [{"unit_id": unit_id([r["source_id"] for r in chunk]), "refs": chunk} for chunk in chunks]


def units_dataset(units: list[dict[str, Any]]):
    """One row per unit (one block per unit, so units spread over the actor pool)."""
    import ray

    return ray.data.from_items(units, override_num_blocks=max(1, len(units)))


def run_units(units: list[dict[str, Any]], stage_cls: type, stage_kwargs: dict[str, Any], *,
              actors: int = 1, num_gpus_per_actor: float = 0,
              num_cpus_per_actor: float = 1, pre_stage: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Run ``stage_cls`` (a callable class built once per actor) over ``units`` on an actor pool.

    ``pre_stage`` (``{"cls", "kwargs", "actors", "num_cpus"}``) puts a CPU stage in front: it gets
    the ``unit_json`` batches and passes its own columns on to ``stage_cls`` (Ray Data streams
    between the two, so CPU coding and detector work overlap).

    The stage takes ``{"unit_json": [...]}`` batches (one unit per batch), does the unit's work,
    writes its outputs and manifest shard itself, and returns ``{"unit_id", "rows_json",
    "failure"}`` (``failure`` non-empty when the unit failed as a whole and wrote no shard). The
    driver only sees the small per-unit results. Ray Data restarts actors that die and retries
    their unit; a unit's outputs are written atomically, so a retry leaves no half files.
    """
    import json

    import ray

    if not units:
        return []
    ds = units_dataset([{"unit_json": json.dumps(u, sort_keys=True)} for u in units])
    if pre_stage:
        ds = ds.map_batches(
            pre_stage["cls"], fn_constructor_kwargs=pre_stage.get("kwargs", {}), batch_size=1, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=max(1, int(pre_stage.get("actors", 1)))),
            num_cpus=pre_stage.get("num_cpus", 1))
    out = ds.map_batches(
        stage_cls, fn_constructor_kwargs=stage_kwargs, batch_size=1, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=max(1, actors)), num_gpus=num_gpus_per_actor or None,
        num_cpus=num_cpus_per_actor)
    results = []
    for row in out.iter_rows():
        results.append({"unit_id": str(row["unit_id"]), "rows": json.loads(str(row["rows_json"])),
                        "failure": str(row["failure"])})
    return results
