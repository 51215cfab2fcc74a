"""Rate-distortion sweeps on Ray Tune: a grid of rate points (λ, CompressAI quality) × variants
(machine targets, λ_clip, base architecture, …). Each trial trains one codec through the
project's Ray Train harness (Train V2 inside a Tune function trainable) and evaluates it with real
bitstreams (bpp, PSNR, MS-SSIM, mAP of seen and unseen detectors on the machine decode). The
sweep ends with one CompressAI-style results JSON per curve (and per anchor), ``rd.png`` and a
BD-rate table against the chosen anchor.

    python tuning/sweep_rd.py --config tuning/configs/ugicm_rd.yaml [--profile demo] [key=value ...]
    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python tuning/sweep_rd.py --config ...

Rerunning the same command resumes the sweep: finished trials are not rerun, unfinished ones
resume from their last Ray Train checkpoint. Watch it in the Ray dashboard (Jobs; Train runs per
trial) and in TensorBoard: ``tensorboard --logdir <out_dir>/trials`` (training scalars per trial;
the HParams tab has one row per trial with its rate point, variant and final bpp / PSNR / mAP).
"""

from __future__ import annotations

import json
import sys
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "pipelines"), str(REPO / "tuning")]

from common import (check_weights, guard_params, parse_args, resolve_config, start_ray,  # noqa: E402,I001
                    write_resolved, write_summary)
from rd_report import report  # noqa: E402
import train_codec  # noqa: E402

from icm import console  # noqa: E402
from icm.config import load_section  # noqa: E402
from icm.data.ray_io import run_on_worker  # noqa: E402
from icm.data.storage import Storage  # noqa: E402
from icm.maa.stage import build_from_spec  # noqa: E402
from icm.metrics.codec_eval import evaluate_locally  # noqa: E402
from icm.metrics.rd import SPANS  # noqa: E402
from icm.train.ray_trainer import per_rate_point_asha, trial_progress  # noqa: E402
from icm.train.rd_sweep import (bootstrap_bd_markdown, bootstrap_bd_table, compressai_curve,  # noqa: E402
                                evaluation_images, evaluation_params, point_metrics, rd_trial, trial_id)

SWEEP_KEYS = ("train", "rate_points", "variants", "evaluate", "anchors")


def check_sweep(cfg: dict) -> None:
    for kind in ("rate_points", "variants"):
        names = [e.get("name") for e in cfg.get(kind) or []]
        if not names or not all(names) or len(set(names)) != len(names):
            raise SystemExit(f"{kind}: give a non-empty list of entries with unique names (got {names})")
    anchor = (cfg.get("report") or {}).get("anchor")
    labels = [a["label"] for a in cfg.get("anchors") or []] + [v["name"] for v in cfg["variants"]]
    if anchor and anchor not in labels:
        raise SystemExit(f"report.anchor {anchor!r} is none of the anchors or variants {labels}")
    span = (cfg.get("report") or {}).get("span", "union")
    if span not in SPANS:
        raise SystemExit(f"report.span {span!r} is none of {SPANS}: the overlap a BD figure needs is a share of both "
                         "curves' range (union) or of each test curve's (test)")


def anchor_curves(cfg: dict, store: Storage, detectors: list[str]) -> dict[str, str]:
    """Each anchor (a ladder: JPEG, HEVC, …) evaluated once on the sweep's images, on a worker."""
    paths = {}
    refs, classes = evaluation_images(cfg)
    for spec in cfg.get("anchors") or []:
        label = spec["label"]
        rel = f"curves/{label}.json"
        if not store.exists(rel):
            points = run_on_worker(evaluate_locally, evaluation_params(cfg, [spec]), refs,
                                   store.display(f"anchors/{label}"), classes,
                                   num_cpus=float((cfg.get("resources") or {}).get("anchor_cpus", 1)))
            curve = compressai_curve(label, f"{label} anchor on {len(refs)} images, {json.dumps(spec)}",
                                     point_metrics(points, label, detectors), detectors)
            store.write_text(rel, json.dumps(curve, indent=2))
        paths[label] = store.display(rel)
    return paths


def tuner(cfg: dict, experiment: str):
    """A new Tuner over the grid, or the interrupted one restored (finished trials stay finished)."""
    from ray import tune

    resources = cfg.get("resources") or {}
    trainable = tune.with_resources(rd_trial, {"CPU": float(resources.get("trial_cpus", 0.05))})
    path = f"{experiment.rstrip('/')}/{cfg['name']}"
    if tune.Tuner.can_restore(path):
        print(f"[icm] resuming the sweep stored at {path}", flush=True)
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    scheduler = None
    if cfg.get("scheduler"):
        scheduler = per_rate_point_asha(cfg["scheduler"], int(cfg["train"]["steps"]))
    return tune.Tuner(
        trainable,
        param_space={"sweep": cfg, "rate_point": tune.grid_search([r["name"] for r in cfg["rate_points"]]),
                     "variant": tune.grid_search([v["name"] for v in cfg["variants"]])},
        tune_config=tune.TuneConfig(max_concurrent_trials=int(resources.get("max_concurrent_trials", 1)),
                                    scheduler=scheduler),
        run_config=tune.RunConfig(name=cfg["name"], storage_path=experiment,
                                  failure_config=tune.FailureConfig(max_failures=int(resources.get("max_failures", 1))),
                                  callbacks=[trial_progress(f"sweep {cfg['name']}", len(cfg["rate_points"])
                                                            * len(cfg["variants"]), int(cfg["train"]["steps"]))],
                                  verbose=None if console.is_verbose() else 0))   # 0: our line, not Tune's tables


