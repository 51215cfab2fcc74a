"""Codec training and coding speed, as ratios in one command:

* training samples/s of 1 Ray Train worker vs the same loop in a plain process (same model, batch,
  crops; steady state = the last logging window), and of 2 workers vs 1 (one core each);
* compress + decompress time of ``icm.metrics.code_image`` vs CompressAI's own calls on the same
  model and images.

    .venv/bin/python bench/codec_throughput.py [--steps 60] [--batch 8] [--crop 128]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from icm.data.readers import build_reader  # noqa: E402
from icm.data.ray_io import init_ray  # noqa: E402
from icm.metrics import code_image  # noqa: E402
from icm.train.codec import train_codec_loop  # noqa: E402
from icm.train.inputs import crop_pair  # noqa: E402
from icm.train.ray_trainer import fit  # noqa: E402
from icm.train.session import LocalSession  # noqa: E402
from icm.train.stream import Stream  # noqa: E402
from icm.zoo import build_codec  # noqa: E402

CODEC = {"name": "ugicm:bmshj2018-hyperprior", "quality": 3, "channels": [32, 48], "cond_dim": 64, "weights": "random:0"}


def training(args, rows) -> dict[str, float]:
    cfg = {"codec": CODEC, "loss": {"type": "ugicm", "lmbda": 0.013, "lmbda_machine": 0.0065, "lmbda_clip": 0},
           "steps": args.steps, "batch_size": args.batch, "lr": 1e-3, "log_every": args.steps // 3,
           "checkpoint_every": args.steps, "seed": 0, "threads": 1}
    with tempfile.TemporaryDirectory() as tmp:
        local = LocalSession({"train": rows}, tmp)
        torch.set_num_threads(1)
        train_codec_loop(cfg, local)
        out = {"plain_loop": local.reports[-1]["samples_per_s"]}
        init_ray(num_cpus=2)
        for workers in (1, 2):
            result = fit(train_codec_loop, cfg, name=f"bench-{workers}", storage_path=Path(tmp) / "ray",
                         streams={"train": Stream(items=rows, num_cpus=0.1)}, num_workers=workers, cpus_per_worker=0.9)
            out[f"ray_train_{workers}_worker{'s' if workers > 1 else ''}"] = result.metrics["samples_per_s"]
    return out


def coding(images: list[np.ndarray], repeats: int = 3) -> dict[str, float]:
    model = build_codec("bmshj2018-hyperprior", quality=3, weights="random:0").eval()
    model.update(force=True)
    xs = [torch.from_numpy(im).permute(2, 0, 1)[None].float() / 255 for im in images]

    def ours():
        for x in xs:
            code_image(model, x)

    @torch.no_grad()
    def compressai_calls():
        for x in xs:
            h, w = x.shape[-2:]
            ph, pw = -(-h // 64) * 64, -(-w // 64) * 64
            pad = ((pw - w) // 2, pw - w - (pw - w) // 2, (ph - h) // 2, ph - h - (ph - h) // 2)
            out = model.compress(F.pad(x, pad))
            model.decompress(out["strings"], out["shape"])["x_hat"][..., pad[2]:ph - pad[3], pad[0]:pw - pad[1]].clamp(0, 1)

    times = {}
    for name, fn in (("compressai_calls", compressai_calls), ("icm_code_image", ours)):
        fn()  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        times[name] = (time.perf_counter() - start) / (repeats * len(xs))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, default=128)
    args = parser.parse_args()
    reader = build_reader({"type": "shapes", "domain": "photo", "split": "train"})
    records = [r for r in reader.records() if r["status"] == "ok"][:64]
    rng = np.random.default_rng(0)
    rows = [crop_pair(r["image"], r["image"], r["boxes"], args.crop, rng) for r in records]
    train = training(args, rows)
    code = coding([r["image"] for r in records[:16]])
    print("\n== codec training (UG-ICM bmshj2018-hyperprior 32/48 ch, batch "
          f"{args.batch}, crop {args.crop}, 1 core per worker) ==")
    for name, value in train.items():
        print(f"{name:<22}{value:>8.2f} samples/s")
    print(f"1 Ray Train worker / plain loop   {train['ray_train_1_worker'] / train['plain_loop']:.2f}x")
    print(f"2 workers / 1 worker              {train['ray_train_2_workers'] / train['ray_train_1_worker']:.2f}x")
    print("\n== compress + decompress per image (bmshj2018-hyperprior q3, 16 shapes images) ==")
    for name, value in code.items():
        print(f"{name:<22}{value * 1000:>8.1f} ms")
    print(f"icm code_image / CompressAI calls {code['icm_code_image'] / code['compressai_calls']:.2f}x")
    print(json.dumps({"train": {k: round(v, 3) for k, v in train.items()},
                      "coding_ms": {k: round(v * 1000, 2) for k, v in code.items()}}))


if __name__ == "__main__":
    main()
