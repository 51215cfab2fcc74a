"""What every driver shares: command line, Ray start-up, resumable unit runs, summaries."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python pipelines/x.py` from a checkout without `pip install -e`
    sys.path.insert(0, str(REPO))

from icm import console  # noqa: E402

# First, before anything imports torch, ultralytics or Ray: they read their console settings at import.
console.configure(verbose="--verbose" in sys.argv[1:])

from icm.config import ConfigError, load_config, write_resolved  # noqa: E402
from icm.data.manifest import ManifestStore, status_counts  # noqa: E402
from icm.data.ray_io import check_code_origin, init_ray, run_units, work_units  # noqa: E402
from icm.data.storage import Storage  # noqa: E402
from icm.zoo.weights import WeightsUnavailable, check_readable, names_a_file, resolve, weights_fingerprint  # noqa: E402


def parse_args(description: str, default_config: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=default_config, help="job YAML (default: %(default)s)")
    parser.add_argument("--profile", default=None, help="named profile in the YAML, e.g. demo")
    parser.add_argument("--out", default=None, help="output directory (overrides out_dir)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster address; default $RAY_ADDRESS, else a local cluster")
    parser.add_argument("--verbose", action="store_true",
                        help="show everything workers and libraries print (default: progress lines, results, "
                             "warnings and errors)")
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    return parser.parse_args()


def resolve_config(args: argparse.Namespace) -> dict[str, Any]:
    cfg = load_config(args.config, profile=args.profile, overrides=args.overrides)
    if args.out:
        cfg["out_dir"] = args.out
    if not cfg.get("out_dir"):
        raise SystemExit(f"{args.config}: set out_dir in the config or pass --out")
    return cfg


def weight_digests(params: Any, where: str = "") -> dict[str, str]:
    """``{config path of a weights spec: sha256 of the file it names}`` for every ``weights`` /
    ``base_weights`` entry in ``params``: retrained ``trained:<label>`` weights change it."""
    out = {}
    if isinstance(params, dict):
        for key, value in params.items():
            path = f"{where}.{key}" if where else str(key)
            if key in ("weights", "base_weights") and isinstance(value, str):
                out[path] = weights_fingerprint(value)
            else:
                out |= weight_digests(value, path)
    elif isinstance(params, list):
        for i, value in enumerate(params):
            out |= weight_digests(value, f"{where}[{i}]")
    return out


WEIGHT_KEYS = ("weights", "base_weights", "backbone_weights", "init")


def weight_specs(cfg: Any, where: str = ""):
    """``(config key, spec)`` for every weights spec in ``cfg`` (``weights``, ``base_weights``,
    ``backbone_weights``, ``init``)."""
    if isinstance(cfg, dict):
        for key, value in cfg.items():
            path = f"{where}.{key}" if where else str(key)
            if key in WEIGHT_KEYS and isinstance(value, str):
                yield path, value
            else:
                yield from weight_specs(value, path)
    elif isinstance(cfg, list):
        for i, value in enumerate(cfg):
            yield from weight_specs(value, f"{where}[{i}]")


def model_specs(cfg: Any, where: str = ""):
    """``(config key, mapping)`` for every mapping in ``cfg`` that holds a ``weights`` spec (a
    model entry: a detector, a codec)."""
    if isinstance(cfg, dict):
        if isinstance(cfg.get("weights"), str):
            yield where, cfg
        for key, value in cfg.items():
            yield from model_specs(value, f"{where}.{key}" if where else str(key))
    elif isinstance(cfg, list):
        for i, value in enumerate(cfg):
            yield from model_specs(value, f"{where}[{i}]")


def one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(lines) < 2 else f"{text} {' '.join(lines[1:3])[:240]}…"


def check_weights(cfg: dict, models: list[tuple[str, dict, Any]] = (), produced: set[str] = frozenset()) -> None:
    """Every weights spec of a job, checked on the driver before any worker starts, so a bad one
    fails in one line naming the config key, the file and the fix — not as a worker's traceback:
    resolved (a missing file, an unknown ``trained:`` label, an unreachable URL), read the way the
    workers will read it, running nothing in it (a checkpoint that holds code or is no checkpoint
    is refused), and, for each ``(config key, spec mapping, build)`` in ``models``, loaded into
    the architecture the mapping names by ``build()`` — the builder the workers use (wrong
    architecture, wrong class count). Models whose weights are random or a hub name (published
    checkpoints fetched where they run) are not built here, nor are those in ``produced`` (weights
    the job itself makes before it uses them, e.g. ``trained:<label>`` of an earlier stage)."""
    for key, spec in weight_specs(cfg):
        try:
            if names_a_file(spec) and spec not in produced:
                resolved = resolve(spec)
                check_readable(resolved.path)
        except WeightsUnavailable as exc:
            raise SystemExit(f"{key}: {one_line(exc)}") from None
    built = set()
    for key, mapping, build in models:
        specs = [spec for _, spec in weight_specs(mapping) if spec not in produced]
        if not any(names_a_file(spec) for spec in specs) or json.dumps(mapping, sort_keys=True, default=str) in built:
            continue
        built.add(json.dumps(mapping, sort_keys=True, default=str))
        try:
            build()
        except ConfigError:
            raise
        except (WeightsUnavailable, RuntimeError, ValueError, KeyError) as exc:
            raise SystemExit(weights_misfit(key, mapping, exc)) from None


def weights_misfit(key: str, mapping: dict, exc: BaseException) -> str:
    """One line: the weights of the model at ``key`` do not load into the architecture it names."""
    files = ", ".join(spec for _, spec in weight_specs(mapping) if names_a_file(spec))
    name = mapping.get("name")
    fix = (f"point {key}'s weights at ones trained for {name} with these classes, or set {key}.name to the "
           "architecture they were trained for" if name else f"point {key} at weights trained for this model")
    return f"{key}: its weights ({files}) do not load into {name or 'the model'}: {one_line(exc)} — {fix}"


def guard_params(out_dir: str | Path, params: dict[str, Any]) -> None:
    """Refuse to resume into an ``out_dir`` whose outputs were made with other job parameters or
    other weights (compared by sha256, not by name): skipping its finished images would mix two
    settings in one output set."""
    storage = Storage(out_dir)
    current = json.loads(json.dumps({**params, "weights_sha256": weight_digests(params)}, sort_keys=True,
                                    default=str))
    if storage.exists("job_params.json"):
        previous = json.loads(storage.read_text("job_params.json"))
        if previous != current:
            changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
            raise SystemExit(f"{out_dir} holds outputs made with other parameters (changed: {changed}); "
                             "use a new out_dir, or delete this one to start over")
    storage.write_text("job_params.json", json.dumps(current, indent=2, sort_keys=True))


def start_ray(cfg: dict[str, Any], address: str | None) -> None:
    """Connect to (or start) Ray; under ``ray job submit --working-dir``, check that every node
    runs the uploaded code."""
    ray_cfg = cfg.get("ray", {}) or {}
    init_ray(address=address or ray_cfg.get("address"), num_cpus=ray_cfg.get("num_cpus"),
             node_ip_address=ray_cfg.get("node_ip_address"), dashboard=ray_cfg.get("dashboard"))
    try:
        check_code_origin()
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from exc


def run_resumable(refs: list[dict], unit_size: int, stage_cls: type, stage_kwargs: dict, out_dir: str | Path,
                  extra_schema, workers: dict[str, Any], pre_stage: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the job's images (``refs``) that have no manifest row yet, in units of ``unit_size``,
    then consolidate the manifest of ``refs``. Counts: ``done`` / ``failed`` (ok / error rows of
    this run), ``skipped`` (rows from earlier runs), ``not_run`` (images of units that failed as
    a whole: the next run retries them; ``failed_units`` says why)."""
    store = ManifestStore(out_dir, extra_schema)
    done_before = store.done_source_ids()
    selected = {r["source_id"] for r in refs}
    units = work_units(refs, unit_size, done=done_before)
    print(f"[icm] {len(refs)} images: {len(selected & done_before)} already done, {len(units)} unit(s) to run",
          flush=True)
    start = time.time()
    results = run_units(units, stage_cls, stage_kwargs, workers=workers, pre_stage=pre_stage)
    elapsed = time.time() - start
    manifest = store.consolidate(source_ids=selected) if store.done_units() else None
    rows = [r for res in results for r in res["rows"]]
    size = {u["unit_id"]: len(u["refs"]) for u in units}
    failed_units = [{"unit_id": res["unit_id"], "images": size.get(res["unit_id"], 0), "reason": res["failure"]}
                    for res in results if res["failure"]]
    counts = {"done": sum(r["status"] == "ok" for r in rows),
              "failed": sum(r["status"] == "error" for r in rows),
              "skipped": len(selected & done_before),
              "not_run": sum(u["images"] for u in failed_units)}
    errors = [f"{r['source_id']}: {r['error']}" for r in rows if r["status"] == "error"]
    if failed_units and manifest is None:
        raise SystemExit(f"no unit finished: all {len(failed_units)} failed as a whole, e.g. "
                         f"{failed_units[0]['reason']}; fix the cause and rerun the same command")
    if failed_units:
        print(f"[icm] {len(failed_units)} unit(s) failed as a whole ({counts['not_run']} images not run); "
              "rerun the same command to retry them:", flush=True)
        for u in failed_units[:10]:
            print(f"  {u['unit_id']} ({u['images']} images): {u['reason']}", flush=True)
    return {"rows": rows, "counts": counts, "errors": errors, "elapsed_s": elapsed,
            "manifest": manifest, "failed_units": failed_units,
            "rows_outside_selection": len(done_before - selected),
            "units_run": len(units), "units_failed": len(failed_units),
            "images_per_s": (counts["done"] + counts["failed"]) / elapsed if elapsed > 0 and rows else 0.0}


