"""OW-JRD throughput in (object, level) labels per second: a sequential loop (the two stages called
one after the other in one process, one torch thread) running the detector on one decoded level at
a time (`detect_batch=1`, the per-level baseline) and on batches of levels (`detect_batch` of the
config), and the Ray pipeline with 1 and 2 detector workers on the same ``--cpus`` cores: as the
job runs on CPUs (with several label actors each codes its own units, ``coders.actors: auto``;
one label actor keeps a coder pool beside it) and, for comparison, split as on a GPU (a coder
pool streaming into the label actors). Same images, ladders and detector, and the same
work: the loop's coder also encodes the crop PNGs, as the pipeline's coders do. Beside them, N
plain processes (no Ray) started at once, each running the batched loop on every N-th unit: the
most any N-worker layout can reach on these cores — over their loops alone, and from their start
(imports and model building included, as a Ray actor pays them). One command, prints the rates
and the ratios to the baseline and to the batched loop.

    .venv/bin/python bench/jrd_throughput.py [--images 12] [--cpus 2] [--config pipelines/configs/jrd_demo.yaml] [key=value ...]

Ray gets exactly ``--cpus`` cores. With N workers, each takes ``cpus / N`` of them (torch threads
per actor = its CPUs, at least 1); split, the N label actors share half the cores and ``cpus / 2``
coders of one CPU the rest. The pools Ray Data ran are printed (``[icm] LadderStage: …`` /
``[icm] LabelStage: …``).
Rates: labels over the pipeline's own time (actor start-up and model building included, Ray's start
not), and end to end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
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


def sequential_loop(cfg: dict, reader, out_dir: Path, shard: tuple[int, int] = (0, 1)) -> tuple[float, int]:
    """The two stages one after the other in this process, on every ``shard[1]``-th unit from ``shard[0]``."""
    start = time.time()
    coder = LadderStage(cfg["ladders"], crop_gt=cfg.get("reference", "gt") == "gt")
    labeller = LabelStage(str(out_dir), {k: cfg[k] for k in jrd_dataset.LABEL_KEYS if k in cfg},
                          reader.classes, reader.category_ids)
    for unit in work_units(reader, int(cfg["batch_size"]), limit=cfg["limit"])[shard[0]::shard[1]]:
        labeller.run_unit({**unit, "coded": coder.code_unit(unit["refs"])})
    return time.time() - start, read_table(out_dir, "levels", columns=["level"]).num_rows


def plain_processes(args, n: int, tmp: Path) -> tuple[dict[str, float], int]:
    """``n`` fresh processes of this bench (``--shard i/n``) at once, each the batched loop on its
    units: labels per second over the slowest loop, and from their start to the last exit."""
    command = [sys.executable, __file__, "--config", args.config, "--images", str(args.images),
               *(["--profile", args.profile] if args.profile else []), *args.overrides]
    start = time.time()
    procs = [subprocess.Popen([*command, "--shard", f"{i}/{n}", "--shard-out", str(tmp / f"shard-{n}-{i}.json")])
             for i in range(n)]
    if any(proc.wait() for proc in procs):
        raise RuntimeError(f"a plain process of the {n} failed (its output is above)")
    wall = time.time() - start
    shards = [json.loads((tmp / f"shard-{n}-{i}.json").read_text()) for i in range(n)]
    rows = sum(s["rows"] for s in shards)
    return {"pipeline": rows / max(s["loop_s"] for s in shards), "end_to_end": rows / wall}, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "pipelines/configs/jrd_demo.yaml"))
    parser.add_argument("--profile", default=None)
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--cpus", type=int, default=2, help="cores given to the Ray pipeline")
    parser.add_argument("--workers", default="1,2", help="detector workers per Ray setting, comma-separated")
    parser.add_argument("--shard", default=None, help=argparse.SUPPRESS)       # I/N: one plain process
    parser.add_argument("--shard-out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.profile, args.overrides)
    cfg["limit"] = args.images
    cfg["export"] = {"enabled": False}
    cfg["ray"] = {**(cfg.get("ray") or {}), "num_cpus": args.cpus}
    notes: list[str] = []
    cfg["detector"] = available_or_random(cfg["detector"], notes)
    reader = build_reader(cfg["dataset"])
    tmp = Path(tempfile.mkdtemp(prefix="icm-bench-"))
    torch.set_num_threads(1)  # the loop: one core, as each Ray actor of one CPU
    if args.shard:
        index, count = (int(x) for x in args.shard.split("/"))
        try:
            loop_s, shard_rows = sequential_loop(cfg, reader, tmp / "shard", shard=(index, count))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        Path(args.shard_out).write_text(json.dumps({"loop_s": loop_s, "rows": shard_rows}))
        return
    results = {}
    try:
        per_level_s, rows = sequential_loop({**cfg, "detect_batch": 1}, reader, tmp / "per-level")
        results["per_level_loop"] = {"pipeline": rows / per_level_s, "end_to_end": rows / per_level_s}
        loop_s, rows = sequential_loop(cfg, reader, tmp / "loop")
        results["batched_loop"] = {"pipeline": rows / loop_s, "end_to_end": rows / loop_s}
        for workers in [int(n) for n in args.workers.split(",") if int(n) > 1]:
            results[f"{workers}_plain_processes"], plain_rows = plain_processes(args, workers, tmp)
            if plain_rows != rows:
                raise RuntimeError(f"{workers} plain processes wrote {plain_rows} labels, the loop {rows}")
        for workers in [int(n) for n in args.workers.split(",")]:
            for layout in ("fused", "split") if workers > 1 else ("split",):   # one label actor: the job splits
                name = f"ray_{workers}_workers" + ("" if layout == "fused" else "_split")
                if layout == "fused":   # what the job does on CPUs: each label actor codes its own units
                    pools = {"workers": {**cfg.get("workers", {}), "actors": workers, "num_cpus": args.cpus / workers},
                             "coders": {**cfg.get("coders", {}), "actors": "auto"}}
                else:                   # a coder pool in front, on half the cores (the GPU layout, run on CPUs)
                    pools = {"workers": {**cfg.get("workers", {}), "actors": workers,
                                         "num_cpus": args.cpus / 2 / workers},
                             "coders": {**cfg.get("coders", {}), "actors": max(1, args.cpus // 2), "num_cpus": 1}}
                start = time.time()
                summary = jrd_dataset.run({**cfg, "out_dir": str(tmp / name), **pools})
                wall = time.time() - start
                ray_rows = read_table(tmp / name, "levels", columns=["level"]).num_rows
                if ray_rows != rows:
                    raise RuntimeError(f"the pipeline wrote {ray_rows} labels, the loop {rows}")
                results[name] = {"pipeline": ray_rows / summary["elapsed_s"], "end_to_end": ray_rows / wall}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n== OW-JRD throughput ((object, level) labels per second) ==")
    print(f"{args.images} images, ladders {summary['ladders']}, detector {cfg['detector']['name']}, "
          f"canvas {cfg['canvas']}, detect_batch {cfg.get('detect_batch')}, {rows} labels, Ray on {args.cpus} cores")
    base, batched = results["per_level_loop"]["pipeline"], results["batched_loop"]["pipeline"]
    for name, value in results.items():
        print(f"{name:<22}{value['pipeline']:>9.1f} labels/s (end to end {value['end_to_end']:.1f})   "
              f"vs per-level loop {value['pipeline'] / base:>5.2f}x   vs batched loop {value['pipeline'] / batched:>5.2f}x "
              f"(end to end {value['end_to_end'] / batched:.2f}x)")
    for note in notes:
        print(f"note: {note}")
    print(json.dumps({k: {m: round(v, 2) for m, v in r.items()} for k, r in results.items()}))


if __name__ == "__main__":
    main()
