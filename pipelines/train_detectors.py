"""Train the detectors the MAA demo uses, on the built-in shapes set, and cache their weights
outside the clone (``$ICM_WEIGHTS_DIR/trained/<label>.{pt,pth}`` + ``<label>.json``).

    python pipelines/train_detectors.py --config pipelines/configs/detectors_shapes.yaml

YOLO trains with ultralytics' own trainer (as a Ray task); torchvision Faster R-CNN and CenterNet
train with the project's Ray Train harness. A detector already in the cache is skipped; an
interrupted training resumes from its last checkpoint (same ``out_dir``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from common import check_weights, job_command, parse_args, resolve_config, start_ray, write_resolved

from icm.config import canonical_json
from icm import console
from icm.data.ray_io import live_progress, run_on_worker
from icm.data.readers import build_reader
from icm.data.samples import SHAPES_VERSION
from icm.data.storage import Storage
from icm.data.yolo_format import export_yolo
from icm.detectors.evaluate import evaluate_detector
from icm.train.detectors import crop_stream, record_stream, train_backbone_loop, train_detector_loop, train_yolo
from icm.train.ray_trainer import final_state, fit
from icm.zoo import build_detector
from icm.zoo.weights import WeightsUnavailable, publish_trained, resolve, trained_dir


def _dataset_spec(cfg: dict, spec: dict, split: str) -> dict:
    return {**cfg["dataset"], "domain": spec["domain"], "split": split}


def train_one(cfg: dict, spec: dict, out_dir: Path, workers: dict, run: str) -> tuple[bytes, str, float, list | None]:
    """The trained weights (file bytes), their suffix, the run's training seconds over all its
    sessions (a finished run found again costs nothing now, but its time is what it took) and the
    steps it was resumed at (None for ultralytics runs: its trainer resumes at its last epoch and
    keeps no such record). ``run`` names the training run (label + recipe key): an interrupted run
    of the same recipe resumes — the harness's to the uninterrupted run's weights, bit for bit —
    another recipe starts afresh."""
    canvas = int(spec.get("canvas", cfg["canvas"]))
    train_reader = build_reader(_dataset_spec(cfg, spec, "train"))
    classes = train_reader.classes
    loop_cfg = {**{k: v for k, v in spec.items() if k not in ("label", "domain", "trainer")},
                "classes": classes, "canvas": canvas, "seed": spec.get("seed", cfg.get("seed", 0)),
                "threads": workers.get("threads")}
    if spec.get("trainer", "ray") == "ultralytics":
        data_yaml = export_yolo({"train": train_reader, "val": build_reader(_dataset_spec(cfg, spec, "val"))},
                                out_dir / "yolo-data" / spec["domain"])
        device = "0" if workers.get("use_gpu") else "cpu"
        with live_progress(f"training {spec['label']}", "batches") as progress:
            best = run_on_worker(train_yolo, {**loop_cfg, "run_name": run, "device": device}, str(data_yaml),
                                 str((out_dir / "ultralytics").resolve()), progress,
                                 num_gpus=1 if workers.get("use_gpu") else 0, num_cpus=workers.get("cpus_per_worker", 1))
        # ultralytics' results.csv: one row per epoch, ``time`` = seconds since the run began
        # (resumes included)
        rows = (Path(best).parents[1] / "results.csv").read_text().strip().splitlines()
        header = [c.strip() for c in rows[0].split(",")]
        return Path(best).read_bytes(), ".pt", float(rows[-1].split(",")[header.index("time")]), None
    else:
        refs = [r.to_dict() for r in train_reader.refs()]
        per_worker = len(refs) // max(int(workers.get("num_workers", 1)), 1)
        loop_cfg["total_steps"] = int(spec["epochs"]) * (per_worker // int(spec.get("batch_size", 8)))
        # a few hundred small images: decoded in the train workers (record_stream)
        result = fit(train_detector_loop, loop_cfg, name=run, storage_path=out_dir / "ray-train",
                     streams={"train": record_stream(refs, int(loop_cfg["seed"]))},
                     num_workers=workers.get("num_workers", 1), use_gpu=workers.get("use_gpu", False),
                     cpus_per_worker=workers.get("cpus_per_worker", 1), label=spec["label"])
        if result.error:
            raise SystemExit(f"training {run} failed: {result.error}")
        state = final_state(result)
        buf = io.BytesIO()
        torch.save(state["model"], buf)
        return buf.getvalue(), ".pth", float(state.get("train_s", 0.0)), list(state.get("resumed_at", []))


def cache_key(cfg: dict, spec: dict) -> str:
    """What a cached detector was trained from: its entry, its training data (and the sample
    generator's version for the built-in sets). Another key → retrain, never reuse silently."""
    data = _dataset_spec(cfg, spec, "train")
    version = {"shapes": SHAPES_VERSION}.get(data.get("type"))
    trained_from = {k: v for k, v in spec.items() if k != "min_map50"}   # a new target needs no retraining
    starts = {}     # weights it starts from (another cached detector, a pretrained backbone): part of the recipe
    for ref in (spec.get("init"), (spec.get("model_kwargs") or {}).get("backbone_weights")):
        if ref:
            try:
                starts[ref] = resolve(ref).sha256
            except WeightsUnavailable:
                starts[ref] = "missing"
    return hashlib.sha256(canonical_json({"spec": trained_from, "dataset": data, "data_version": version,
                                          "canvas": cfg["canvas"], "starts": starts}).encode()).hexdigest()


def cached(cfg: dict, spec: dict) -> tuple[str, dict | None]:
    """``spec``'s recipe key, and its cached info when the cache holds weights of that recipe."""
    key = cache_key(cfg, spec)
    info_path = trained_dir() / f"{spec['label']}.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else None
    if info and info.get("cache_key") == key and not cfg.get("force"):
        print(f"[icm] {spec['label']}: cached ({info['weights']})", flush=True)
        return key, info
    if info:
        print(f"[icm] {spec['label']}: the cached weights were trained from another recipe (entry, data version "
              "or starting weights) or force=true; retraining", flush=True)
    return key, None


def train_backbone(cfg: dict, spec: dict, out_dir: Path, workers: dict) -> dict:
    """Pretrain a ResNet trunk on object crops of the domain's train split (``backbones:``);
    cached as ``trained:<label>`` like a detector; its val crop accuracy is its figure."""
    from icm.train.detectors import object_crops

    label = spec["label"]
    key, info = cached(cfg, spec)
    if info:
        return info
    print(f"[icm] pretraining backbone {label} ({spec['name']} on object crops)", flush=True)
    reader = build_reader(_dataset_spec(cfg, spec, "train"))
    loop_cfg = {**{k: v for k, v in spec.items() if k not in ("label", "domain")}, "classes": reader.classes,
                "seed": spec.get("seed", cfg.get("seed", 0)), "threads": workers.get("threads")}
    stream = crop_stream([r.to_dict() for r in reader.refs()], len(reader.classes), int(spec.get("crop", 64)),
                         int(loop_cfg["seed"]))
    start = time.time()
    result = fit(train_backbone_loop, loop_cfg, name=f"{label}-{key[:12]}", storage_path=out_dir / "ray-train",
                 streams={"train": stream}, num_workers=workers.get("num_workers", 1), use_gpu=workers.get("use_gpu", False),
                 cpus_per_worker=workers.get("cpus_per_worker", 1), label=label)
    final = final_state(result)
    elapsed = max(time.time() - start, float(final.get("train_s", 0.0)))   # as for detectors (main)
    state = final["model"]
    net = torchvision.models.get_model(spec["name"], weights=None, num_classes=len(reader.classes) + 1)
    net.load_state_dict(state)
    net.eval()
    rng = np.random.default_rng(0)
    crops = [c for rec in build_reader(_dataset_spec(cfg, spec, "val")).records() if rec["status"] == "ok"
             for c in object_crops({**rec, "num_classes": len(reader.classes)}, rng, int(spec.get("crop", 64)), 1)]
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        right = sum(int((net((torch.stack([c for c, _ in crops[i:i + 64]]) - mean) / std).argmax(1)
                         == torch.tensor([y for _, y in crops[i:i + 64]])).sum()) for i in range(0, len(crops), 64))
    buf = io.BytesIO()
    torch.save(state, buf)
    info = {"label": label, "spec": spec, "dataset": _dataset_spec(cfg, spec, "train"), "cache_key": key,
            "weights": str(trained_dir() / f"{label}.pth"), "sha256": hashlib.sha256(buf.getvalue()).hexdigest(),
            "train_time_s": round(elapsed, 1), "val": {"crop_accuracy": right / max(len(crops), 1)},
            "config": json.loads(canonical_json(cfg))}
    publish_trained(label, buf.getvalue(), ".pth", info)
    print(f"[icm] {label}: val crop accuracy {info['val']['crop_accuracy']:.3f} ({len(crops)} crops, "
          f"{elapsed:.0f} s)", flush=True)
    return info


def evaluate_on(cfg: dict, spec: dict, weights: str, domain: str) -> dict:
    val = build_reader({**cfg["dataset"], "domain": domain, "split": "val"})
    canvas = int(spec.get("canvas", cfg["canvas"]))
    det = build_detector(spec["name"], val.classes, weights=weights, image_size=canvas,
                         **(spec.get("model_kwargs") or {})).freeze()
    return evaluate_detector(det, list(val.records()), canvas)


def check_starting_weights(cfg: dict) -> None:
    """The weights detectors start from (``init``, ``model_kwargs.backbone_weights``), checked on
    the driver before anything trains, except those this job trains itself first."""
    produced = {f"trained:{spec['label']}" for spec in (cfg.get("backbones") or []) + cfg["detectors"]}
    models = []
    for i, spec in enumerate(cfg["detectors"]):
        canvas = int(spec.get("canvas", cfg["canvas"]))

        def build(spec=spec, canvas=canvas):
            classes = build_reader(_dataset_spec(cfg, spec, "train")).classes
            return build_detector(spec["name"], classes, weights=spec.get("init", "random"), image_size=canvas,
                                  **(spec.get("model_kwargs") or {}))

        models.append((f"detectors[{i}]", spec, build))
    check_weights(cfg, models, produced)


def main() -> None:
    args = parse_args(__doc__, "pipelines/configs/detectors_shapes.yaml")
    cfg = resolve_config(args)
    out_dir = Path(cfg["out_dir"]).resolve()
    check_starting_weights(cfg)
    write_resolved(cfg, out_dir)
    start_ray(cfg, args.address)
    workers = cfg.get("workers", {})
    started = time.time()
    backbones = [train_backbone(cfg, spec, out_dir, workers) for spec in cfg.get("backbones") or []]
    table = []
    for spec in cfg["detectors"]:
        label = spec["label"]
        key, info = cached(cfg, spec)
        if not info:
            print(f"[icm] training {label} ({spec['name']}, {spec.get('trainer', 'ray')})", flush=True)
            start = time.time()
            data, suffix, run_s, resumed_at = train_one(cfg, {**spec, "init": str(resolve(spec["init"]).path)}
                                            if spec.get("init") else spec, out_dir, workers, run=f"{label}-{key[:12]}")
            # this session's wall clock (start-up included); for a run found finished, its own time
            elapsed = max(time.time() - start, run_s)
            with tempfile.TemporaryDirectory() as tmp:
                candidate = Path(tmp) / f"{label}{suffix}"
                candidate.write_bytes(data)
                metrics = evaluate_on(cfg, spec, str(candidate), spec["domain"])
            info = {"label": label, "spec": spec, "dataset": _dataset_spec(cfg, spec, "train"), "cache_key": key,
                    "weights": str(trained_dir() / f"{label}{suffix}"), "sha256": hashlib.sha256(data).hexdigest(),
                    "train_time_s": round(elapsed, 1), "resumed_at": resumed_at, "val": metrics,
                    "config": json.loads(canonical_json(cfg))}
            publish_trained(label, data, suffix, info)
        table.append({"label": label, "model": spec["name"], "domain": spec["domain"], "train_s": info["train_time_s"],
                      "map50": info["val"]["map50"], "target": spec.get("min_map50"), "weights": info["weights"]})
    domains = sorted({spec["domain"] for spec in cfg["detectors"]})
    cross = {}
    if cfg.get("cross_domain") and len(domains) > 1:   # each detector on every domain's val split
        with console.Progress("cross-domain evaluation", len(table) * (len(domains) - 1), "evaluations") as line:
            for row, spec in zip(table, cfg["detectors"]):
                cross[row["label"]] = {spec["domain"]: row["map50"]}
                for d in (d for d in domains if d != spec["domain"]):
                    cross[row["label"]][d] = evaluate_on(cfg, spec, row["weights"], d)["map50"]
                    line.advance(note=row["label"])
    for info in backbones:
        print(f"backbone {info['label']}: val crop accuracy {info['val']['crop_accuracy']:.3f}, "
              f"{info['train_time_s']:.0f} s")
    print(f"\n{'detector':<20}{'model':<34}{'domain':<8}{'train s':>9}{'val mAP@.5':>12}{'target':>8}"
          + "".join(f"{'on ' + d:>11}" for d in (domains if cross else [])))
    for row in table:
        status = "" if row["target"] is None else ("  ok" if row["map50"] >= row["target"] else "  BELOW TARGET")
        print(f"{row['label']:<20}{row['model']:<34}{row['domain']:<8}{row['train_s']:>9.1f}{row['map50']:>12.3f}"
              f"{'' if row['target'] is None else format(row['target'], '>8.2f')}"
              + "".join(f"{cross[row['label']][d]:>11.3f}" for d in (domains if cross else [])) + status)
    print(f"training time of these weights: {sum(r['train_s'] for r in table) + sum(b['train_time_s'] for b in backbones):.0f} s "
          f"(this run: {time.time() - started:.0f} s with evaluation); weights under {trained_dir()}")
    Storage(str(out_dir)).write_text("detectors.json", json.dumps({"detectors": table, "cross_domain": cross,
                                                                       "backbones": backbones, "command": job_command(),
                                                                       "cwd": os.getcwd()}, indent=2))
    print(f"detectors written to {out_dir / 'detectors.json'}")
    below = [r for r in table if r["target"] is not None and r["map50"] < r["target"]]
    if below:
        raise SystemExit("detector(s) below their val mAP@.5 target: " + ", ".join(
            f"{r['label']} {r['map50']:.3f} < {r['target']}" for r in below)
            + f". Every job that uses them would report noise. Retrain (force=true) with more epochs in {args.config},"
              f" or delete {trained_dir()}/<label>.json")


if __name__ == "__main__":
    main()
