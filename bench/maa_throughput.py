"""MAA throughput: the Ray pipeline at 1 and 2 workers vs a seed-style loop (one process,
batch 1, same models, same steps, same images). One command, prints images/s and the ratios.

    .venv/bin/python bench/maa_throughput.py [--images 16] [--config pipelines/configs/maa_model.yaml]
        [--profile demo] [key=value ...]

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
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=str(REPO / "pipelines/configs/maa_model.yaml"))
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--cpus", type=int, default=2, help="cores given to each setting")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.profile, args.overrides)
    cfg["limit"] = args.images
    cfg.pop("evaluate", None)
    notes: list[str] = []
    if "detectors" in cfg:
        cfg["detectors"] = [available_or_random(s, notes) for s in cfg["detectors"]]
    for domain in cfg.get("domains") or []:
        domain["detectors"] = [available_or_random(s, notes) for s in domain["detectors"]]
    reader = build_reader(cfg["dataset"])
    tmp = Path(tempfile.mkdtemp(prefix="icm-bench-"))
    try:
        torch.set_num_threads(args.cpus)
        loop_s = seed_style_loop(cfg, reader, tmp / "loop")
        results = {"seed_loop_batch1": args.images / loop_s}
        for actors in (1, 2):
            run_cfg = {**cfg, "out_dir": str(tmp / f"ray{actors}"), "figure_images": 0,
                       "workers": {**cfg.get("workers", {}), "actors": actors, "num_cpus": args.cpus // actors}}
            summary = maa_augment.run(run_cfg)
            results[f"ray_{actors}_workers"] = summary["images"]["done"] / summary["elapsed_s"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = results["seed_loop_batch1"]
    print("\n== MAA throughput (images/s) ==")
    print(f"method {cfg['method']}, canvas {cfg['canvas']}, {args.images} images, batch {cfg.get('batch_size')}, "
          f"device {cfg.get('device', 'auto')}, {args.cpus} cores per setting")
    for name, value in results.items():
        print(f"{name:<22}{value:>8.3f} img/s   ratio vs loop {value / base:>5.2f}x")
    for note in notes:
        print(f"note: {note}")
    print(json.dumps({k: round(v, 4) for k, v in results.items()}))


if __name__ == "__main__":
    main()
