"""Real-bitstream codec evaluation on Ray Data: bpp from bytes, PSNR / MS-SSIM of the human
decode, COCO mAP of every configured detector on the machine decode, for learned codecs (UG-ICM:
β = 0 and β = 1 from one bitstream) and the anchors (JPEG, WebP, HEVC, … ladders) in one call.

    python pipelines/evaluate.py --config pipelines/configs/evaluate.yaml [--profile demo] [key=value ...]

Writes ``points/*.parquet`` (one row per image × codec × rate point × decode, with detections),
the per-image ``manifest.parquet``, ``summary.json`` (one RD point per codec, rate point and decode
mode; which detectors were seen in training/MAA) and ``rd.png``. Resumable like every job.
"""

from __future__ import annotations

import time

from functools import partial

from common import (check_weights, exit_status, guard_params, parse_args, resolve_config, run_resumable, start_ray,
                    write_resolved, write_summary)

from icm.data.readers import build_reader
from icm.data.storage import Storage
from icm.data.ray_io import select_refs
from icm.maa.stage import build_from_spec, detector_label, reachable_classes
from icm.metrics.codec_eval import EVAL_COLUMNS, EvalStage, LearnedPoint, rd_figure, rd_points

EVAL_KEYS = ("codecs", "detectors", "canvas", "score_threshold", "device", "deterministic", "seed")


def run(cfg: dict, address: str | None = None) -> dict:
    out_dir = cfg["out_dir"]
    storage = Storage(out_dir)
    reader = build_reader(cfg["dataset"])
    params = {k: cfg[k] for k in EVAL_KEYS if k in cfg}
    for spec in params.get("detectors", []):
        reachable_classes(spec, reader.classes)  # a detector that would get no ground truth fails here
    canvas = int(cfg.get("canvas", 512))
    check_weights(cfg, [(f"detectors[{i}]", spec, partial(build_from_spec, spec, reader.classes, canvas))
                        for i, spec in enumerate(cfg.get("detectors") or [])]
                  + [(f"codecs[{i}]", spec, partial(LearnedPoint, spec, "cpu", reader.classes, canvas))
                     for i, spec in enumerate(cfg.get("codecs") or []) if "ladder" not in spec])
    guard_params(out_dir, {**params, "dataset": cfg["dataset"], "batch_size": cfg.get("batch_size", 4)})
    write_resolved(cfg, out_dir)
    start_ray(cfg, address)
    refs = select_refs(reader, cfg.get("limit"))
    start = time.time()
    result = run_resumable(refs, int(cfg.get("batch_size", 4)), EvalStage,
                           {"out_dir": out_dir, "params": params, "dataset_classes": reader.classes},
                           out_dir, EVAL_COLUMNS, cfg.get("workers", {}))
    manifest = storage.read_table("manifest.parquet").to_pylist()
    point_rows = [r for t in storage.read_tables("points") for r in t.to_pylist()]
    points = rd_points(manifest, point_rows, cfg.get("detectors", []), reader.classes)
    labels = [detector_label(s) for s in cfg.get("detectors", [])]
    storage.write_bytes("rd.png", rd_figure(points, labels))
    summary = {"job": "evaluate", "dataset": reader.name, "images": result["counts"],
               "detectors": {detector_label(s): "seen in training/MAA" if s.get("seen") else "unseen"
                             for s in cfg.get("detectors", [])},
               "elapsed_s": round(result["elapsed_s"], 2), "rd_points": points,
               "figure": storage.display("rd.png"),
               "manifest": result["manifest"], "failed_units": result["failed_units"],
               "errors": result["errors"][:20],
               "wall_s": round(time.time() - start, 1)}
    write_summary(out_dir, summary, "codec evaluation")
    print(f"\n{'curve':<16}{'pt':>3} {'decode':<8}{'bpp':>7}{'PSNR':>9}{'MS-SSIM':>8}"
          + "".join(f"{'mAP50 ' + d:>22}" for d in labels))
    for p in points:
        psnr = "lossless" if p["psnr"] is None else f"{p['psnr']:.2f}"
        print(f"{p['curve']:<16}{p['point']:>3} {p['decode']:<8}{p['bpp']:>7.3f}{psnr:>9}{p['ms_ssim']:>8.4f}"
              + "".join(f"{p['map50'][d]:>22.3f}" for d in labels))
    return summary


def main() -> None:
    args = parse_args(__doc__, "pipelines/configs/evaluate.yaml")
    exit_status(run(resolve_config(args), args.address))


if __name__ == "__main__":
    main()
