"""One trial of a rate-distortion sweep (``tuning/sweep_rd.py`` runs them on Ray Tune): train one
codec at one rate point in one variant through the project's codec job (Ray Train inside the
Tune trial), evaluate it with real bitstreams through the evaluation stage, report its RD point.

A sweep config names a base ``train`` config (a ``pipelines/train_codec.py`` mapping), the
``rate_points`` and ``variants`` (each ``{name, set: {dotted.key: value}}``, applied to the base in
that order) and the ``evaluate`` settings (dataset, detectors, canvas). Curves are written as
CompressAI results JSON (``name``, ``description``, ``results: {bpp, psnr-rgb, ms-ssim-rgb, …}``
plus ``map50-<detector>`` keys), so published curves load the same way.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

import numpy as np

from icm.config import apply_override, canonical_json
from icm.data.ray_io import select_refs
from icm.data.readers import build_reader
from icm.data.storage import Storage, join_location
from icm.maa.stage import detector_label
from icm.metrics.bootstrap import bd_rate_against_anchor
from icm.metrics.codec_eval import evaluate_locally, image_points
from icm.metrics.rd import span_note
from icm.train.codec_job import check_config, train_codec_job, training_images
from icm.train.ray_trainer import report_trial


def trial_id(variant: str, rate_point: str) -> str:
    return f"{variant}__{rate_point}"


def _named(entries: list[dict], name: str, kind: str) -> dict:
    found = [e for e in entries if e["name"] == name]
    if len(found) != 1:
        raise ValueError(f"{kind} {name!r}: {'not in' if not found else 'repeated in'} the sweep config")
    return found[0]


def trial_config(sweep: dict, rate_point: str, variant: str) -> dict:
    """The codec training config of one trial: the sweep's ``train`` mapping, then the rate
    point's and the variant's ``set`` overrides; its own name, label and out_dir."""
    cfg = copy.deepcopy(sweep["train"])
    for entry in (_named(sweep["rate_points"], rate_point, "rate point"), _named(sweep["variants"], variant, "variant")):
        for key, value in (entry.get("set") or {}).items():
            apply_override(cfg, f"{key}={json.dumps(value)}")
    tid = trial_id(variant, rate_point)
    cfg.update(name=tid, label=None, out_dir=join_location(sweep["out_dir"], f"trials/{tid}"))
    return cfg


def evaluation_params(sweep: dict, codecs: list[dict]) -> dict:
    ev = sweep["evaluate"]
    return {"codecs": codecs, "detectors": ev.get("detectors", []), "canvas": ev.get("canvas", 512),
            "score_threshold": ev.get("score_threshold", 0.01), "device": ev.get("device", "auto"),
            "deterministic": ev.get("deterministic", True), "seed": ev.get("seed", 0)}


def evaluation_images(sweep: dict) -> tuple[list[dict], list[str]]:
    reader = build_reader(sweep["evaluate"]["dataset"])
    return select_refs(reader, sweep["evaluate"].get("limit")), reader.classes


def point_metrics(points: list[dict], curve: str, detectors: list[str]) -> list[dict]:
    """A curve's RD points as flat metrics: PSNR/MS-SSIM from the human (or only) decode, mAP
    from the machine (or only) decode."""
    out = []
    for index in sorted({p["point"] for p in points if p["curve"] == curve}):
        decodes = {p["decode"]: p for p in points if p["curve"] == curve and p["point"] == index}
        human = decodes.get("human") or decodes["single"]
        machine = decodes.get("machine") or decodes["single"]
        out.append({"bpp": human["bpp"], "psnr": human["psnr"], "ms_ssim": human["ms_ssim"], "images": human["images"],
                    "params": human["params"],
                    **{f"map50/{d}": machine["map50"][d] for d in detectors},
                    **{f"map/{d}": machine["map"][d] for d in detectors}})
    return out


def trial_curve(sweep: dict, variant: str, detectors: list[dict], classes: list[str]) -> list[dict]:
    """A variant's rate points from its trials' evaluation outputs (``image_points``), for
    bootstrap over images: per-image bpp and PSNR of the human (or only) decode and, per detector,
    pycocotools' per-image matches of the machine (or only) decode."""
    store = Storage(sweep["out_dir"])
    points = []
    for rate in sweep["rate_points"]:
        results = image_points(store.display(f"trials/{trial_id(variant, rate['name'])}/evaluate"), detectors, classes)
        decodes = {decode for curve, _, decode in results if curve == "codec"}
        human = results[("codec", 0, "human" if "human" in decodes else "single")]
        machine = results[("codec", 0, "machine" if "machine" in decodes else "single")]
        points.append({"rate_point": rate["name"], "source_ids": human["source_ids"], "bpp": human["bpp"],
                       "psnr": human["psnr"], "matches": machine["matches"]})
    return points


