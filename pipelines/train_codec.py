"""Distributed codec training on Ray Train: any CompressAI codec (RD loss) or UG-ICM (AAAI 2025,
β-conditioned decoder, CLIP supervision, MAA images as machine targets).

    python pipelines/train_codec.py --config pipelines/configs/codec_ugicm.yaml [--profile demo] [key=value ...]
    ray job submit --working-dir . -- python pipelines/train_codec.py --config pipelines/configs/codec_ugicm.yaml

Ray Data streams the images (and their MAA targets), decoded and randomly cropped on CPU workers,
to the train workers in an order that is a function of (seed, epoch) (``icm.train.stream``);
nothing is materialised; checkpoints go to ``out_dir/ray-train/<name>``; rerun the same command to
resume from the latest one — the same run, continued where the checkpoint stopped (inside an
epoch too), to the weights an uninterrupted run reaches. TensorBoard: ``tensorboard --logdir out_dir/tensorboard``.
The exported model (``out_dir/model.pth`` + ``model.json``) loads back with ``icm.zoo.build_codec``.
"""

from __future__ import annotations

import json
import time

from common import (REPO, check_weights, parse_args, resolve_config, start_ray, weights_misfit, write_resolved,
                    write_summary)

from icm.config import ConfigError, load_section
from icm.data.storage import Storage
from icm.train.codec_job import check_config, recipe_digest, train_codec_job, training_images
from icm.zoo.weights import WeightsUnavailable


def run(cfg: dict, address: str | None = None) -> dict:
    out_dir = Storage(cfg["out_dir"]).display()
    check_weights(cfg)   # every weights spec resolved and read safely before anything is built
    try:
        check_config(cfg)   # fills in the method's defaults (the resolved config shows them) and builds
        refs, targets, matched, classes = training_images(cfg)   # the codec: its weights must fit it
    except ConfigError as exc:
        raise SystemExit(str(exc)) from exc
    except (WeightsUnavailable, RuntimeError) as exc:
        raise SystemExit(weights_misfit("codec", cfg["codec"], exc)) from None
    write_resolved(cfg, out_dir)
    start_ray(cfg, address)
    try:
        summary = train_codec_job(cfg, refs, targets, matched, classes)
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from exc
    write_summary(out_dir, summary, "codec training summary")
    return summary


def train_once(section: dict, address: str | None = None, ray: dict | None = None, what: str = "codec") -> dict:
    """A codec other jobs start from or compare, trained once per recipe: ``section`` is a config
    of this job (or ``{from: <YAML>, profile: <name>, ...overrides}``). Returns its ``model.json``
    with ``weights`` = its ``model.pth``: reused when ``out_dir`` holds one of the same recipe
    (``recipe_digest``: data and its version, architecture, loss, steps, lr, seed — whichever runner
    trained it, ``pipelines/train_codec_local.py`` on a GPU included), else trained here through
    Ray Train, saying so and how long it took. The run is named by its recipe: a stopped run of
    this recipe resumes, another recipe's never does."""
    cfg = load_section(section, REPO)
    cfg.pop("profiles", None)
    if ray is not None:
        cfg["ray"] = ray
    try:
        check_config(cfg)
    except ConfigError as exc:
        raise SystemExit(str(exc)) from exc
    recipe = recipe_digest(cfg)
    store = Storage(cfg["out_dir"])
    if store.exists("model.json"):
        info = json.loads(store.read_text("model.json"))
        if info.get("recipe") == recipe:
            print(f"[icm] {what} {store.display('model.pth')}: same recipe, trained by {info.get('runner')} "
                  f"({info['steps']} steps) — reused", flush=True)
            return {**info, "weights": store.display("model.pth"), "trained_now_s": None}
        print(f"[icm] {what} {store.display('model.json')} has another recipe — retraining", flush=True)
    print(f"[icm] training the {what} {cfg['name']} ({cfg['steps']} steps, recipe {recipe[:12]}) into "
          f"{store.display()} — once: later runs of any job naming this recipe reuse it", flush=True)
    start = time.time()
    run({**cfg, "name": f"{cfg['name']}-{recipe[:12]}"}, address)
    took = round(time.time() - start, 1)
    print(f"[icm] {what} trained in {took:.0f} s ({took / 60:.1f} min)", flush=True)
    return {**json.loads(store.read_text("model.json")), "weights": store.display("model.pth"), "trained_now_s": took}


def main() -> None:
    args = parse_args(__doc__, "pipelines/configs/codec_ugicm.yaml")
    run(resolve_config(args), args.address)


if __name__ == "__main__":
    main()
