"""MAA at the stage level on real sample images (Ray-free, so it runs on a GPU machine without
Ray): the project's own ``MAAStage.run_unit`` — decode, letterbox, model-wise Meta-AAFG, paste
back, PNG, manifest shard — on the shapes set, for

- throughput: images/s of one unit of ``--batch`` images, batched losses, deterministic on and
  off, against the per-image loss path on a unit of ``--baseline-batch`` images (the path before
  batching), with GPU utilisation and peak memory on CUDA;
- reproducibility: the same unit run twice in fresh stages, per setting — how many written PNGs
  are byte-identical; and a resumed job that re-cut the unit in halves, against the whole unit;
- ``batch_size: auto``: the batch the memory probe picks, and how long the probe took.

    python bench/maa_stage_gpu.py [--canvas 512] [--batch 16] [--outer 10] [--inner 8] [--device auto]

Random detector weights (speed and determinism do not depend on them). Prints JSON lines and a
Markdown summary; ``--out`` also writes the JSON there.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from maa_batching import GpuSampler  # noqa: E402
from icm.data.ray_io import select_refs, work_units  # noqa: E402
from icm.data.samples import SHAPE_CLASSES, shapes_reader  # noqa: E402
from icm.maa.stage import MAAStage, largest_batch  # noqa: E402

CLASSES = list(SHAPE_CLASSES)


def params(args, deterministic: bool) -> dict:
    return {"method": "meta_model", "canvas": args.canvas, "outer": args.outer, "inner_steps": args.inner,
            "alpha": "2/255", "bound": {"type": "linf", "eps": "8/255"}, "device": args.device,
            "deterministic": deterministic, "seed": 0,
            "detectors": [{"label": n, "name": n, "weights": f"random:{i}"}
                          for i, n in enumerate(args.detectors)]}


def run(out_dir: Path, cfg: dict, units: list[dict], batched: bool = True) -> dict:
    """Run ``units`` through a fresh stage; images/s over the units (model building excluded)."""
    stage = MAAStage(str(out_dir), cfg, CLASSES)
    for group in stage.groups:
        for _, det, _ in group:
            det.batched = batched
    cuda = stage.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    images = sum(len(u["refs"]) for u in units)
    with GpuSampler() as gpu:
        start = time.perf_counter()
        for unit in units:
            rows = stage.run_unit(unit)
            if rows is None or any(r["status"] != "ok" for r in rows):
                raise RuntimeError(f"unit {unit['unit_id']} failed: {stage.failure or rows}")
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    out = {"images": images, "unit_size": len(units[0]["refs"]), "batched": batched,
           "deterministic": cfg["deterministic"], "seconds": round(elapsed, 2),
           "images_per_s": round(images / elapsed, 4), "device": stage.runtime["device_name"]}
    if cuda:
        out |= {"gpu_util_pct": gpu.mean, "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)}
    return out


def compare(a: Path, b: Path, source_ids: list[str]) -> dict:
    """Byte-identical PNGs and the share of equal pixel values between two runs' outputs."""
    from PIL import Image

    from icm.data.units import output_relpath

    same_bytes, equal, total = 0, 0, 0
    for sid in source_ids:
        rel = output_relpath(sid)
        same_bytes += (a / rel).read_bytes() == (b / rel).read_bytes()
        x, y = np.asarray(Image.open(a / rel)), np.asarray(Image.open(b / rel))
        equal, total = equal + int((x == y).sum()), total + x.size
    return {"byte_identical": f"{same_bytes}/{len(source_ids)}", "equal_values_pct": round(100 * equal / total, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--canvas", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--baseline-batch", type=int, default=4)
    parser.add_argument("--outer", type=int, default=10)
    parser.add_argument("--inner", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--detectors", nargs="+", default=["yolov8n", "fasterrcnn_resnet50_fpn", "centernet_resnet50"])
    parser.add_argument("--skip", nargs="*", default=[], choices=["baseline", "repro", "auto"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    refs = select_refs(shapes_reader("photo", "train"), args.batch)
    (whole,) = work_units(refs, args.batch)
    halves = work_units(refs, max(1, args.batch // 2))
    ids = [r["source_id"] for r in refs]
    results = {"config": {k: v for k, v in vars(args).items() if k != "out"}, "runs": [], "reproducibility": []}

    def record(key, value):
        results[key].append(value)
        print(json.dumps({key: value}), flush=True)
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # warm-up: CUDA context, cuDNN plans, allocator (one outer step on two images)
        run(tmp / "warm", {**params(args, False), "outer": 1, "inner_steps": 1}, work_units(refs[:2], 2))
        if "baseline" not in args.skip:
            (base_unit,) = work_units(refs[:args.baseline_batch], args.baseline_batch)
            record("runs", run(tmp / "base", params(args, False), [base_unit], batched=False))
        for deterministic in (False, True):
            cfg = params(args, deterministic)
            tag = "on" if deterministic else "off"
            record("runs", run(tmp / f"{tag}-1", cfg, [whole]))
            if "repro" in args.skip:
                continue
            run(tmp / f"{tag}-2", cfg, [whole])
            record("reproducibility", {"deterministic": deterministic, "what": "same unit, fresh stage",
                                       **compare(tmp / f"{tag}-1", tmp / f"{tag}-2", ids)})
            if deterministic:
                run(tmp / f"{tag}-halves", cfg, halves)
                record("reproducibility", {"deterministic": True, "what": f"re-cut into units of {len(halves[0]['refs'])}",
                                           **compare(tmp / f"{tag}-1", tmp / f"{tag}-halves", ids)})
        if "auto" not in args.skip:
            start = time.perf_counter()
            picked = largest_batch(params(args, False), CLASSES)
            results["auto_batch"] = {"batch": picked, "probe_s": round(time.perf_counter() - start, 1)}
            print(json.dumps(results["auto_batch"]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    runs = results["runs"]
    print(f"\n{' + '.join(args.detectors)}, canvas {args.canvas}, outer {args.outer}, inner {args.inner}, "
          f"device {runs[0]['device']}, torch {torch.__version__}")
    print("| path | unit | deterministic | images/s | GPU util % | peak GiB |\n|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {'batched' if r['batched'] else 'per-image'} | {r['unit_size']} | {'on' if r['deterministic'] else 'off'} "
              f"| {r['images_per_s']} | {r.get('gpu_util_pct')} | {r.get('peak_mem_gib')} |")
    for r in results["reproducibility"]:
        print(f"- deterministic {'on' if r['deterministic'] else 'off'}, {r['what']}: {r['byte_identical']} PNGs "
              f"byte-identical, {r['equal_values_pct']} % of values equal")
    if "auto_batch" in results:
        print(f"- batch_size auto: {results['auto_batch']}")


if __name__ == "__main__":
    main()
