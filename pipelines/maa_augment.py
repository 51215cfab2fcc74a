"""MAA image generation on Ray Data — AAFG, model-wise or domain-wise Meta-AAFG.

    python pipelines/maa_augment.py --config pipelines/configs/maa_model.yaml [--profile demo] [key=value ...]
    ray job submit --working-dir . -- python pipelines/maa_augment.py --config pipelines/configs/maa_domain.yaml

Reads any data-layer dataset, cuts it into fixed units (sorted by source_id, chunked by
batch_size), runs the MAA stage on an actor pool (``workers.actors: auto``: autoscaled up to every
GPU share the cluster has or can scale to; models built once per actor), writes lossless PNGs + a
parquet manifest, and is resumable: rerun with the same out_dir to finish an interrupted job.
"""

from __future__ import annotations

import json
import time

from functools import partial

from common import (check_weights, exit_status, guard_params, model_specs, parse_args, resolve_config, run_resumable,
                    start_ray, write_resolved, write_summary)

from icm import console
from icm.data.readers import build_reader
from icm.data.storage import Storage
from icm.data.writers import decode_png
from icm.data.ray_io import run_on_worker, select_refs
from icm.maa.report import manifest_stats, summary_figure
from icm.maa.stage import (MAA_COLUMNS, MAAStage, build_from_spec, check_detectors, detector_groups, detector_label,
                           largest_batch)
from icm.runtime import Precision

METHOD_KEYS = ("method", "canvas", "steps", "outer", "inner_steps", "alpha", "bound", "detectors", "domains",
               "class_map", "device", "deterministic", "precision", "seed")
AUTO_BATCH_FILE = "batch_size_auto.json"


def produced_images(storage: Storage, manifest: list[dict], source_ids=None) -> dict[str, dict]:
    """The ok manifest rows with their decoded output images (read through the storage, so an
    s3:// out_dir works too)."""
    return {r["source_id"]: {**r, "image": decode_png(storage.read_bytes(r["output_path"]))} for r in manifest
            if r["status"] == "ok" and (source_ids is None or r["source_id"] in source_ids)}


def evaluate(cfg: dict, reader, storage: Storage, manifest: list[dict]) -> list[dict]:
    """Per detector: mean training loss and mAP@.5 on the original vs the MAA images."""
    from icm.detectors.evaluate import evaluate_detector
    from icm.maa.stage import resolve_device

    seen = {detector_label(s) for g in detector_groups(cfg) for s in g["detectors"]}
    produced = produced_images(storage, manifest)
    originals = list(reader.records(source_ids=produced))
    maa = [{**produced[r["source_id"]], "boxes": r["boxes"], "class_ids": r["class_ids"],
            "class_names": r["class_names"]} for r in originals]
    device = resolve_device(cfg.get("device"))
    rows = []
    with console.Progress(f"evaluation on {len(originals)} original and MAA images", len(cfg["evaluate"]["detectors"]),
                          "detectors") as line:
        for spec in cfg["evaluate"]["detectors"]:
            det = build_from_spec(spec, reader.classes, cfg["canvas"]).to(device)
            a = evaluate_detector(det, originals, cfg["canvas"], class_map=spec.get("class_map"), device=device)
            b = evaluate_detector(det, maa, cfg["canvas"], class_map=spec.get("class_map"), device=device)
            rows.append({"detector": detector_label(spec), "in_maa_set": detector_label(spec) in seen,
                         "loss_original": round(a["loss"], 4), "loss_maa": round(b["loss"], 4),
                         "map50_original": round(a["map50"], 4), "map50_maa": round(b["map50"], 4)})
            line.advance(note=detector_label(spec))
    print(f"\n{'detector':<22}{'role':<11}{'loss orig':>10}{'loss MAA':>10}{'mAP@.5 orig':>13}{'mAP@.5 MAA':>12}")
    for r in rows:
        role = "seen" if r["in_maa_set"] else "HELD OUT"
        print(f"{r['detector']:<22}{role:<11}{r['loss_original']:>10.3f}{r['loss_maa']:>10.3f}"
              f"{r['map50_original']:>13.3f}{r['map50_maa']:>12.3f}")
    print("(seen detectors are helped by the ground truth that made the images; the held-out "
          "detector is the honest figure)")
    return rows


