"""The codec training job, shared by ``pipelines/train_codec.py`` and the Ray Tune sweep's trials
(``icm.train.rd_sweep``): checks the config, streams the training images through Ray Data, trains
on the one Ray Train harness, exports the model. Config errors raise ``ConfigError`` before any
Ray work starts."""

from __future__ import annotations

import hashlib
import io
import json
import time
from functools import partial
from pathlib import Path

import torch

from icm.config import ConfigError, canonical_json
from icm.data.ray_io import select_refs
from icm.data.readers import build_reader
from icm.data.storage import Storage
from icm.train.codec import build_training_codec, needs_clip, train_codec_loop, with_method_defaults
from icm.train.inputs import crop_record
from icm.train.stream import Stream
from icm.zoo.weights import publish_trained, weights_fingerprint

# What a trained codec is a function of (not where or how fast it ran): two exports with the same
# recipe digest are interchangeable, whichever runner (Ray Train, pipelines/train_codec_local.py) made them.
RECIPE_KEYS = ("dataset", "limit", "crop", "machine_targets", "codec", "loss", "steps", "batch_size", "lr", "aux_lr",
               "clip_max_norm", "lr_schedule", "seed")
LOOP_KEYS = ("codec", "loss", "steps", "batch_size", "lr", "aux_lr", "clip_max_norm", "lr_schedule", "checkpoint_every",
             "log_every", "seed", "threads")


def machine_targets(maa_dir: str | None) -> dict[str, str]:
    """source_id → MAA image path, from an MAA job's manifest (empty without one)."""
    if not maa_dir:
        return {}
    maa = Storage(maa_dir)
    if not maa.exists("manifest.parquet"):
        raise FileNotFoundError(f"machine_targets.maa_dir: {maa.display('manifest.parquet')} not found — run "
                                "pipelines/maa_augment.py into that out_dir first, or set machine_targets.maa_dir to null")
    return {r["source_id"]: maa.display(r["output_path"])
            for r in maa.read_table("manifest.parquet", ["source_id", "output_path", "status"]).to_pylist()
            if r["status"] == "ok"}


def loop_config(cfg: dict, classes: list[str]) -> dict:
    """What ``train_codec_loop`` takes from a job config, whichever runner drives it."""
    return {k: cfg[k] for k in LOOP_KEYS if k in cfg} | {"dataset_classes": classes,
                                                          "canvas": int(cfg.get("canvas", cfg["crop"]))}


