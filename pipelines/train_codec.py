"""Distributed codec training on Ray Train: any CompressAI codec (RD loss) or UG-ICM (AAAI 2025,
β-conditioned decoder, CLIP supervision, MAA images as machine targets).

    python pipelines/train_codec.py --config pipelines/configs/codec_ugicm.yaml [--profile demo] [key=value ...]
    ray job submit --working-dir . -- python pipelines/train_codec.py --config pipelines/configs/codec_ugicm.yaml

Ray Data streams the images (and their MAA targets), decoded and randomly cropped on CPU workers
in a new order every epoch, to the train workers (``get_dataset_shard``); nothing is materialised; checkpoints go to ``out_dir/ray-train/<name>``; rerun
the same command to resume from the latest one. TensorBoard: ``tensorboard --logdir out_dir/tensorboard``.
The exported model (``out_dir/model.pth`` + ``model.json``) loads back with ``icm.zoo.build_codec``.
"""

from __future__ import annotations

from common import check_weights, parse_args, resolve_config, start_ray, weights_misfit, write_resolved, write_summary

from icm.config import ConfigError
from icm.data.storage import Storage
from icm.train.codec_job import check_config, train_codec_job, training_images
from icm.zoo.weights import WeightsUnavailable


def run(cfg: dict, address: str | None = None) -> dict:
    out_dir = Storage(cfg["out_dir"]).display()
    check_weights(cfg)   # every weights spec resolved and read safely before anything is built
    write_resolved(cfg, out_dir)
    try:
        check_config(cfg)   # builds the codec the workers will train: its weights must fit it
        refs, targets, matched, classes = training_images(cfg)
    except ConfigError as exc:
        raise SystemExit(str(exc)) from exc
    except (WeightsUnavailable, RuntimeError) as exc:
        raise SystemExit(weights_misfit("codec", cfg["codec"], exc)) from None
    start_ray(cfg, address)
    try:
        summary = train_codec_job(cfg, refs, targets, matched, classes)
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from exc
    write_summary(out_dir, summary, "codec training summary")
    return summary


def main() -> None:
    args = parse_args(__doc__, "pipelines/configs/codec_ugicm.yaml")
    run(resolve_config(args), args.address)


if __name__ == "__main__":
    main()