def exit_status(summary: dict[str, Any]) -> None:
    """End a driver: non-zero when units failed as a whole (a storage fault, CUDA out of memory:
    their images have no row, a rerun retries them), or when every row of the job's manifest is
    an error (a wrong dataset root or image folder), so ``ray job submit`` shows it."""
    failed = summary.get("failed_units") or []
    if failed:
        raise SystemExit(f"{len(failed)} unit(s) failed as a whole ({failed[0]['reason']} …); the summary lists "
                         "them; rerun the same command to retry them")
    if summary.get("manifest"):
        counts, first_error = status_counts(summary["manifest"])
        if counts.get("error") and not counts.get("ok"):
            raise SystemExit(f"every image of the job is an error row ({counts['error']} in {summary['manifest']}), "
                             f"e.g. {first_error}; check the dataset's paths")


def job_command() -> str:
    """The command line that runs this job, as a user would type it again (for the record and the
    results page): the interpreter, relative to the working directory when inside it, and the arguments."""
    python = sys.executable
    if python.startswith(os.getcwd() + os.sep):
        python = os.path.relpath(python)
    return shlex.join([python, *sys.argv])


def write_summary(out_dir: str | Path, summary: dict[str, Any], title: str) -> str:
    storage = Storage(out_dir)
    path = storage.display("summary.json")
    summary.setdefault("command", job_command())
    summary.setdefault("cwd", os.getcwd())
    storage.write_text("summary.json", json.dumps(summary, indent=2, sort_keys=True, default=str))
    print(f"\n== {title} ==")
    for key, value in summary.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k:<28} {v}")
        elif not isinstance(value, list) and key not in ("command", "cwd"):
            print(f"{key:<30} {value}")
    print(f"summary written to {path}")
    return path


__all__ = ["REPO", "parse_args", "resolve_config", "check_weights", "model_specs", "weights_misfit", "guard_params", "start_ray", "run_resumable",
           "write_summary", "write_resolved", "exit_status", "job_command"]