def codec_stream(refs: list[dict], cfg: dict, targets: dict[str, str]) -> Stream:
    """The training stream of a codec job, whichever runner reads it: the images in a new order
    each epoch, each decoded and cropped (``crop_record``) by a function of (seed, epoch, image)."""
    crop = int(cfg["crop"])
    seed = int(cfg.get("seed", 0))
    return Stream(items=refs, decode=partial(crop_record, size=crop, targets=targets, seed=seed, min_side=crop // 2),
                  seed=seed, num_cpus=float((cfg.get("data") or {}).get("num_cpus", 1)))


def _weights_in(node, where: str = "") -> dict[str, str]:
    """``{config path: fingerprint}`` of every ``weights`` / ``base_weights`` spec under ``node``."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            path = f"{where}.{key}" if where else str(key)
            out |= ({path: weights_fingerprint(value)} if key in ("weights", "base_weights") and isinstance(value, str)
                    else _weights_in(value, path))
        return out
    return {}


def recipe_digest(cfg: dict) -> str:
    """The digest of ``RECIPE_KEYS``, of the content (sha256) of every weights file the codec and
    the loss start from or use (a retrained base codec or detector under the same name is another
    recipe), and, for the built-in sample sets, of their generator's version (a regenerated set
    is other data under the same spec)."""
    from icm.data import samples

    version = {"shapes": samples.SHAPES_VERSION}.get((cfg.get("dataset") or {}).get("type"))
    starts = _weights_in({"codec": cfg.get("codec"), "loss": cfg.get("loss")})
    return hashlib.sha256(canonical_json({**{k: cfg.get(k) for k in RECIPE_KEYS}, "data_version": version,
                                          "weights_sha256": starts}).encode()).hexdigest()


def export_model(state: dict, cfg: dict, storage: Storage, runner: str = "ray-train") -> dict:
    """CompressAI-style export: the state dict after ``update(force=True, update_quantiles=True)``
    on the unwrapped model (TRAPS.md), plus ``model.json`` with the zoo spec to rebuild it, the
    weights training started from (``init``), the recipe digest (``recipe_digest``) and the runner
    that trained it."""
    model = build_training_codec({"codec": {**cfg["codec"], "weights": "random"}})
    model.load_state_dict(state["model"])
    model.update(force=True, update_quantiles=True)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    data = buf.getvalue()
    storage.write_bytes("model.pth", data)
    spec = {k: v for k, v in cfg["codec"].items() if k not in ("weights", "base_weights")}
    info = {"codec": spec, "weights": storage.display("model.pth"), "sha256": hashlib.sha256(data).hexdigest(),
            "steps": state["step"], "resumed_at": state.get("resumed_at", []), "loss": cfg["loss"], "init": cfg["codec"].get("weights", "random"),
            "recipe": recipe_digest(cfg), "runner": runner}
    if cfg.get("label"):  # trained:<label>: this node's weights dir and, with ICM_WEIGHTS_DIR=s3://…, the shared store
        info["zoo_spec"] = {**spec, "weights": f"trained:{cfg['label']}"}
        publish_trained(cfg["label"], data, ".pth", info)
    storage.write_text("model.json", json.dumps(info, indent=2))
    return info


def check_config(cfg: dict) -> None:
    """What fails at once, before Ray starts (an unreachable weights spec too). ``method:`` (rd,
    ugicm, adapt_icmh, dynamic, dynamic_joint) names the loss type."""
    if cfg.get("method"):
        cfg["loss"] = {**(cfg.get("loss") or {}), "type": cfg["method"]}
    cfg["codec"] = {k: v for k, v in cfg["codec"].items() if v is not None}
    try:   # the method's defaults go into the config itself: the resolved config and the recipe show them
        cfg.update(with_method_defaults(cfg))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    loss = cfg["loss"]
    if loss["type"] == "ugicm" and needs_clip(loss) and \
            str((loss.get("clip") or {}).get("weights", "random")).startswith("random"):
        raise ConfigError("loss.lmbda_clip > 0 (or stage 3's lmbda_instance > 0) with random CLIP weights trains "
                          "towards noise: give loss.clip.weights (open_clip:openai or a local file) or set them to 0")
    if int(cfg["crop"]) % 64:
        raise ConfigError(f"crop={cfg['crop']}: training crops must be a multiple of 64 (hyperprior codecs "
                          "downsample by 64; other sizes misalign their latents)")
    build_training_codec(cfg)


def training_images(cfg: dict) -> tuple[list[dict], dict[str, str], int, list[str]]:
    """The training references, the machine targets (source_id → MAA image), how many match, and
    the dataset's classes (detector losses map the boxes' labels by them)."""
    reader = build_reader(cfg["dataset"])
    refs = select_refs(reader, cfg.get("limit"))
    if not refs:
        raise ConfigError(f"{reader.name}: no training images")
    maa_dir = (cfg.get("machine_targets") or {}).get("maa_dir")
    targets = machine_targets(maa_dir)
    matched = len(targets.keys() & {r["source_id"] for r in refs})
    if maa_dir and not matched:
        raise ConfigError(f"machine_targets.maa_dir {maa_dir}: none of its {len(targets)} MAA images belongs to the "
                          f"{len(refs)} training images of {reader.name} (the MAA job ran on another dataset or split)")
    if maa_dir:
        print(f"[icm] machine targets: MAA images for {matched} of {len(refs)} training images, "
              "the originals for the rest", flush=True)
    return refs, targets, matched, list(reader.classes)


def train_codec_job(cfg: dict, refs: list[dict], targets: dict[str, str], matched: int, classes: list[str],
                    report_to_tune: bool = False) -> dict:
    """Train (or resume: same ``name`` and ``out_dir``) and export; returns the job's summary.
    ``report_to_tune``: also forward every report to the Ray Tune trial this runs in."""
    storage = Storage(cfg["out_dir"])
    out_dir = storage.display()   # an absolute path, or a URI (Ray Train writes checkpoints there too)
    loss = cfg.get("loss", {})
    # Streamed, never materialised: each epoch the images come in a new order that is a function
    # of (seed, epoch), each decoded and freshly cropped on the CPU workers (icm.train.stream);
    # a resumed run continues where the checkpoint stopped, inside an epoch too.
    train = codec_stream(refs, cfg, targets)
    workers = cfg.get("workers", {}) or {}
    loop_cfg = loop_config(cfg, classes)
    # TensorBoard writes local files: beside the outputs; or, when the outputs are in object storage,
    # in a local dir of rank 0's node that is copied to out_dir/tensorboard/<name> at every checkpoint
    # (the node may be an autoscaled worker that disappears)
    loop_cfg["tensorboard_dir"] = str(cfg.get("tensorboard_dir") or (
        storage.local_path(f"tensorboard/{cfg['name']}") if storage.local else Path("tensorboard").resolve() / cfg["name"]))
    if not storage.local:
        loop_cfg["tensorboard_upload"] = storage.display(f"tensorboard/{cfg['name']}")
    from icm.train.ray_trainer import final_state, fit  # here: the local runner uses this module without Ray

    start = time.time()
    result = fit(train_codec_loop, loop_cfg, name=cfg["name"], storage_path=f"{out_dir}/ray-train",
                 streams={"train": train}, num_workers=int(workers.get("num_workers", 1)),
                 use_gpu=bool(workers.get("use_gpu", False)), cpus_per_worker=float(workers.get("cpus_per_worker", 1)),
                 report_to_tune=report_to_tune)
    if result.error:
        raise RuntimeError(f"training failed: {result.error}")
    state = final_state(result)
    info = export_model(state, cfg, storage)
    maa_dir = (cfg.get("machine_targets") or {}).get("maa_dir")
    return {"job": "train_codec", "codec": cfg["codec"]["name"], "loss": loss.get("type"),
            "stage": loss.get("stage", 1), "train_images_listed": len(refs),
            "machine_targets": f"MAA images for {matched} of {len(refs)} training images" if maa_dir
            else "the originals",
            "clip": "on" if float(loss.get("lmbda_clip", 0)) > 0 else "off (lmbda_clip = 0)",
            "steps": state["step"], "resumed_at": state.get("resumed_at", []), "final_metrics": {k: round(v, 4) if isinstance(v, float) else v
                                                       for k, v in (result.metrics or {}).items()},
            "train_wall_s": round(time.time() - start, 1), "checkpoints": str(result.path),
            "tensorboard": loop_cfg.get("tensorboard_upload") or loop_cfg["tensorboard_dir"], "model": info}
