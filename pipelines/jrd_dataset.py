"""OW-JRD distorted-set generation on Ray Data (IEEE TMM 2023, object-wise Just Recognizable Distortion).

    python pipelines/jrd_dataset.py --config pipelines/configs/jrd_demo.yaml
    ray job submit --working-dir . -- python pipelines/jrd_dataset.py --config pipelines/configs/jrd.yaml

Every image is coded at every level of every configured ladder, and each object's crops encoded
(a CPU actor pool, ``coders.actors: auto``: as many as the CPUs allow), the detector labels every
object at every level (an actor pool on GPU shares, ``workers.actors: auto``; several label actors
without a GPU code their own units: one CPU pool), and each unit's rows
go to sharded parquet (``levels/``, ``objects/``) plus the per-image manifest. Resumable: rerun with
the same out_dir. Then the authors' layout is exported per ladder (``export/<ladder>/``).
"""

from __future__ import annotations

import time

from common import (check_weights, exit_status, guard_params, parse_args, resolve_config, run_resumable, start_ray,
                    write_resolved, write_summary)

from icm.data.readers import build_reader
from icm.data.storage import Storage
from icm.data.ray_io import select_refs
from icm.jrd.export import export_authors_layout
from icm.jrd.report import jrd_figure, jrd_stats, read_objects
from icm.jrd.stage import (JRD_COLUMNS, LabelStage, LadderStage, build_ladders, label_categories,
                            ladder_failing_everywhere, probe_ladders)
from icm.maa.stage import build_from_spec

LABEL_KEYS = ("ladders", "detector", "reference", "iou_threshold", "score_threshold", "canvas", "detect_batch",
              "device", "deterministic", "seed")


def run(cfg: dict, address: str | None = None) -> dict:
    out_dir = cfg["out_dir"]
    storage = Storage(out_dir)
    ladders = build_ladders(cfg["ladders"])  # fail on a bad ladder (or a missing VVC binary) before Ray starts
    try:
        probe_ladders(ladders)
    except RuntimeError as exc:
        raise SystemExit(f"{exc}; nothing was run") from exc
    reader = build_reader(cfg["dataset"])
    params = {k: cfg[k] for k in LABEL_KEYS if k in cfg}
    classes, category_ids = label_categories(params, reader)
    check_weights(cfg, [("detector", cfg["detector"], lambda: build_from_spec(cfg["detector"], classes, cfg["canvas"]))])
    guard_params(out_dir, {**params, "dataset": cfg["dataset"], "batch_size": cfg.get("batch_size", 2)})
    write_resolved(cfg, out_dir)
    start_ray(cfg, address)
    refs = select_refs(reader, cfg.get("limit"))
    coders = cfg.get("coders", {}) or {}
    workers = cfg.get("workers", {}) or {}
    # coders.actors auto with several label actors on CPUs: those actors code their own units (one
    # pool); a single label actor keeps a coder pool beside it, or coding would leave the other cores idle
    code_in_labellers = (coders.get("actors", 1) == "auto" and not float(workers.get("num_gpus") or 0)
                         and workers.get("actors", 1) != 1)
    if code_in_labellers:
        print("[icm] the label actors have no GPU: each codes its own units (coders.actors: auto), so coding and "
              "detection share one pool of CPU actors", flush=True)
        pre_stage = None
    else:
        pre_stage = {"cls": LadderStage,
                     "kwargs": {"ladders": cfg["ladders"], "crop_gt": params.get("reference", "gt") == "gt"},
                     "actors": coders.get("actors", 1), "max_actors": coders.get("max_actors"),
                     "num_cpus": coders.get("num_cpus", 1)}
    start = time.time()
    result = run_resumable(refs, int(cfg.get("batch_size", 2)), LabelStage,
                           {"out_dir": out_dir, "params": params, "dataset_classes": classes,
                            "category_ids": category_ids, "code_units": code_in_labellers},
                           out_dir, JRD_COLUMNS, workers, pre_stage=pre_stage)
    failing = ladder_failing_everywhere(result["rows"], [lad.name for lad in ladders])
    if failing:
        raise SystemExit(f"{failing}. Those images now have error rows in {storage.display('manifest')}: fix the "
                         "ladder, then rerun into a new out_dir (or delete this one)")
    objects = read_objects(out_dir)
    stats = jrd_stats(objects)
    object_levels = sum(s["objects"] * s["levels"] for s in stats.values())
    summary = {"job": "jrd", "dataset": reader.name, "images": result["counts"],
               "ladders": {lad.name: len(lad.levels) for lad in ladders},
               "elapsed_s": round(result["elapsed_s"], 2),
               "object_levels": object_levels,
               "object_levels_per_s_this_run": round(object_levels / result["elapsed_s"], 1)
               if not result["counts"]["skipped"] and result["elapsed_s"] > 0 else None,
               "per_ladder": stats, "manifest": result["manifest"],
               "figure": storage.display("jrd.png"), "failed_units": result["failed_units"],
               "errors": result["errors"][:20]}
    storage.write_bytes("jrd.png", jrd_figure(objects))
    export = cfg.get("export") or {}
    if export.get("enabled", True):
        summary["export"] = [
            export_authors_layout(out_dir, lad.name, storage.display(f"export/{lad.name}"),
                                  fractions=export.get("fractions"), seed=int(export.get("seed", 0)),
                                  include_unrecognised=bool(export.get("include_unrecognised", False)))
            if lad.name in stats else {"ladder": lad.name, "skipped": "no objects were labelled with this ladder"}
            for lad in ladders if lad.name in (export.get("ladders") or [lad.name])]
    summary["wall_s"] = round(time.time() - start, 1)
    write_summary(out_dir, summary, "OW-JRD summary")
    return summary


def main() -> None:
    args = parse_args(__doc__, "pipelines/configs/jrd.yaml")
    exit_status(run(resolve_config(args), args.address))


if __name__ == "__main__":
    main()