def resolve_train(cfg: dict) -> None:
    """``train: {from: <train_codec YAML>, profile: <name>, ...overrides}`` → the full mapping."""
    cfg["train"] = load_section(cfg["train"], REPO)
    cfg["train"].pop("profiles", None)


def run(cfg: dict, address: str | None = None) -> dict:
    resolve_train(cfg)
    check_sweep(cfg)
    _, eval_classes = evaluation_images(cfg)
    canvas = int(cfg["evaluate"].get("canvas", 512))
    check_weights(cfg, [(f"evaluate.detectors[{i}]", spec, partial(build_from_spec, spec, eval_classes, canvas))
                        for i, spec in enumerate(cfg["evaluate"].get("detectors") or [])])
    base = None
    if cfg.get("base_codec"):   # every rate point fine-tunes from one base codec, trained once per recipe
        base = train_codec.train_once(cfg["base_codec"], address, cfg.get("ray") or {}, what="base codec")
        cfg["train"]["codec"] = {**cfg["train"]["codec"], "weights": base["weights"], "base_weights": None}
    store = Storage(cfg["out_dir"])
    cfg["out_dir"] = store.display()      # trials write there: an absolute path or a URI
    guard_params(cfg["out_dir"], {k: cfg.get(k) for k in SWEEP_KEYS} | {"name": cfg["name"]})
    write_resolved(cfg, cfg["out_dir"])
    start_ray(cfg, address)
    start = time.time()
    detectors = [d.get("label") or d["name"] for d in cfg["evaluate"].get("detectors", [])]
    anchors = anchor_curves(cfg, store, detectors)
    results = tuner(cfg, store.display("tune")).fit()
    trials, failed = [], []
    for result in results:
        tid = trial_id(result.config["variant"], result.config["rate_point"])
        rel = f"trials/{tid}/result.json"
        if result.error or not store.exists(rel):
            failed.append({"trial": tid, "reason": str(result.error or "no result.json")[:500]})
        else:
            trials.append(json.loads(store.read_text(rel)))
    curves = dict(anchors)
    for variant in cfg["variants"]:
        points = [t for t in trials if t["variant"] == variant["name"]]
        if points:
            curve = compressai_curve(variant["name"], variant.get("description") or json.dumps(variant.get("set", {})),
                                     points, detectors, extra={"rate_point": [p["rate_point"] for p in points]})
            store.write_text(f"curves/{variant['name']}.json", json.dumps(curve, indent=2))
            curves[variant["name"]] = store.display(f"curves/{variant['name']}.json")
    anchor = (cfg.get("report") or {}).get("anchor") or next(iter(curves))
    span = (cfg.get("report") or {}).get("span", "union")
    rep = report(list(curves.values()), anchor, store.display(), span) if len(curves) > 1 else {}
    bootstrap = None
    if (cfg.get("report") or {}).get("bootstrap") and not failed and anchor in anchors:
        bootstrap = bootstrap_bd_table(cfg, anchor)
        store.write_text("bd_bootstrap.json", json.dumps(bootstrap, indent=2, default=float))
        store.write_text("bd_bootstrap.md", bootstrap_bd_markdown(bootstrap))
        print("\n" + bootstrap_bd_markdown(bootstrap))
    summary = {"job": "sweep_rd", "name": cfg["name"], "trials_finished": len(trials),
               "trials_total": len(cfg["rate_points"]) * len(cfg["variants"]), "failed_trials": failed,
               "curves": curves, "figure": rep.get("figure"), "bd_table": rep.get("bd_table"),
               "bd_bootstrap": store.display("bd_bootstrap.md") if bootstrap else None,
               "base_codec": base and {k: base.get(k) for k in ("weights", "sha256", "steps", "recipe", "runner",
                                                                 "trained_now_s")},
               "points": [{k: t[k] for k in ("trial", "bpp", "psnr", "ms_ssim", *[f"map50/{d}" for d in detectors])}
                          for t in sorted(trials, key=lambda t: (t["variant"], t["bpp"]))],
               "wall_s": round(time.time() - start, 1),
               "tensorboard": f"tensorboard --logdir {store.display('trials')}"}
    write_summary(cfg["out_dir"], summary, f"RD sweep {cfg['name']}")
    return summary


def main() -> None:
    args = parse_args(__doc__, "tuning/configs/ugicm_rd.yaml")
    summary = run(resolve_config(args), args.address)
    if summary["failed_trials"]:
        raise SystemExit(f"{len(summary['failed_trials'])} trial(s) failed ({summary['failed_trials'][0]['reason'][:200]} "
                         "…); rerun the same command to retry them")


if __name__ == "__main__":
    main()
