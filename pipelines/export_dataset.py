"""Export any dataset the data layer reads to lossless PNGs + a parquet manifest, on Ray Data.

    python pipelines/export_dataset.py --config pipelines/configs/export.yaml --profile demo
    ray job submit --working-dir . -- python pipelines/export_dataset.py --config ... dataset.type=coco ...
"""

from __future__ import annotations


from common import (exit_status, guard_params, parse_args, resolve_config, run_resumable, start_ray, write_resolved,
                    write_summary)

from icm.data.export import EXPORT_COLUMNS, ExportStage
from icm.data.ray_io import select_refs
from icm.data.readers import build_reader


def run(cfg: dict, address: str | None = None) -> dict:
    out_dir = cfg["out_dir"]
    reader = build_reader(cfg["dataset"])
    params = {"job": "export", "dataset": cfg["dataset"], "min_side": cfg.get("min_side", 1)}
    guard_params(out_dir, {**params, "unit_size": cfg.get("unit_size", 8)})
    write_resolved(cfg, out_dir)
    start_ray(cfg, address)
    result = run_resumable(select_refs(reader, cfg.get("limit")), int(cfg.get("unit_size", 8)), ExportStage,
                           {"out_dir": out_dir, "params": params, "min_side": cfg.get("min_side", 1)},
                           out_dir, EXPORT_COLUMNS, cfg.get("workers", {}))
    summary = {"job": "export", "dataset": reader.name, "classes": reader.classes,
               "images": result["counts"], "elapsed_s": round(result["elapsed_s"], 2),
               "images_per_s": round(result["images_per_s"], 2),
               "manifest": result["manifest"], "failed_units": result["failed_units"],
               "rows_outside_selection": result["rows_outside_selection"],
               "errors": result["errors"][:20]}
    write_summary(out_dir, summary, "export summary")
    return summary


def main() -> None:
    args = parse_args(__doc__, "pipelines/configs/export.yaml")
    exit_status(run(resolve_config(args), args.address))


if __name__ == "__main__":
    main()