def anchor_curve(sweep: dict, label: str, detectors: list[dict], classes: list[str]) -> list[dict]:
    """An anchor's (a ladder's) rate points from its evaluation output, as ``trial_curve``."""
    results = image_points(join_location(sweep["out_dir"], f"anchors/{label}"), detectors, classes)
    return [results[key] for key in sorted(k for k in results if k[0] == label)]


def bootstrap_bd_table(sweep: dict, anchor: str) -> dict:
    """BD-rate of every variant against ``anchor`` on PSNR and on each detector's mAP@.5, with
    bootstrap intervals over the evaluation images (``report.bootstrap`` resamples, the same for
    every curve; ``icm.metrics.bootstrap.bd_rate_against_anchor``)."""
    report = sweep.get("report") or {}
    detectors = sweep["evaluate"].get("detectors", [])
    _, classes = evaluation_images(sweep)
    base = anchor_curve(sweep, anchor, detectors, classes)
    images = base[0]["source_ids"]
    rng = np.random.default_rng(int(report.get("seed", 0)))
    draws = rng.integers(0, len(images), (int(report.get("bootstrap", 200)), len(images)))
    confidence = float(report.get("confidence", 0.95))
    span = report.get("span", "union")
    axes = ["psnr"] + [detector_label(d) for d in detectors]
    table = {}
    for variant in sweep["variants"]:
        curve = trial_curve(sweep, variant["name"], detectors, classes)
        if any(p["source_ids"] != images for p in curve):
            raise ValueError(f"{variant['name']}: its trials and the anchor {anchor} were evaluated on other images")
        table[variant["name"]] = {axis: bd_rate_against_anchor(base, curve, axis, draws, confidence, span=span)
                                  for axis in axes}
    return {"anchor": anchor, "images": len(images), "bootstrap": len(draws), "confidence": confidence, "axes": axes,
            "span": span, "table": table}


