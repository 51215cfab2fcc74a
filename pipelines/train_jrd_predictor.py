"""Train the OW-JRD predictor (IEEE TMM 2023) on Ray Train, evaluate it as the authors do, and use
it for JRD-guided compression.

    python pipelines/train_jrd_predictor.py --config pipelines/configs/jrd_predictor.yaml [--profile demo]

Input: the OW-JRD job's output — its parquet shards (``source.run_dir`` + ``source.ladder``) or
its authors'-layout export (``source.export_dir``). The pairs reach the train workers shuffled at
the row level, in an order that is a function of (seed, epoch) (``icm.train.jrd.pair_stream``;
``data.shuffle_window`` unit shards mixed at a time), decoded by Ray Data on CPU workers;
checkpoints under ``out_dir/ray-train/<name>`` (rerun = resume, inside an epoch too). Then, on the test split: per-object JRD from
the ordered per-level predictions with the error-tolerance rule, MAE overall / by area / by class,
per-level label accuracy, ``jrd_scatter.png``; and, when the run's images are at hand, JRD-guided
compression: per image the coarsest level keeping ``guided.share`` of its objects recognised by
their predicted (and, for reference, true) JRD, the detector re-run on those decodes, bits against
the uniform level that keeps the same share recognised.
"""

from __future__ import annotations

import io
import json
import time
from functools import partial

import numpy as np
import torch
from common import check_weights, parse_args, resolve_config, start_ray, write_resolved, write_summary

from icm.data.readers import build_reader
from icm.data.storage import Storage
from icm.data.writers import figure_png
from icm.jrd.predictor import (baseline_comparison, build_predictor, count_pairs, decode_pair, guided_compression,
                               jrd_metrics, object_jrds, run_splits, split_objects, split_pairs)
from icm.train.jrd import pair_stream, predict_pairs, train_jrd_loop
from icm.train.ray_trainer import final_state, fit

LOOP_KEYS = ("canvas", "backbone_weights", "batch_size", "lr", "momentum", "weight_decay", "checkpoint_every",
             "log_every", "seed", "threads")


def predict_split(model, source: dict, split: str, canvas: int, split_of: dict | None, chunk: int = 64) -> list[dict]:
    """Every pair of a split with its predicted label, decoded and predicted ``chunk`` pairs at a
    time (the crops are dropped after each chunk: a COCO-sized test split fits in memory)."""
    out, pending = [], []

    def flush():
        decoded = [{**r, **decode_pair(r, canvas)} for r in pending]
        for row, prediction in zip(pending, predict_pairs(model, decoded)):
            out.append({**{k: v for k, v in row.items() if not k.endswith("_png") and k not in ("original", "distorted")},
                        "prediction": prediction})
        pending.clear()
    for ref in split_pairs(source, split, split_of):
        pending.append(ref)
        if len(pending) == chunk:
            flush()
    if pending:
        flush()
    return out


def scatter(objects: list[dict], levels: int) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    true = np.array([o["jrd"] for o in objects])
    pred = np.array([o["jrd_predicted"] for o in objects])
    jitter = np.random.default_rng(0).uniform(-0.25, 0.25, (2, len(objects)))
    ax.scatter(true + jitter[0], pred + jitter[1], s=10, alpha=0.6)
    ax.plot([0, levels - 1], [0, levels - 1], color="gray", lw=0.8)
    ax.set_xlabel("true JRD (level)")
    ax.set_ylabel("predicted JRD (level)")
    ax.set_title(f"OW-JRD predictor on {len(objects)} test objects", fontsize=9)
    fig.tight_layout()
    return figure_png(fig)


def guided_from_run(run_dir: str, ladder_name: str, objects: list[dict], share: float) -> dict:
    """``icm.jrd.predictor.guided_compression`` on a JRD run's test images: each chosen level coded
    with the run's ladder and judged by the run's own detector and matching rule."""
    from icm.jrd.export import read_table
    from icm.jrd.labelling import match_objects
    from icm.jrd.stage import LabelStage, build_ladders

    run = Storage(run_dir)
    params = json.loads(run.read_text("job_params.json"))
    ladder = next(lad for lad in build_ladders(params["ladders"]) if lad.name == ladder_name)
    reader = build_reader(params["dataset"])
    labeller = LabelStage(run.display("guided-scratch"), {k: v for k, v in params.items() if k != "weights_sha256"},
                          reader.classes, reader.category_ids)
    image_ids = {o["source_id"] for o in objects}
    records = {r["source_id"]: r for r in reader.records(source_ids=image_ids)}
    level_rows = [r for r in read_table(run_dir, "levels", ladder_name,
                                        ["source_id", "object_index", "ladder", "level", "recognised", "box",
                                         "CategoryId"]).to_pylist() if r["source_id"] in image_ids]

    def measure(source_id: str, level: int, rows: list[dict]):
        coded = ladder.code(records[source_id]["image"], level)
        det = labeller.detect([coded.decoded])[0]
        names = [labeller.dataset_classes[r["CategoryId"]] for r in rows]
        labels = [labeller.det.classes.index((labeller.class_map or {}).get(n, n)) for n in names]
        m = match_objects([r["box"] for r in rows], labels, det["boxes"], det["scores"], det["labels"],
                          labeller.iou_threshold, labeller.score_threshold)
        return coded.num_bytes, m.recognised

    report = guided_compression(objects, level_rows, measure, share, len(ladder.levels))
    report["region_level"] = ("not done: PyAV's libx265 binding exposes no per-block QP offsets (x265's "
                              "quantOffsets / --qpfile zones are per picture there) and the learned ladders have no "
                              "spatial λ map; image-level choice only")
    return report


