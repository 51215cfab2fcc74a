"""MAA throughput on a laptop-sized machine: the Ray pipeline at 1 and 2 workers vs a seed-style
loop (one process, batch 1, all ``--cpus`` cores as torch threads; same models, steps and images).
One command, prints images/s and the ratios to the loop.

    .venv/bin/python bench/maa_throughput.py [--images 16] [--cpus 2] [--config pipelines/configs/maa_model.yaml]
        [--profile demo] [key=value ...]

Each Ray setting gets exactly ``--cpus`` cores (``ray.num_cpus``), split evenly over its workers
(``workers.num_cpus``: torch threads per actor = its CPUs, so two 1-CPU actors never
oversubscribe two cores), and ``batch_size: auto`` as shipped: the probe on a worker with those
CPUs picks the batch (``batch_size_auto.json``; the output shows its choice and timings).
Rates: images over the pipeline's own time (actor start-up and model building included; Ray's
start and the one-off batch probe not), and end to end (everything from the call to the summary).

Speed does not depend on the weights, so detectors whose trained weights are not cached run with
random weights (said in the output). On a GPU machine set workers.num_gpus=1 device=cuda.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "pipelines"), str(REPO / "bench")]

import maa_augment  # noqa: E402
import torch  # noqa: E402

from icm.config import load_config  # noqa: E402
from icm.data.ray_io import work_units  # noqa: E402
from icm.data.readers import build_reader  # noqa: E402
from icm.data.storage import Storage  # noqa: E402
from icm.maa.stage import MAAStage  # noqa: E402
from weights import available_or_random  # noqa: E402


def seed_style_loop(cfg: dict, reader, out_dir: Path) -> float:
    """What the seed repos do: one process, one image at a time."""
    start = time.time()
    stage = MAAStage(str(out_dir), {k: cfg[k] for k in maa_augment.METHOD_KEYS if k in cfg}, reader.classes)
    for unit in work_units(reader, 1, limit=cfg["limit"]):
        stage.run_unit(unit)
    return time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "pipelines/configs/maa_model.yaml"))
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--cpus", type=int, default=2, help="cores given to each setting")
    parser.add_argument("--workers", default="1,2", help="Ray settings to run, comma-separated")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.profile, args.overrides)
    cfg["limit"] = args.images
    cfg.pop("evaluate", None)
    cfg["ray"] = {**(cfg.get("ray") or {}), "num_cpus": args.cpus}
    notes: list[str] = []
    if "detectors" in cfg:
        cfg["detectors"] = [available_or_random(s, notes) for s in cfg["detectors"]]
    for domain in cfg.get("domains") or []:
        domain["detectors"] = [available_or_random(s, notes) for s in domain["detectors"]]
    reader = build_reader(cfg["dataset"])
    tmp = Path(tempfile.mkdtemp(prefix="icm-bench-"))
    results, how = {}, {}
    try:
        torch.set_num_threads(args.cpus)
        loop_s = seed_style_loop(cfg, reader, tmp / "loop")
        results["seed_loop_batch1"] = {"pipeline": args.images / loop_s, "end_to_end": args.images / loop_s}
        for actors in [int(n) for n in args.workers.split(",")]:
            out = tmp / f"ray{actors}"
            run_cfg = {**cfg, "out_dir": str(out), "figure_images": 0,
                       "workers": {**cfg.get("workers", {}), "actors": actors, "num_cpus": args.cpus / actors}}
            start = time.time()
            summary = maa_augment.run(run_cfg)
            wall = time.time() - start
            done = summary["images"]["done"]
            results[f"ray_{actors}_workers"] = {"pipeline": done / summary["elapsed_s"], "end_to_end": done / wall}
            storage = Storage(str(out))
            manifest = storage.read_table("manifest.parquet").to_pylist()
            how[f"ray_{actors}_workers"] = {
                "batch": summary["batch_size"],
                "auto": json.loads(storage.read_text(maa_augment.AUTO_BATCH_FILE))
                if storage.exists(maa_augment.AUTO_BATCH_FILE) else "fixed",
                "torch_threads_per_actor": sorted({json.loads(r["runtime"])["threads"] for r in manifest
                                                   if r["status"] == "ok"})}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = results["seed_loop_batch1"]["pipeline"]
    print("\n== MAA throughput (images/s) ==")
    print(f"method {cfg['method']}, canvas {cfg['canvas']}, {args.images} images, batch_size "
          f"{cfg.get('batch_size')}, device {cfg.get('device', 'auto')}, {args.cpus} cores per setting")
    for name, value in results.items():
        print(f"{name:<20}{value['pipeline']:>8.3f} img/s (end to end {value['end_to_end']:.3f})   "
              f"ratio vs loop {value['pipeline'] / base:>5.2f}x (end to end {value['end_to_end'] / base:.2f}x)")
    for name, value in how.items():
        print(f"{name}: {json.dumps(value)}")
    for note in notes:
        print(f"note: {note}")
    print(json.dumps({k: {m: round(v, 4) for m, v in r.items()} for k, r in results.items()}))


if __name__ == "__main__":
    main()