def bootstrap_bd_markdown(result: dict) -> str:
    pct = round(100 * result["confidence"])
    axes = result["axes"]
    names = ["PSNR" if a == "psnr" else f"mAP@.5 {a}" for a in axes]
    over = span_note(result.get("span", "union"), result["anchor"])
    lines = [f"BD-rate (%) against {result['anchor']} (negative: fewer bits at equal quality), on {result['images']} "
             f"images, {pct} % bootstrap intervals over images ({result['bootstrap']} resamples)"
             + (f"; {over}" if over else ""), "",
             "| curve | " + " | ".join(names) + " |", "|---|" + "---|" * len(axes)]
    notes = []
    for name, row in result["table"].items():
        cells = []
        for axis in axes:
            entry = row[axis]
            if not isinstance(entry["bd_rate"], float):
                notes.append(f"{name}, {axis}: {entry['reason']}")
                cells.append(f"n/a [{len(notes)}]")
                continue
            ci = entry["ci"]
            cell = f"{entry['bd_rate']:+.1f}" + (f" [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else "")
            if entry["defined_share"] < 1:
                cell += f" (defined in {entry['defined_share']:.0%} of resamples)"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if notes:
        lines += [""] + [f"[{i}] {n}" for i, n in enumerate(notes, start=1)]
    return "\n".join(lines) + "\n"


def rd_trial(config: dict[str, Any]) -> None:
    """The Ray Tune function trainable: ``config`` = ``{"sweep", "rate_point", "variant"}``."""
    sweep, rate_point, variant = config["sweep"], config["rate_point"], config["variant"]
    cfg = trial_config(sweep, rate_point, variant)
    store = Storage(cfg["out_dir"])
    fingerprint = hashlib.sha256(canonical_json({"train": cfg, "evaluate": sweep["evaluate"]}).encode()).hexdigest()
    if store.exists("result.json"):   # finished before the sweep was interrupted: never redone
        done = json.loads(store.read_text("result.json"))
        if done.get("config_sha256") == fingerprint:
            report_trial(_reportable(done))
            return
    check_config(cfg)
    refs, targets, matched, classes = training_images(cfg)
    summary = train_codec_job(cfg, refs, targets, matched, classes, report_to_tune=True)
    codec = {**summary["model"]["codec"], "label": "codec", "weights": summary["model"]["weights"]}
    eval_refs, eval_classes = evaluation_images(sweep)
    detectors = [d.get("label") or d["name"] for d in sweep["evaluate"].get("detectors", [])]
    points = evaluate_locally(evaluation_params(sweep, [codec]), eval_refs,
                              join_location(cfg["out_dir"], "evaluate"), eval_classes)
    (point,) = point_metrics(points, "codec", detectors)
    result = {"trial": trial_id(variant, rate_point), "variant": variant, "rate_point": rate_point,
              "steps": summary["steps"], "train_wall_s": summary["train_wall_s"], "model": summary["model"]["weights"],
              "sha256": summary["model"]["sha256"], "rate_point_settings": _named(sweep["rate_points"], rate_point,
                                                                                  "rate point").get("set", {}),
              "variant_settings": _named(sweep["variants"], variant, "variant").get("set", {}),
              "config_sha256": fingerprint, **point}
    write_hparams(summary["tensorboard"], result, detectors)
    store.write_text("result.json", json.dumps(result, indent=2, sort_keys=True))   # last: the trial is done
    report_trial(_reportable(result))


def _reportable(result: dict) -> dict:
    return {k: v for k, v in result.items() if isinstance(v, (int, float, str)) and v is not None} | {"done": True}


def write_hparams(tensorboard_dir: str, result: dict, detectors: list[str]) -> None:
    """One row of TensorBoard's HParams view per trial: its rate point, variant and settings,
    and the final bpp / PSNR / MS-SSIM / mAP of its codec."""
    if "://" in str(tensorboard_dir):
        return   # the codec job keeps its local copy under ./tensorboard and uploads it; see README
    from torch.utils.tensorboard import SummaryWriter

    hparams = {"variant": result["variant"], "rate_point": result["rate_point"],
               **{k: (v if isinstance(v, (int, float, str, bool)) else canonical_json(v))
                  for k, v in {**result["rate_point_settings"], **result["variant_settings"]}.items()}}
    metrics = {"final/bpp": result["bpp"], "final/psnr": result["psnr"] or 0.0, "final/ms_ssim": result["ms_ssim"],
               **{f"final/map50_{d}": result[f"map50/{d}"] for d in detectors}}
    with SummaryWriter(tensorboard_dir) as writer:
        writer.add_hparams(hparams, metrics, run_name="hparams")


def compressai_curve(name: str, description: str, points: list[dict], detectors: list[str],
                     extra: dict[str, list] | None = None) -> dict:
    """CompressAI's results JSON for one curve, points sorted by bpp, plus mAP keys."""
    order = sorted(range(len(points)), key=lambda i: points[i]["bpp"])
    results = {"bpp": [points[i]["bpp"] for i in order], "psnr-rgb": [points[i]["psnr"] for i in order],
               "ms-ssim-rgb": [points[i]["ms_ssim"] for i in order]}
    for d in detectors:
        results[f"map50-{d}"] = [points[i][f"map50/{d}"] for i in order]
        results[f"map-{d}"] = [points[i][f"map/{d}"] for i in order]
    for key, values in (extra or {}).items():
        results[key] = [values[i] for i in order]
    return {"name": name, "description": description, "results": results}
