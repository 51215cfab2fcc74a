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
import tempfile
import time
from pathlib import Path

import ray
import torch
from common import parse_args, resolve_config, start_ray, write_resolved

from icm.config import canonical_json
from icm.data.readers import build_reader
from icm.data.yolo_format import export_yolo
from icm.detectors.evaluate import evaluate_detector
from icm.train.detectors import train_detector_loop, train_yolo
from icm.train.ray_trainer import final_state, fit
from icm.zoo import build_detector
from icm.zoo.weights import publish_trained, trained_dir


def _dataset_spec(cfg: dict, spec: dict, split: str) -> dict:
    return {**cfg["dataset"], "domain": spec["domain"], "split": split}


def train_one(cfg: dict, spec: dict, out_dir: Path, workers: dict) -> tuple[bytes, str]:
    """The trained weights (file bytes) and their suffix."""
    label, canvas = spec["label"], int(spec.get("canvas", cfg["canvas"]))
    train_reader = build_reader(_dataset_spec(cfg, spec, "train"))
    classes = train_reader.classes
    loop_cfg = {**{k: v for k, v in spec.items() if k not in ("label", "domain", "trainer")},
                "classes": classes, "canvas": canvas, "seed": spec.get("seed", cfg.get("seed", 0)),
                "threads": workers.get("threads")}
    if spec.get("trainer", "ray") == "ultralytics":
        data_yaml = export_yolo({"train": train_reader, "val": build_reader(_dataset_spec(cfg, spec, "val"))},
                                out_dir / "yolo-data" / spec["domain"])
        task = ray.remote(num_cpus=workers.get("cpus_per_worker", 1), num_gpus=1 if workers.get("use_gpu") else 0)(
            train_yolo)
        device = "0" if workers.get("use_gpu") else "cpu"
        best = ray.get(task.remote({**loop_cfg, "run_name": label, "device": device}, str(data_yaml),
                                   str((out_dir / "ultralytics").resolve())))
        return Path(best).read_bytes(), ".pt"
    else:
        # A few hundred small images: each worker decodes its slice once (RayTrainSession);
        # large sets would go through Ray Data instead (datasets={"train": records_dataset(...)}).
        loop_cfg["data_refs"] = {"train": [r.to_dict() for r in train_reader.refs()]}
        result = fit(train_detector_loop, loop_cfg, name=label, storage_path=out_dir / "ray-train",
                     num_workers=workers.get("num_workers", 1), use_gpu=workers.get("use_gpu", False),
                     cpus_per_worker=workers.get("cpus_per_worker", 1))
        buf = io.BytesIO()
        torch.save(final_state(result)["model"], buf)
        return buf.getvalue(), ".pth"


def main() -> None:
    args = parse_args(__doc__, "pipelines/configs/detectors_shapes.yaml")
    cfg = resolve_config(args)
    out_dir = Path(cfg["out_dir"]).resolve()
    write_resolved(cfg, out_dir)
    start_ray(cfg, args.address)
    workers = cfg.get("workers", {})
    table = []
    for spec in cfg["detectors"]:
        label = spec["label"]
        info_path = trained_dir() / f"{label}.json"
        if info_path.is_file() and not cfg.get("force"):
            info = json.loads(info_path.read_text())
            print(f"[icm] {label}: cached ({info['weights']})", flush=True)
        else:
            print(f"[icm] training {label} ({spec['name']}, {spec.get('trainer', 'ray')})", flush=True)
            start = time.time()
            data, suffix = train_one(cfg, spec, out_dir, workers)
            elapsed = time.time() - start
            with tempfile.TemporaryDirectory() as tmp:
                candidate = Path(tmp) / f"{label}{suffix}"
                candidate.write_bytes(data)
                val = build_reader(_dataset_spec(cfg, spec, "val"))
                det = build_detector(spec["name"], val.classes, weights=str(candidate),
                                     image_size=int(spec.get("canvas", cfg["canvas"])),
                                     **(spec.get("model_kwargs") or {})).freeze()
            metrics = evaluate_detector(det, list(val.records()), int(spec.get("canvas", cfg["canvas"])))
            info = {"label": label, "spec": spec, "dataset": _dataset_spec(cfg, spec, "train"),
                    "weights": str(trained_dir() / f"{label}{suffix}"), "sha256": hashlib.sha256(data).hexdigest(),
                    "train_time_s": round(elapsed, 1), "val": metrics, "config": json.loads(canonical_json(cfg))}
            publish_trained(label, data, suffix, info)
        table.append((label, spec["name"], spec["domain"], info["train_time_s"], info["val"]["map50"]))
    print(f"\n{'detector':<22}{'model':<40}{'domain':<8}{'train s':>9}{'val mAP@.5':>12}")
    for label, name, domain, secs, map50 in table:
        print(f"{label:<22}{name:<40}{domain:<8}{secs:>9.1f}{map50:>12.3f}")
    print(f"weights cached under {trained_dir()}")


if __name__ == "__main__":
    main()
