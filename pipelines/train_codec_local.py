"""Train a codec from a ``pipelines/train_codec.py`` config in this one process, on one device,
without Ray: the same checks, the same training loop (``train_codec_loop``), the same export
(``model.pth`` + ``model.json`` with the recipe digest, ``trained:<label>`` when the config has a
label). For a single-GPU box without Ray, or to train a small codec on a lent GPU; a cluster runs
``pipelines/train_codec.py``.

    python pipelines/train_codec_local.py --config pipelines/configs/codec_ugicm.yaml --profile demo --device cuda

The one difference from the Ray job: images are decoded and cropped in this process (no Ray
Data). The stream is the same (``icm.train.codec_job.codec_stream``: a function of seed and
epoch), so with one Ray Train worker both runners see the same crops in the same order. A rerun
resumes from ``<out_dir>/local/<name>/state.pt``, inside an epoch too.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from pathlib import Path

import torch
from common import job_command, resolve_config, write_resolved

from icm import console
from icm.data.storage import Storage
from icm.train.codec import train_codec_loop
from icm.train.codec_job import check_config, codec_stream, export_model, loop_config, training_images
from icm.train.session import LocalSession, metrics_note


def train_local(cfg: dict, device: str) -> dict:
    check_config(cfg)
    refs, targets, matched, classes = training_images(cfg)
    storage = Storage(cfg["out_dir"])
    if not storage.local:
        raise SystemExit(f"out_dir {cfg['out_dir']}: the local runner writes to a local directory; "
                         "use pipelines/train_codec.py for object storage")
    write_resolved(cfg, storage.display())
    loop_cfg = loop_config(cfg, classes)
    if importlib.util.find_spec("tensorboard"):
        loop_cfg["tensorboard_dir"] = storage.local_path(f"tensorboard/{cfg['name']}")
    else:
        print("[icm] tensorboard is not installed: no TensorBoard logs (metrics still go to summary.json)", flush=True)
    checkpoints = storage.local_path(f"local/{cfg['name']}")
    start = time.time()
    with console.Progress(f"training {cfg['name']}", int(cfg["steps"]), "steps") as line:
        session = LocalSession({"train": codec_stream(refs, cfg, targets)}, checkpoints, device, progress=line.update,
                               on_report=lambda metrics, saved: line.update(int(metrics["step"]),
                                                                           note=metrics_note(metrics, saved)))
        train_codec_loop(loop_cfg, session)
    state = torch.load(Path(checkpoints) / "state.pt", map_location="cpu", weights_only=True)
    info = export_model(state, cfg, storage, runner=f"train_codec_local ({torch.device(device).type})")
    summary = {"job": "train_codec_local", "codec": cfg["codec"]["name"], "device": str(device),
               "train_images_listed": len(refs), "machine_targets": f"MAA images for {matched} of {len(refs)}"
               if targets else "the originals", "steps": state["step"],
               "final_metrics": session.reports[-1] if session.reports else {},
               "train_wall_s": round(time.time() - start, 1), "model": info, "command": job_command(),
               "cwd": os.getcwd()}
    storage.write_text("summary.json", json.dumps(summary, indent=2))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="pipelines/configs/codec_ugicm.yaml")
    parser.add_argument("--profile", default=None)
    parser.add_argument("--out", default=None, help="output directory (overrides out_dir)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--verbose", action="store_true", help="show everything libraries print")
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    args = parser.parse_args()
    summary = train_local(resolve_config(args), args.device)
    print(json.dumps({k: summary[k] for k in ("steps", "train_wall_s", "final_metrics")}, indent=2))


if __name__ == "__main__":
    main()
