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
* ``run_units`` — a stage over the units on an actor pool; ``actors: auto`` is Ray Data's
  autoscaling pool, bounded by what the cluster has or can scale to (``pool_bounds``).
* ``live_progress`` — a progress line on the driver fed by Ray workers (training steps).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import socket
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from functools import partial
from pathlib import Path
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
    # The dashboard's Train page lists runs only when Ray Train's state actor tracks them (off by
    # default in Ray 2.60: the page then answers 500 "Train state data is not available"). The
    # trainer reads it where it is built: this driver, or a Tune trial's worker.
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    env_vars["RAY_TRAIN_ENABLE_STATE_TRACKING"] = os.environ["RAY_TRAIN_ENABLE_STATE_TRACKING"]
    # Ray Train's workers turn print() into a log record and, when sys.stdout is wrapped (it is in
    # a Ray worker), also print it: every line of a training worker would reach the console twice.
    env_vars["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
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


def assigned_resources() -> dict[str, float]:
    """What Ray reserved for this worker (``{"CPU": 3.0, "GPU": 0.5}``); empty outside a Ray
    worker (the driver, a Ray-free bench), and where Ray is not installed."""
    try:
        import ray
    except ImportError:
        return {}
    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return {}
    return dict(ray.get_runtime_context().get_assigned_resources())


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


# ``ray up`` leaves the cluster launcher's config (node types with their resources and
# max_workers) here on the head node, where ``ray job submit`` runs the driver.
LAUNCHER_CONFIG = "~/ray_bootstrap_config.yaml"


def actors_per_node(resources: dict[str, float], per_actor: dict[str, float]) -> int | float:
    """How many actors asking ``per_actor`` fit on a node with ``resources`` (inf: it asks nothing)."""
    asks = {r: v for r, v in per_actor.items() if v and v > 0}
    if not asks:
        return math.inf
    return min(math.floor(float(resources.get(r, 0)) / v + 1e-9) for r, v in asks.items())


def launcher_node_groups(config: dict[str, Any]) -> dict[str, Any]:
    """The node groups of a cluster-launcher config (``cluster/aws.yaml``, ``cluster/gcp.yaml``):
    every node type at its ``max_workers`` (``min_workers: 0`` groups counted at their maximum:
    they scale up on demand), the head once, and the cluster's ``max_workers`` cap on workers."""
    head = config.get("head_node_type")
    groups = []
    for name, node_type in (config.get("available_node_types") or {}).items():
        if name == head:
            count = 1 + int(node_type.get("max_workers", 0))
        else:
            count = int(node_type.get("max_workers", config.get("max_workers", 0)))
        groups.append({"name": name, "resources": dict(node_type.get("resources") or {}), "max_count": count,
                       "head": name == head})
    return {"groups": groups, "max_workers": config.get("max_workers"), "source": "cluster launcher config"}


def _published_node_groups() -> dict[str, Any] | None:
    """The node groups the autoscaler published to the GCS (what Ray Data's own autoscaling reads)."""
    try:
        import ray._private.state

        config = ray._private.state.state.get_cluster_config()
    except Exception:  # noqa: BLE001 - an older or newer Ray without it: fall back
        return None
    if not config or not config.node_group_configs:
        return None
    groups = [{"name": g.name, "resources": dict(g.resources), "max_count": int(g.max_count), "head": False}
              for g in config.node_group_configs]
    return {"groups": groups, "max_resources": dict(config.max_resources), "source": "autoscaler (GCS)"}


def cluster_description() -> dict[str, Any]:
    """The connected cluster as ``pool_bounds`` reads it: the alive nodes' resources, and the
    node groups it can scale to — published by the autoscaler, else from the launcher's config on
    the head (``$ICM_CLUSTER_CONFIG`` overrides the path); ``None`` when neither is there."""
    import ray
    import yaml

    nodes = [dict(n["Resources"]) for n in ray.nodes() if n["Alive"]]
    scaling = _published_node_groups()
    if scaling is None:
        path = Path(os.environ.get("ICM_CLUSTER_CONFIG") or LAUNCHER_CONFIG).expanduser()
        if path.is_file():
            scaling = {**launcher_node_groups(yaml.safe_load(path.read_text()) or {}), "source": str(path)}
    return {"nodes": nodes, "scaling": scaling}


def _scalable_capacity(scaling: dict[str, Any], per_actor: dict[str, float]) -> int | None:
    """Actors that fit once every node group is at its maximum (None: unbounded)."""
    fits = sorted(((actors_per_node(g["resources"], per_actor), g) for g in scaling["groups"]),
                  key=lambda fg: fg[0], reverse=True)
    total = 0
    workers_left = scaling.get("max_workers")
    workers_left = math.inf if workers_left is None else int(workers_left)
    for fit, group in fits:
        if fit == 0 or group["max_count"] == 0:
            continue
        if fit == math.inf or group["max_count"] < 0:
            return None
        count = group["max_count"]
        if not group.get("head"):    # the cluster's max_workers caps worker nodes, not the head
            count = min(count, workers_left)
            workers_left -= count
        total += fit * count
    for resource, limit in (scaling.get("max_resources") or {}).items():
        if per_actor.get(resource):
            total = min(total, math.floor(float(limit) / per_actor[resource] + 1e-9))
    return total


def pool_bounds(actors: int | str, per_actor: dict[str, float], cluster: dict[str, Any], units: int,
                max_actors: int | None = None, reserved: dict[str, float] | None = None) -> dict[str, int]:
    """``{"min", "initial", "max"}`` actors for a pool of ``actors`` (a number: that many; ``auto``:
    Ray Data's autoscaling pool from one actor up to all that fit the cluster once it has scaled
    out). ``initial`` is what fits the alive nodes now (after ``reserved``, held for another pool
    of the job); the maximum is what fits the node groups at their maximum, or, for a cluster that
    publishes no groups, open (Ray Data grows the pool as nodes join). Never more than ``units``
    or ``max_actors``."""
    units = max(1, int(units))
    if actors != "auto":
        n = max(1, min(int(actors), units))
        return {"min": n, "initial": n, "max": n}
    nodes = [dict(n) for n in cluster.get("nodes") or []]
    for resource, amount in (reserved or {}).items():
        if nodes and amount:
            host = max(nodes, key=lambda n: n.get(resource, 0))
            host[resource] = max(0.0, host.get(resource, 0) - amount)
    live = sum(actors_per_node(n, per_actor) for n in nodes)
    scaling = cluster.get("scaling")
    capacity = _scalable_capacity(scaling, per_actor) if scaling else None
    top = units if capacity is None or live == math.inf else max(capacity, live)
    top = max(1, min(top, units, max_actors or units))
    return {"min": 1, "initial": int(max(1, min(live, top))), "max": int(top)}


def _fit_note(per_actor: dict[str, float], cluster: dict[str, Any]) -> str:
    """A hint when a node's CPUs, not its GPUs, bound the actors on it (part of its GPU idles)."""
    gpu = per_actor.get("GPU") or 0
    if not gpu:
        return ""
    shapes = list(cluster.get("nodes") or []) + [g["resources"] for g in (cluster.get("scaling") or {}).get("groups", [])]
    for res in shapes:
        if res.get("GPU") and actors_per_node(res, per_actor) < math.floor(res["GPU"] / gpu + 1e-9):
            return (f"; a node with {res.get('CPU', 0):g} CPUs and {res['GPU']:g} GPU(s) fits only "
                    f"{actors_per_node(res, per_actor)} actor(s) of {per_actor.get('CPU', 0):g} CPUs, so part of "
                    "its GPU idles: lower workers.num_cpus")
    return ""


def _pool_strategy(bounds: dict[str, int], concurrent_calls: int):
    """Ray Data's actor pool. One unit in flight per concurrent call: a unit never queues behind a
    busy actor while another idles, and the pool grows once every slot is busy (see run_units)."""
    import ray

    return ray.data.ActorPoolStrategy(
        min_size=bounds["min"], max_size=bounds["max"], initial_size=bounds["initial"],
        max_tasks_in_flight_per_actor=concurrent_calls, max_concurrent_calls_per_actor=concurrent_calls,
        enable_true_multi_threading=concurrent_calls > 1)


def _describe_pool(name: str, bounds: dict[str, int], per_actor: dict[str, float], cluster: dict[str, Any],
                   concurrent_calls: int) -> str:
    size = (f"{bounds['max']}" if bounds["min"] == bounds["max"] else
            f"{bounds['initial']} now, {bounds['min']}–{bounds['max']} autoscaled")
    asks = ", ".join(f"{v:g} {k}" for k, v in per_actor.items() if v)
    where = (cluster.get("scaling") or {}).get("source") or "the alive nodes (no node groups published)"
    calls = f", {concurrent_calls} units at once each (I/O beside compute)" if concurrent_calls > 1 else ""
    return f"[icm] {name}: {size} actor(s) of {asks or 'no resources'}{calls}; cluster from {where}"


def run_units(units: list[dict[str, Any]], stage_cls: type, stage_kwargs: dict[str, Any], *,
              workers: dict[str, Any] | None = None, pre_stage: dict[str, Any] | None = None,
              cluster: dict[str, Any] | None = None, label: str | None = None) -> list[dict[str, Any]]:
    """Run ``stage_cls`` (a callable class built once per actor) over ``units`` on an actor pool.

    ``workers`` (a job's ``workers:`` section): ``actors`` (a number, or ``auto``: autoscaled up to
    what the cluster has or can scale to, ``pool_bounds``), ``max_actors``, ``num_gpus`` (a
    fraction lets actors share a GPU) and ``num_cpus`` per actor. ``pre_stage`` (``{"cls",
    "kwargs", "actors", "max_actors", "num_cpus"}``) puts a CPU stage in front: it gets the
    ``unit_json`` batches and passes its own columns on to ``stage_cls`` (Ray Data streams between
    the two, so CPU coding and detector work overlap).

    The stage takes ``{"unit_json": [...]}`` batches (one unit per batch), does the unit's work,
    writes its outputs and manifest shard itself, and returns ``{"unit_id", "rows_json",
    "failure"}`` (``failure`` non-empty when the unit failed as a whole and wrote no shard). The
    driver only sees the small per-unit results. Ray Data restarts actors that die and retries
    their unit; a unit's outputs are written atomically, so a retry leaves no half files. The
    driver shows images and units done as units finish (``label`` names the line). A stage
    with ``overlap_io`` on a GPU runs two units at once per actor (``icm.data.units``).

    Every slot takes one unit at a time (no queue per actor) and the pool grows when all slots are
    busy (Ray Data's upscaling threshold set to full utilisation for these datasets): units last
    seconds to minutes, so a unit queued behind a busy actor while another sits idle would cost
    more than the dispatch latency it saves.
    """
    import dataclasses
    import json

    if not units:
        return []
    workers = workers or {}
    cluster = cluster or cluster_description()
    per_actor = {"CPU": float(workers.get("num_cpus", 1)), "GPU": float(workers.get("num_gpus") or 0)}
    calls = 2 if per_actor["GPU"] and getattr(stage_cls, "overlap_io", False) else 1
    ds = units_dataset([{"unit_json": json.dumps(u, sort_keys=True)} for u in units])
    if pre_stage:
        pre_ask = {"CPU": float(pre_stage.get("num_cpus", 1))}
        main_now = pool_bounds(workers.get("actors", 1), per_actor, cluster, len(units), workers.get("max_actors"),
                               reserved=pre_ask)
        pre_bounds = pool_bounds(pre_stage.get("actors", 1), pre_ask, cluster, len(units), pre_stage.get("max_actors"),
                                 reserved={k: v * main_now["initial"] for k, v in per_actor.items()})
        print(_describe_pool(pre_stage["cls"].__name__, pre_bounds, pre_ask, cluster, 1), flush=True)
        ds = ds.map_batches(
            pre_stage["cls"], fn_constructor_kwargs=pre_stage.get("kwargs", {}), batch_size=1, batch_format="numpy",
            compute=_pool_strategy(pre_bounds, 1), num_cpus=pre_ask["CPU"])
    else:
        pre_ask = None
    bounds = pool_bounds(workers.get("actors", 1), per_actor, cluster, len(units), workers.get("max_actors"),
                         reserved=pre_ask)
    print(_describe_pool(stage_cls.__name__, bounds, per_actor, cluster, calls) + _fit_note(per_actor, cluster),
          flush=True)
    out = ds.map_batches(
        stage_cls, fn_constructor_kwargs=stage_kwargs, batch_size=1, batch_format="numpy",
        compute=_pool_strategy(bounds, calls), num_gpus=per_actor["GPU"] or None, num_cpus=per_actor["CPU"])
    out.context.autoscaling_config = dataclasses.replace(out.context.autoscaling_config,
                                                         actor_pool_util_upscaling_threshold=1.0)
    images = {u["unit_id"]: len(u["refs"]) for u in units}
    results = []
    with console.Progress(label or stage_cls.__name__, sum(images.values()), "images",
                          note=f"0/{len(units)} units") as progress:
        for row in out.iter_rows():
            results.append({"unit_id": str(row["unit_id"]), "rows": json.loads(str(row["rows_json"])),
                            "failure": str(row["failure"])})
            progress.advance(images.get(results[-1]["unit_id"], 0), note=f"{len(results)}/{len(units)} units")
    return results