def run(cfg: dict, address: str | None = None) -> dict:
    storage = Storage(cfg["out_dir"])
    out_dir = storage.display()
    source = cfg["source"]
    canvas = int(cfg.get("canvas", 640))
    check_weights(cfg, [("backbone_weights", {"weights": cfg.get("backbone_weights", "random")},
                         partial(build_predictor, cfg.get("backbone_weights", "random"), canvas))])
    write_resolved(cfg, out_dir)
    split_of = None if source.get("export_dir") else run_splits(
        source["run_dir"], source["ladder"], source.get("fractions") or {"train": 0.8, "val": 0.1, "test": 0.1},
        int(source.get("seed", 0)))
    start_ray(cfg, address)
    train = pair_stream(source, "train", canvas, split_of, cfg.get("data"), int(cfg.get("seed", 0)))
    workers = cfg.get("workers") or {}
    n_train = int(cfg.get("steps") or 0) or None
    if n_train is None:   # epochs × steps per epoch (the authors: 60 epochs of batch 64); each worker
        pairs = count_pairs(source, "train", split_of)   # takes its share of every epoch
        per_step = int(cfg.get("batch_size", 64)) * int(workers.get("num_workers", 1))
        n_train = int(cfg.get("epochs", 60)) * max(1, pairs // per_step)
    loop_cfg = {k: cfg[k] for k in LOOP_KEYS if k in cfg} | {"steps": n_train}
    start = time.time()
    result = fit(train_jrd_loop, loop_cfg, name=cfg["name"], storage_path=f"{out_dir}/ray-train", streams={"train": train},
                 num_workers=int(workers.get("num_workers", 1)), use_gpu=bool(workers.get("use_gpu", False)),
                 cpus_per_worker=float(workers.get("cpus_per_worker", 1)))
    if result.error:
        raise SystemExit(f"training failed: {result.error}")
    state = final_state(result)
    buf = io.BytesIO()
    torch.save(state["model"], buf)
    storage.write_bytes("predictor.pth", buf.getvalue())
    model = build_predictor("random", canvas)
    model.load_state_dict(state["model"])
    rows = predict_split(model, source, cfg.get("evaluate_split", "test"), canvas, split_of)
    objects = object_jrds(rows)
    metrics = jrd_metrics(objects, rows)
    metrics["against_baselines"] = baseline_comparison(objects, rows, *split_objects(source, "train", split_of),
                                                       seed=int(cfg.get("seed", 0)))
    levels = max((o["levels"] for o in objects), default=1)
    storage.write_bytes("jrd_scatter.png", scatter(objects, levels))
    storage.write_text("objects.json", json.dumps(objects, indent=1))
    summary = {"job": "train_jrd_predictor", "steps": state["step"], "resumed_at": state.get("resumed_at", []),
               "train_wall_s": round(time.time() - start, 1),
               "final_metrics": {k: round(v, 4) if isinstance(v, float) else v for k, v in (result.metrics or {}).items()},
               "evaluation": metrics, "figure": storage.display("jrd_scatter.png"),
               "model": storage.display("predictor.pth")}
    guided = cfg.get("guided") or {}
    if guided.get("enabled", True) and source.get("run_dir") and objects:
        summary["guided_compression"] = guided_from_run(source["run_dir"], source["ladder"], objects,
                                                        float(guided.get("share", 0.9)))
        storage.write_text("guided_compression.json", json.dumps(summary["guided_compression"], indent=2))
    write_summary(out_dir, summary, "OW-JRD predictor")
    return summary


def main() -> None:
    args = parse_args(__doc__, "pipelines/configs/jrd_predictor.yaml")
    run(resolve_config(args), args.address)


if __name__ == "__main__":
    main()
