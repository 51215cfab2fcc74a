"""OW-JRD throughput in (object, level) labels per second: a sequential loop (the two stages called
one after the other in one process) running the detector on one decoded level at a time
(`detect_batch=1`, the per-level baseline) and on batches of levels (`detect_batch` of the config),
and the Ray pipeline (coding actors streaming into detector actors) at 1 and 2 detector workers.
Same images, ladders and detector. One command, prints the rates and the ratios to the baseline.

    .venv/bin/python bench/jrd_throughput.py [--images 12] [--config pipelines/configs/jrd_demo.yaml] [key=value ...]
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

import jrd_dataset  # noqa: E402
import torch  # noqa: E402
from weights import available_or_random  # noqa: E402

from icm.config import load_config  # noqa: E402
from icm.data.ray_io import work_units  # noqa: E402
from icm.data.readers import build_reader  # noqa: E402
from icm.jrd.export import read_table  # noqa: E402
from icm.jrd.stage import LabelStage, LadderStage  # noqa: E402


def sequential_loop(cfg: dict, reader, out_dir: Path) -> tuple[float, int]:
    start = time.time()
    coder = LadderStage(cfg["ladders"])
    labeller = LabelStage(str(out_dir), {k: cfg[k] for k in jrd_dataset.LABEL_KEYS if k in cfg},
                          reader.classes, reader.category_ids)
    for unit in work_units(reader, int(cfg["batch_size"]), limit=cfg["limit"]):
        labeller.coded = {r["source_id"]: coder.code_image(r) for r in unit["refs"]}
        labeller.run_unit(unit)
    return time.time() - start, read_table(out_dir, "levels", columns=["level"]).num_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=str(REPO / "pipelines/configs/jrd_demo.yaml"))
    parser.add_argument("--profile", default=None)
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.profile, args.overrides)
    cfg["limit"] = args.images
    cfg["export"] = {"enabled": False}
    notes: list[str] = []
    cfg["detector"] = available_or_random(cfg["detector"], notes)
    reader = build_reader(cfg["dataset"])
    tmp = Path(tempfile.mkdtemp(prefix="icm-bench-"))
    try:
        torch.set_num_threads(1)  # each Ray actor holds one core; the loop gets the same per stage
        per_level_s, rows = sequential_loop({**cfg, "detect_batch": 1}, reader, tmp / "per-level")
        loop_s, rows = sequential_loop(cfg, reader, tmp / "loop")
        results = {"per_level_loop": rows / per_level_s, "batched_loop": rows / loop_s}
        for workers in (1, 2):
            summary = jrd_dataset.run({**cfg, "out_dir": str(tmp / f"ray{workers}"),
                                       "workers": {**cfg.get("workers", {}), "actors": workers}})
            ray_rows = read_table(tmp / f"ray{workers}", "levels", columns=["level"]).num_rows
            results[f"ray_{workers}_workers"] = ray_rows / summary["elapsed_s"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n== OW-JRD throughput ((object, level) labels per second) ==")
    print(f"{args.images} images, ladders {summary['ladders']}, detector {cfg['detector']['name']}, "
          f"canvas {cfg['canvas']}, detect_batch {cfg.get('detect_batch')}, {rows} labels")
    for name, value in results.items():
        print(f"{name:<18}{value:>9.1f} labels/s   ratio vs per-level loop {value / results['per_level_loop']:>5.2f}x")
    for note in notes:
        print(f"note: {note}")
    print(json.dumps({k: round(v, 2) for k, v in results.items()}))


if __name__ == "__main__":
    main()