def resolve_batch_size(cfg: dict, params: dict, classes: list[str], storage: Storage) -> int:
    """``batch_size`` (images per unit and per batched step); ``auto``: what is fastest on a
    worker with the job's resources — on a GPU the largest batch that fits its share of the GPU,
    on a CPU the size a short timed probe finds fastest (``largest_batch``). The choice, and how it
    was made, is kept in the output folder: on GPU an image's result depends on its batch
    neighbours beyond float rounding (bench/RESULTS.md: units re-cut in halves wrote 0 of 8 PNGs
    identical on an H100), so a resumed job — perhaps on another GPU type, or a busier CPU, where a
    new probe could choose otherwise — must cut its units the same way."""
    value = cfg.get("batch_size", 4)
    if value != "auto":
        return int(value)
    if storage.exists(AUTO_BATCH_FILE):
        size = int(json.loads(storage.read_text(AUTO_BATCH_FILE))["batch_size"])
        print(f"[icm] batch_size auto: {size} images per batch, as this job's first run chose "
              f"({storage.display(AUTO_BATCH_FILE)})", flush=True)
        return size
    workers = cfg.get("workers") or {}
    choice = run_on_worker(largest_batch, params, classes, num_gpus=workers.get("num_gpus", 0),
                           num_cpus=workers.get("num_cpus", 1))
    storage.write_text(AUTO_BATCH_FILE, json.dumps(choice, indent=1, sort_keys=True))
    print(f"[icm] batch_size auto: {choice['batch_size']} images per batch on {choice['device']} "
          f"({choice['how']}: {choice.get('seconds_per_image') or choice.get('peak_reserved_gib')})", flush=True)
    return int(choice["batch_size"])


def run(cfg: dict, address: str | None = None) -> dict:
    out_dir = cfg["out_dir"]
    storage = Storage(out_dir)
    reader = build_reader(cfg["dataset"])
    params = {k: cfg[k] for k in METHOD_KEYS if k in cfg}
    params["precision"] = Precision.from_config(cfg.get("precision")).as_dict()   # resolved: the guard compares values
    check_detectors(params, reader.classes)  # fail on a bad method/detector config before starting workers
    check_weights(cfg, [(key, spec, partial(build_from_spec, spec, reader.classes, cfg["canvas"]))
                        for key, spec in model_specs({k: cfg.get(k) for k in ("detectors", "domains", "evaluate")})])
    guard_params(out_dir, {**params, "dataset": cfg["dataset"], "batch_size": cfg.get("batch_size", 4)})
    write_resolved(cfg, out_dir)
    start_ray(cfg, address)
    refs = select_refs(reader, cfg.get("limit"))
    batch_size = resolve_batch_size(cfg, params, reader.classes, storage)
    start = time.time()
    result = run_resumable(refs, batch_size, MAAStage,
                           {"out_dir": out_dir, "params": params, "dataset_classes": reader.classes},
                           out_dir, MAA_COLUMNS, cfg.get("workers", {}))
    manifest = storage.read_table("manifest.parquet").to_pylist()
    stats = manifest_stats(manifest)
    ok_ids = sorted(r["source_id"] for r in manifest if r["status"] == "ok")
    shown = set(ok_ids[: int(cfg.get("figure_images", 3))])  # decode only these
    originals = {r["source_id"]: r for r in reader.records(source_ids=shown)}
    outputs = produced_images(storage, manifest, shown)
    storage.write_bytes("summary.png", summary_figure(
        [(originals[k]["image"], outputs[k]["image"], k) for k in sorted(outputs) if k in originals]))
    summary = {"job": "maa", "method": cfg["method"], "dataset": reader.name, "images": result["counts"],
               "batch_size": batch_size, "deterministic": bool(params.get("deterministic", True)),
               "precision": params["precision"],
               "elapsed_s": round(result["elapsed_s"], 2), "images_per_s": round(result["images_per_s"], 3),
               **stats, "manifest": result["manifest"], "figure": storage.display("summary.png"),
               "wall_s": round(time.time() - start, 1), "failed_units": result["failed_units"],
               "errors": result["errors"][:20]}
    if cfg.get("evaluate"):
        summary["evaluation"] = evaluate(cfg, reader, storage, manifest)
    write_summary(out_dir, summary, f"MAA summary ({cfg['method']})")
    return summary


def main() -> None:
    args = parse_args(__doc__, "pipelines/configs/maa_model.yaml")
    exit_status(run(resolve_config(args), args.address))


if __name__ == "__main__":
    main()
