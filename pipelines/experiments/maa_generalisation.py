"""The MAA paper's claim, in miniature: a codec whose machine decode learns MAA images (made
machine-friendly for a trio of detectors) serves detectors *outside* that trio better, at matched
rate, than the same codec learning the original images.

    python pipelines/experiments/maa_generalisation.py --config pipelines/experiments/maa_generalisation.yaml
    make experiment          # the same, on the shapes set (≈ 42 min on 2 CPU cores, base codec reused)

Four stages, each the project's own job, each resumable (rerun the same command):
0. a base codec (``base_codec``, ``pipelines/train_codec.py``): human and machine decodes learning
   the originals; every codec of the sweep fine-tunes from it, so the two arms of a pair differ
   only in what the machine decode learns during fine-tuning. Reused when its ``model.json``
   records the same recipe, whichever runner made it (``pipelines/train_codec_local.py`` on a
   GPU without Ray gives the same recipe);
1. MAA images of the training images with the model-wise trio (``pipelines/maa_augment.py``);
2. an RD sweep (``tuning/sweep_rd.py``): rate points × {machine target = original, = MAA image}
   × seeds — same architecture, λ, steps and seed within a pair — each codec evaluated with real
   bitstreams by the seen detectors, a held-out one of a seen family and one of an unseen family;
3. the analysis: per detector, ΔmAP@.5 (MAA − original) at each rate point, BD-mAP@.5 (mean mAP
   change at equal rate) and BD-rate on the mAP axis, averaged over seeds, with bootstrap
   intervals over the evaluation images (the same resamples for both codecs of a pair).
Writes ``generalisation.md`` / ``.json`` / ``.png`` and ``summary.json`` under ``out_dir``. On a
cluster the same command runs on COCO/VOC with real weights (change ``maa``, ``codec`` and
``evaluate``); the report reads whatever the stages wrote.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "pipelines"), str(REPO / "tuning")]

import numpy as np  # noqa: E402

import maa_augment  # noqa: E402
import sweep_rd  # noqa: E402
import train_codec  # noqa: E402
from common import exit_status, parse_args, resolve_config, write_resolved, write_summary  # noqa: E402

from icm.config import load_section  # noqa: E402
from icm.data.storage import Storage  # noqa: E402
from icm.maa.stage import detector_label  # noqa: E402
from icm.metrics.bootstrap import paired_curve_comparison  # noqa: E402
from icm.train.rd_sweep import evaluation_images, trial_curve  # noqa: E402


def maa_config(cfg: dict, store: Storage) -> dict:
    maa = load_section(cfg["maa"], REPO)
    maa.update(out_dir=store.display("maa"), ray=cfg.get("ray") or {})
    maa.pop("profiles", None)
    return maa


def base_codec(cfg: dict, address: str | None) -> dict | None:
    """Stage 0: the base codec's ``model.json`` (``train_codec.train_once``: trained here unless one
    of the same recipe is in its out_dir); None without ``base_codec``."""
    if not cfg.get("base_codec"):
        return None
    return train_codec.train_once(cfg["base_codec"], address, cfg.get("ray") or {}, what="base codec")


def sweep_config(cfg: dict, store: Storage, maa_dir: str, base: dict | None = None) -> dict:
    """Variants: for each seed, the original-target codec and the MAA-target codec; every codec
    fine-tunes from the base codec when there is one."""
    variants = []
    for seed in cfg["seeds"]:
        variants += [{"name": f"original-s{seed}", "description": f"machine target = the original, seed {seed}",
                      "set": {"seed": seed, "machine_targets.maa_dir": None}},
                     {"name": f"maa-s{seed}", "description": f"machine target = its MAA image, seed {seed}",
                      "set": {"seed": seed, "machine_targets.maa_dir": maa_dir}}]
    train = dict(cfg["codec"])
    if base is not None:   # a full codec spec, or an override merged into the `from:` file's one
        train["codec"] = {**(train.get("codec") or {}), "weights": base["weights"]}
    return {"name": f"{cfg['name']}-sweep", "out_dir": store.display("sweep"), "train": train,
            "rate_points": cfg["rate_points"], "variants": variants, "evaluate": cfg["evaluate"],
            "anchors": cfg.get("anchors") or [], "report": {"anchor": (cfg.get("anchors") or [{}])[0].get("label")
                                                            or variants[0]["name"]},
            "scheduler": None, "resources": cfg.get("resources") or {}, "ray": cfg.get("ray") or {}}


def analyse(cfg: dict, sweep: dict, seen: list[str]) -> dict:
    detectors = cfg["evaluate"]["detectors"]
    _, classes = evaluation_images(sweep)
    curves = {v["name"]: trial_curve(sweep, v["name"], detectors, classes) for v in sweep["variants"]}
    ids = [p["source_ids"] for c in curves.values() for p in c]
    if any(i != ids[0] for i in ids):
        raise SystemExit("the trials were evaluated on different images; rerun the sweep with one evaluate.limit")
    analysis = cfg.get("analysis") or {}
    rng = np.random.default_rng(int(analysis.get("seed", 0)))
    draws = rng.integers(0, len(ids[0]), (int(analysis.get("bootstrap", 200)), len(ids[0])))
    pairs = [(f"original-s{s}", f"maa-s{s}") for s in cfg["seeds"]]
    rows = []
    for spec in detectors:
        label = detector_label(spec)
        row = paired_curve_comparison(curves, pairs, label, draws, float(analysis.get("confidence", 0.95)))
        row["role"] = "seen (in the MAA trio)" if label in seen else (cfg.get("roles") or {}).get(label, "outside the MAA set")
        rows.append(row)
    return {"images": len(ids[0]), "rate_points": [r["name"] for r in sweep["rate_points"]], "seeds": cfg["seeds"],
            "bootstrap": len(draws), "confidence": float(analysis.get("confidence", 0.95)), "detectors": rows}


def _fmt(value, ci, digits=3) -> str:
    if not isinstance(value, float):
        return "n/a"
    return f"{value:+.{digits}f} [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]" if ci else f"{value:+.{digits}f}"


def markdown(result: dict) -> str:
    pct = round(100 * result["confidence"])
    head = " | ".join(f"ΔmAP@.5 {r}" for r in result["rate_points"])
    lines = [f"MAA-target vs original-target codec, {result['images']} evaluation images, seeds {result['seeds']}, "
             f"{result['bootstrap']} bootstrap resamples over images ({pct} % intervals); Δ = MAA − original, "
             "mean over seeds.", "",
             f"| detector | role | {head} | BD-mAP@.5 | BD-rate on mAP@.5 (%) |",
             "|---|---|" + "---|" * len(result["rate_points"]) + "---|---|"]
    for r in result["detectors"]:
        cells = [_fmt(v, c) for v, c in zip(r["delta_map50"], r["delta_map50_ci"])]
        bd_rate = _fmt(r["bd_rate"], r["bd_rate_ci"], 1)
        if r["bd_rate_defined_share"] < 1:
            bd_rate += f" (defined in {r['bd_rate_defined_share']:.0%} of resamples)"
        lines.append(f"| {r['detector']} | {r['role']} | " + " | ".join(cells)
                     + f" | {_fmt(r['bd_map50'], r['bd_map50_ci'])} | {bd_rate} |")
    lines += ["", "Δbpp (MAA − original) per rate point, mean over seeds: "
              + ", ".join(f"{v:+.4f}" for v in result["detectors"][0]["delta_bpp"]), "",
              "Per seed (mAP@.5 original → MAA at each rate point):"]
    for r in result["detectors"]:
        for p in r["per_pair"]:
            pts = ", ".join(f"{a:.3f}→{b:.3f}" for a, b in zip(p["ref_map50"], p["test_map50"]))
            lines.append(f"- {r['detector']}, {p['pair'][1]}: {pts}")
    return "\n".join(lines) + "\n"


def figure(result: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(result["rate_points"]))
    width = 0.8 / len(result["detectors"])
    for k, r in enumerate(result["detectors"]):
        values = np.asarray(r["delta_map50"])
        ci = np.asarray([c if c else [v, v] for v, c in zip(values, r["delta_map50_ci"])])
        ax.bar(x + k * width, values, width, yerr=[values - ci[:, 0], ci[:, 1] - values], capsize=3,
               label=f"{r['detector']} ({'seen' if r['role'].startswith('seen') else 'outside'})")
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xticks(x + width * (len(result["detectors"]) - 1) / 2, result["rate_points"])
    ax.set_xlabel("rate point (same λ for both codecs)")
    ax.set_ylabel("ΔmAP@.5, MAA − original target")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def run(cfg: dict, address: str | None = None) -> dict:
    store = Storage(cfg["out_dir"])
    write_resolved(cfg, store.display())
    start = time.time()
    base = base_codec(cfg, address)
    base_s = time.time() - start
    maa = maa_config(cfg, store)
    maa_summary = maa_augment.run(maa, address)
    exit_status(maa_summary)   # units that failed: stop here, the rerun retries them
    maa_s = time.time() - start - base_s
    sweep = sweep_config(cfg, store, maa["out_dir"], base)
    sweep_summary = sweep_rd.run(sweep, address)
    if sweep_summary["failed_trials"]:
        raise SystemExit(f"{len(sweep_summary['failed_trials'])} sweep trial(s) failed; rerun the same command")
    sweep_s = time.time() - start - base_s - maa_s
    result = analyse(cfg, sweep, [detector_label(d) for d in maa["detectors"]])
    store.write_text("generalisation.json", json.dumps(result, indent=2))
    table = markdown(result)
    store.write_text("generalisation.md", table)
    store.write_bytes("generalisation.png", figure(result))
    print("\n" + table)
    summary = {"job": "maa_generalisation", "name": cfg["name"], "maa_images": maa_summary["images"],
               "trials": sweep_summary["trials_finished"], "base_codec": base and {
                   k: base.get(k) for k in ("weights", "sha256", "steps", "recipe", "runner")},
               "base_s": round(base_s, 1), "maa_s": round(maa_s, 1), "sweep_s": round(sweep_s, 1),
               "wall_s": round(time.time() - start, 1), "table": store.display("generalisation.md"),
               "figure": store.display("generalisation.png"), "rd_figure": sweep_summary.get("figure")}
    write_summary(store.display(), summary, f"MAA generalisation {cfg['name']}")
    return summary


def main() -> None:
    args = parse_args(__doc__, "pipelines/experiments/maa_generalisation.yaml")
    run(resolve_config(args), args.address)


if __name__ == "__main__":
    main()
