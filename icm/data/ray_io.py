"""Ray Data adapters for the data layer (the only Ray import in ``icm``).

* ``records_dataset(reader)`` — one row per image; only the lightweight references are created on
  the driver, decoding (``load_record``) runs inside the Ray workers.
* ``select_refs(reader, limit)`` / ``work_units(refs, unit_size, done)`` — the job's images
  (sorted by ``source_id``, the first ``limit``) and the units of those not yet done (no manifest
  row): a resumed job, a raised ``limit`` or files added to the dataset never skip or redo an
  image. Unit ids are hashes of their members, so they never collide with earlier units.
* ``init_ray`` — connect to a cluster (``address`` / ``RAY_ADDRESS``, as under ``ray job
  submit``) or start a local one bound to a loopback address, with Ray's dashboard on that address
  (its URL and how to open it printed), workers given the console settings of ``icm.console``.
* ``live_progress`` — a progress line on the driver fed by Ray workers (training steps).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from functools import partial
from typing import Any, Iterator

import numpy as np

from icm import console
from icm.data.readers import Reader
from icm.data.records import load_record

DEFAULT_LOCAL_NODE_IP = "127.0.0.2" if sys.platform.startswith("linux") else None


DASHBOARD_ENV = "ICM_RAY_DASHBOARD"
# Ray Data's own console lines that the project's progress line replaces (exact messages).
RAY_DATA_QUIET = ("Progress bars disabled. To enable, set `ray.data.DataContext.get_current().enable_progress_bars = "
                  "True`.",)
# Ray's warning, on every local ray.init, that token authentication is on (the driver's own
# dashboard lines say so, with how to open it).
RAY_AUTH_ENABLED = ("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out. "
                    "For more information, see https://docs.ray.io/en/latest/ray-security/token-auth.html",)
# Ray's line with the dashboard's URL (in terminal colours, whatever stdout is), as Ray 2.60 formats it.
RAY_STARTED_AT = ("Started a local Ray instance. View the dashboard at %s%s%s %s%s",)
DASHBOARD_PAGES = ("Jobs: this run, its logs and status · Train: each training run (one per trial in a sweep), its "
                   "workers, metrics and checkpoints · Data: per-stage progress of the job's datasets")


def init_ray(address: str | None = None, num_cpus: int | None = None,
             node_ip_address: str | None = None, dashboard: bool | None = None, **kwargs) -> None:
    """Connect to ``address`` (or ``$RAY_ADDRESS``), else start a local cluster on a loopback
    address (``$ICM_RAY_NODE_IP``, default 127.0.0.2 on Linux: Ray rewrites 127.0.0.1).

    A local cluster gets Ray's dashboard on that address at a free port (``dashboard``; default
    ``$ICM_RAY_DASHBOARD``, else on; tests turn it off) and Ray's default token authentication; the
    driver prints the URL, what to open there and how the dashboard asks for the token (instead of
    Ray's warning that token authentication is on, filtered by its exact text). Worker processes
    get the driver's console settings (``icm.console.worker_env``) through the job's runtime env."""
    import ray

    if ray.is_initialized():
        return
    quiet = not console.is_verbose()
    if quiet:
        quiet_ray_data()
    env_vars = console.worker_env()
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        context = ray.init(address=address, runtime_env=_with_env(kwargs.pop("runtime_env", None), env_vars),
                           **kwargs)
        if context.dashboard_url:
            print(f"[icm] Ray dashboard of the cluster: http://{context.dashboard_url} — {DASHBOARD_PAGES}", flush=True)
        return
    node_ip = node_ip_address or os.environ.get("ICM_RAY_NODE_IP") or DEFAULT_LOCAL_NODE_IP
    extra: dict[str, Any] = {"_node_ip_address": node_ip} if node_ip else {}
    if dashboard is None:
        dashboard = os.environ.get(DASHBOARD_ENV, "1").lower() not in ("0", "false", "no", "off")
    if dashboard:
        host = node_ip or "127.0.0.1"
        port = free_port(host)
        extra |= {"include_dashboard": True, "dashboard_host": host, "dashboard_port": port}
        # Ray Train's state-API calls from its actors go to this cluster's dashboard, not to
        # whichever Ray instance they would find first on a machine running several
        env_vars["RAY_API_SERVER_ADDRESS"] = f"http://{host}:{port}"
    else:
        extra["include_dashboard"] = False
    if quiet:   # the driver's own lines say both, with how to open the dashboard
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
            _DropRecords(RAY_AUTH_ENABLED, logging.NOTSET))
        if dashboard:
            logging.getLogger("ray._private.worker").addFilter(_DropRecords(RAY_STARTED_AT, logging.NOTSET))
    context = ray.init(num_cpus=num_cpus, runtime_env=_with_env(kwargs.pop("runtime_env", None), env_vars),
                       **extra, **kwargs)
    if dashboard and context.dashboard_url:
        print(dashboard_help(f"http://{context.dashboard_url}"), flush=True)


def dashboard_help(url: str) -> str:
    """What the driver prints about a local cluster's dashboard."""
    token = ("$RAY_AUTH_TOKEN" if os.environ.get("RAY_AUTH_TOKEN")
             else os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.join("~", ".ray", "auth_token"))
    return (f"[icm] Ray dashboard: {url} — {DASHBOARD_PAGES}\n"
            f"[icm]   it asks for this cluster's token: paste the output of `ray get-auth-token` (the token in "
            f"{token}); API clients send it as 'Authorization: Bearer <token>'")


def free_port(host: str) -> int:
    """A TCP port free on ``host`` now (the OS picks it; never a fixed one: other clusters may
    run on this machine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _with_env(runtime_env: dict | None, env_vars: dict[str, str]) -> dict:
    """``runtime_env`` plus ``env_vars``, leaving out keys a submitted job's own runtime env sets
    (Ray refuses to merge the two when they share a key)."""
    import json

    runtime_env = dict(runtime_env or {})
    taken = set(runtime_env.get("env_vars") or {})
    submitted = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")   # the job's config, under `ray job submit`
    if submitted:
        taken |= set((json.loads(submitted).get("runtime_env") or {}).get("env_vars") or {})
    runtime_env["env_vars"] = {**{k: v for k, v in env_vars.items() if k not in taken},
                               **(runtime_env.get("env_vars") or {})}
    return runtime_env


class _DropRecords(logging.Filter):
    def __init__(self, messages: tuple[str, ...], min_level: int):
        super().__init__()
        self.messages, self.min_level = messages, min_level

    def filter(self, record: logging.LogRecord) -> bool:   # a message, or the format string it was logged with
        return record.levelno >= self.min_level and not ({record.msg, record.getMessage()} & set(self.messages))


def quiet_ray_data() -> None:
    """Ray Data without its console progress (the project's own line counts images and units;
    Ray Data's counts rows of one operator, and logs 8 lines every 10 s when stdout is not a
    terminal) and without its INFO chatter on the console; its warnings and errors still print,
    and its log files (``logs/ray-data``, the dashboard's Data page) keep everything."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.addFilter(_DropRecords(RAY_DATA_QUIET, logging.WARNING))


class ProgressBoard:
    """Where Ray workers post ``(done, total)`` for the driver to show (a Ray actor)."""

    def __init__(self):
        self.state: tuple[int, int] | None = None

    def update(self, done: int, total: int) -> None:
        self.state = (int(done), int(total))

    def read(self) -> tuple[int, int] | None:
        return self.state


class ProgressReporter:
    """``reporter(done, total)`` from a worker: posts to the driver's board at most every
    ``every_s`` seconds (and always the last step); picklable, so it travels in a task's or a
    training loop's arguments."""

    def __init__(self, board, every_s: float = 1.0):
        self.board, self.every_s = board, every_s
        self._sent_at = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done >= total or now - self._sent_at >= self.every_s:
            self._sent_at = now
            self.board.update.remote(done, total)

    def __getstate__(self):
        return {"board": self.board, "every_s": self.every_s}

    def __setstate__(self, state):
        self.__init__(state["board"], state["every_s"])


@contextmanager
def live_progress(label: str, unit: str, poll_s: float = 1.0) -> Iterator[ProgressReporter]:
    """A progress line on the driver (``icm.console.Progress``) fed by Ray workers: yields the
    reporter to hand to them; the line appears with their first report and ends with the block."""
    import ray

    board = ray.remote(num_cpus=0)(ProgressBoard).remote()
    stop = threading.Event()
    shown: list[console.Progress] = []

    def show() -> None:
        state = ray.get(board.read.remote())
        if state is None:
            return
        if not shown:
            shown.append(console.Progress(label, state[1], unit, start=state[0]))
        shown[0].update(*state)

    def poll() -> None:
        while not stop.wait(poll_s):
            try:
                show()
            except ray.exceptions.RayError:
                return

    thread = threading.Thread(target=poll, name="icm-progress", daemon=True)
    thread.start()
    try:
        yield ProgressReporter(board)
    finally:
        stop.set()
        thread.join()
        try:
            show()
        except ray.exceptions.RayError:
            pass
        if shown:
            shown[0].close()
        ray.kill(board)


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


def check_code_origin() -> dict | None:
    """For a driver submitted as a job with an uploaded working dir (``ray job submit
    --working-dir``): verify that the driver and a worker on every alive node import ``icm`` and
    all its subpackages from that uploaded copy, not from an installed one. An upload that left
    files out (a runtime-env ``excludes`` pattern matching ``icm/data/``) then fails here, at
    start, instead of with ``ModuleNotFoundError`` on nodes without the package, or silently on
    nodes with an older one. Returns what was checked (None when there is no working dir)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not (ray.get_runtime_context().runtime_env or {}).get("working_dir"):
        return None
    probe = ray.remote(num_cpus=0)(import_origins)
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    origins = [import_origins()] + ray.get([probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        node, soft=False)).remote() for node in nodes])
    bad = [f"{o['node_id'] or 'driver'}: {name} from {path}" for o in origins for name, path in o["files"].items()
           if not os.path.realpath(path).startswith(os.path.realpath(o["cwd"]) + os.sep)]
    if bad:
        raise RuntimeError("the job's uploaded working dir is not what the nodes run — " + "; ".join(bad[:5])
                           + ". Check the runtime env's excludes (anchor directories: /data/, not data/)")
    print(f"[icm] code origin: icm and its {len(PACKAGES) - 1} subpackages imported from the uploaded working "
          f"dir by the driver and on {len(nodes)} node(s)", flush=True)
    return {"nodes": len(nodes), "packages": list(PACKAGES)}


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
              num_cpus_per_actor: float = 1, pre_stage: dict[str, Any] | None = None,
              label: str | None = None) -> list[dict[str, Any]]:
    """Run ``stage_cls`` (a callable class built once per actor) over ``units`` on an actor pool.

    ``pre_stage`` (``{"cls", "kwargs", "actors", "num_cpus"}``) puts a CPU stage in front: it gets
    the ``unit_json`` batches and passes its own columns on to ``stage_cls`` (Ray Data streams
    between the two, so CPU coding and detector work overlap).

    The stage takes ``{"unit_json": [...]}`` batches (one unit per batch), does the unit's work,
    writes its outputs and manifest shard itself, and returns ``{"unit_id", "rows_json",
    "failure"}`` (``failure`` non-empty when the unit failed as a whole and wrote no shard). The
    driver only sees the small per-unit results. Ray Data restarts actors that die and retries
    their unit; a unit's outputs are written atomically, so a retry leaves no half files. The
    driver shows images and units done as units finish (``label`` names the line). Pools have
    no more actors than units.
    """
    import json

    import ray

    if not units:
        return []
    ds = units_dataset([{"unit_json": json.dumps(u, sort_keys=True)} for u in units])
    if pre_stage:
        ds = ds.map_batches(
            pre_stage["cls"], fn_constructor_kwargs=pre_stage.get("kwargs", {}), batch_size=1, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=max(1, min(int(pre_stage.get("actors", 1)), len(units)))),
            num_cpus=pre_stage.get("num_cpus", 1))
    out = ds.map_batches(
        stage_cls, fn_constructor_kwargs=stage_kwargs, batch_size=1, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=max(1, min(actors, len(units)))), num_gpus=num_gpus_per_actor or None,
        num_cpus=num_cpus_per_actor)
    images = {u["unit_id"]: len(u["refs"]) for u in units}
    results = []
    with console.Progress(label or stage_cls.__name__, sum(images.values()), "images",
                          note=f"0/{len(units)} units") as progress:
        for row in out.iter_rows():
            results.append({"unit_id": str(row["unit_id"]), "rows": json.loads(str(row["rows_json"])),
                            "failure": str(row["failure"])})
            progress.advance(images.get(results[-1]["unit_id"], 0), note=f"{len(results)}/{len(units)} units")
    return results
