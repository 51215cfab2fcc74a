"""Machine-side adaptation of one base codec, measured at matched rate: Adapt-ICMH adapters
(ECCV 2024), dynamic adaptation's post-decoder g_t (ICIP 2024) and per-image latent refinement
(this project's addition), each against the codec it starts from.

    python pipelines/experiments/adaptation.py --config pipelines/experiments/adaptation.yaml
    make adapt-demo          # the same, on the shapes set, after the demo detectors

Stages, each the project's own job, each resumable (rerun the same command):
0. the base codec (``base_codec``; ``train_codec.train_once``: the codec demos' one base, trained
   once per recipe and reused by every job naming it) decoded at ``base_beta`` — as a plain
   codec (``UGICM.at_beta``), the codec the three methods adapt;
1. Adapt-ICMH adapters at each ``adapters.task_lmbda`` (the adapters' encoder side moves the
   rate: the candidate whose bpp stays within ±``matched_rate.tolerance`` of the base's is the
   one reported at matched rate); g_t (``dynamic``: the base frozen, decoding as it decodes);
   both trained once per recipe like the base;
2. one evaluation with real bitstreams (``pipelines/evaluate.py``) of the base, every adapter
   candidate, g_t (human decode x̂ = the base's, machine decode x̄), the refined base and the
   anchors, by the seen and the unseen detectors;
3. the analysis: per method, ΔmAP@.5 (method − base) for each detector, ΔPSNR of the human decode
   and Δbpp, with paired bootstrap intervals over the evaluation images
   (``icm.metrics.bootstrap.paired_point_deltas``).
Writes ``adaptation.md`` / ``.json`` and ``summary.json`` under ``out_dir``.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "pipelines")]

import numpy as np  # noqa: E402

import evaluate  # noqa: E402
import train_codec  # noqa: E402
from common import parse_args, resolve_config, write_resolved, write_summary  # noqa: E402

from icm.config import canonical_json, deep_merge, load_section  # noqa: E402
from icm.data.readers import build_reader  # noqa: E402
from icm.data.storage import Storage  # noqa: E402
from icm.maa.stage import detector_label  # noqa: E402
from icm.metrics.bootstrap import paired_point_deltas  # noqa: E402
from icm.metrics.codec_eval import image_points  # noqa: E402
from icm.zoo.weights import weights_fingerprint  # noqa: E402


def matched_rate(bpp: dict[str, float], base_bpp: float, tolerance: float = 0.10) -> str | None:
    """The candidate whose bpp is nearest the base's among those within ±``tolerance`` of it
    (relative), or None when none is."""
    within = {k: abs(v / base_bpp - 1) for k, v in bpp.items() if abs(v / base_bpp - 1) <= tolerance}
    return min(within, key=within.get) if within else None


def method_config(section: dict, name: str, out_dir: str, base: dict, beta: float, ray: dict, **loss) -> dict:
    """A ``train_codec.py`` config of one method, adapting the base codec at ``beta``."""
    cfg = deep_merge(load_section(section, REPO), {"name": name, "label": None, "out_dir": out_dir,
                                                    "codec": {"base_weights": base["weights"], "beta": beta},
                                                    "loss": loss, "ray": ray})
    cfg.pop("profiles", None)
    return cfg


def evaluation_config(cfg: dict, store: Storage, base: dict, adapters: dict[str, dict], dynamic: dict) -> dict:
    """The one evaluation of every codec; its out_dir is named by what it evaluates (weights by
    content), so a retrained method is evaluated afresh instead of refused."""
    beta = float(cfg.get("base_beta", 0.0))
    base_spec = {**base["codec"], "beta": beta, "weights": base["weights"]}
    codecs = [{"label": "base", **base_spec}]
    codecs += [{"label": label, **info["codec"], "weights": info["weights"]} for label, info in adapters.items()]
    codecs += [{"label": "dynamic", **dynamic["codec"], "weights": dynamic["weights"]},
               {"label": "refined", **base_spec, "refine": cfg["refine"]}]
    codecs += list(cfg.get("anchors") or [])
    ev = {**cfg["evaluate"], "codecs": codecs}
    digest = hashlib.sha256(canonical_json({"evaluate": ev, "weights": [weights_fingerprint(c.get("weights"))
                                                                        for c in codecs]}).encode()).hexdigest()
    return {**ev, "out_dir": store.display(f"evaluate/{digest[:12]}"), "ray": cfg.get("ray") or {}}


def _machine_point(results: dict, curve: str) -> dict:
    """A codec's point for the comparison: bpp and PSNR of its human (or only) decode, detections
    of its machine (or only) decode."""
    decodes = {d for c, _, d in results if c == curve}
    human = results[(curve, 0, "human" if "human" in decodes else "single")]
    machine = results[(curve, 0, "machine" if "machine" in decodes else "single")]
    return {**human, "matches": machine["matches"]}


def analyse(results: dict, adapters: list[str], detectors: list[str], analysis: dict, tolerance: float,
            roles: dict[str, str] | None = None) -> dict:
    """The ΔmAP@.5 / ΔPSNR / Δbpp table of every method against ``base`` on the same images, with
    paired bootstrap intervals, and the adapter candidate at matched rate."""
    base = _machine_point(results, "base")
    n = len(base["source_ids"])
    rng = np.random.default_rng(int(analysis.get("seed", 0)))
    draws = rng.integers(0, n, (int(analysis.get("bootstrap", 200)), n))
    confidence = float(analysis.get("confidence", 0.95))
    rows = {label: paired_point_deltas(base, _machine_point(results, label), detectors, draws, confidence)
            for label in [*adapters, "dynamic", "refined"]}
    matched = matched_rate({a: rows[a]["bpp_test"] for a in adapters}, float(np.mean(base["bpp"])), tolerance)
    anchors = sorted({c for c, _, _ in results} - {"base", "dynamic", "refined", "original", *adapters})
    anchor_points = [{"curve": c, "point": p, "params": r["params"], "bpp": float(np.mean(r["bpp"])),
                      "psnr": float(np.mean(r["psnr"])), "map50": {d: r["matches"][d].ap50() for d in detectors}}
                     for (c, p, _), r in sorted(results.items()) if c in anchors]
    return {"images": n, "bootstrap": len(draws), "confidence": confidence, "tolerance": tolerance,
            "detectors": detectors, "roles": roles or {}, "adapter_candidates": adapters, "adapter_matched": matched,
            "base": {"bpp": float(np.mean(base["bpp"])), "psnr": float(np.mean(base["psnr"])),
                     "map50": {d: base["matches"][d].ap50() for d in detectors}},
            "methods": rows, "anchors": anchor_points}


def _cell(value: float, ci, digits: int = 3) -> str:
    return f"{value:+.{digits}f} [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]" if ci else f"{value:+.{digits}f}"


def markdown(result: dict, names: dict[str, str]) -> str:
    dets = result["detectors"]
    pct = round(100 * result["confidence"])
    role = {d: f" ({result['roles'][d]})" if d in result["roles"] else "" for d in dets}
    lines = [f"Each method against the base codec on the same {result['images']} images (real bitstreams); "
             f"Δ = method − base, {pct} % paired bootstrap intervals over images ({result['bootstrap']} resamples). "
             f"Matched rate: bpp within ±{result['tolerance']:.0%} of the base's.", "",
             "| codec | bpp | Δbpp | ΔPSNR, human decode (dB) | "
             + " | ".join(f"ΔmAP@.5 {d}{role[d]}" for d in dets) + " |",
             "|---|---|---|---|" + "---|" * len(dets)]
    base = result["base"]
    lines.append(f"| base | {base['bpp']:.3f} | — | {base['psnr']:.2f} dB (absolute) | "
                 + " | ".join(f"{base['map50'][d]:.3f} (absolute)" for d in dets) + " |")
    for label, row in result["methods"].items():
        name = names.get(label, label)
        if label in result["adapter_candidates"]:
            name += " — **matched rate**" if label == result["adapter_matched"] else " (rate not matched)"
        elif abs(row["bpp_test"] / base["bpp"] - 1) > result["tolerance"]:
            name += " (rate not matched)"
        lines.append(f"| {name} | {row['bpp_test']:.3f} | {_cell(row['delta_bpp_percent'], row['delta_bpp_percent_ci'], 1)} % | "
                     f"{_cell(row['delta_psnr'], row['delta_psnr_ci'], 2)} | "
                     + " | ".join(_cell(row[f"delta_map50/{d}"], row[f"delta_map50/{d}_ci"]) for d in dets) + " |")
    if result["adapter_matched"] is None and result["adapter_candidates"]:
        lines += ["", "No adapter candidate stayed within the tolerance: none of them is at matched rate."]
    if result["anchors"]:
        lines += ["", "Anchors on the same images (absolute): "
                  + "; ".join(f"{a['curve']} {json.dumps(a['params'].get('quality', a['point']))}: {a['bpp']:.3f} bpp, "
                              f"{a['psnr']:.2f} dB, " + ", ".join(f"{d} {a['map50'][d]:.3f}" for d in dets)
                              for a in result["anchors"])]
    return "\n".join(lines) + "\n"


def run(cfg: dict, address: str | None = None) -> dict:
    store = Storage(cfg["out_dir"])
    write_resolved(cfg, store.display())
    ray = cfg.get("ray") or {}
    beta = float(cfg.get("base_beta", 0.0))
    start = time.time()
    base = train_codec.train_once(cfg["base_codec"], address, ray, what="base codec")
    times = {"base_s": round(time.time() - start, 1)}
    adapters, names = {}, {}
    for task_lmbda in cfg["adapters"]["task_lmbda"]:
        label = f"adapt_icmh-t{task_lmbda:g}"
        section = {k: v for k, v in cfg["adapters"].items() if k != "task_lmbda"}
        adapters[label] = train_codec.train_once(
            method_config(section, f"{cfg['name']}-{label}", store.display(f"adapt_icmh/t{task_lmbda:g}"), base, beta,
                          ray, task_lmbda=task_lmbda), address, ray, what=f"Adapt-ICMH adapters (task_λ {task_lmbda:g})")
        names[label] = f"Adapt-ICMH adapters, task_λ {task_lmbda:g}"
    times["adapters_s"] = round(time.time() - start - sum(times.values()), 1)
    dynamic = train_codec.train_once(method_config(cfg["dynamic"], f"{cfg['name']}-dynamic", store.display("dynamic"),
                                                   base, beta, ray), address, ray, what="dynamic adaptation g_t")
    names["dynamic"] = "dynamic adaptation g_t (machine decode x̄; human decode = the base's)"
    times["dynamic_s"] = round(time.time() - start - sum(times.values()), 1)
    refine = cfg["refine"]
    names["refined"] = (f"latent refinement ({refine.get('steps')} steps, λ_h {refine.get('lmbda')}, "
                        f"λ_m {refine.get('lmbda_machine')})")
    ev = evaluation_config(cfg, store, base, adapters, dynamic)
    summary_ev = evaluate.run(ev, address)
    times["evaluate_s"] = round(time.time() - start - sum(times.values()), 1)
    reader = build_reader(ev["dataset"])
    results = image_points(ev["out_dir"], ev["detectors"], reader.classes)
    detectors = [detector_label(d) for d in ev["detectors"]]
    roles = {detector_label(d): "seen" if d.get("seen") else "unseen" for d in ev["detectors"]}
    result = analyse(results, list(adapters), detectors, cfg.get("analysis") or {},
                     float((cfg.get("matched_rate") or {}).get("tolerance", 0.10)), roles)
    refined_s = [p.get("refine_seconds_per_image") for p in summary_ev["rd_points"] if p["curve"] == "refined"]
    result["refine_seconds_per_image"] = refined_s[0] if refined_s else None
    store.write_text("adaptation.json", json.dumps(result, indent=2, default=float))
    table = markdown(result, names)
    store.write_text("adaptation.md", table)
    print("\n" + table)
    times["wall_s"] = round(time.time() - start, 1)
    summary = {"job": "adaptation", "name": cfg["name"], "base_codec": {k: base.get(k) for k in (
                   "weights", "sha256", "steps", "recipe", "runner", "trained_now_s")},
               "adapter_matched": result["adapter_matched"], **times, "evaluation": ev["out_dir"],
               "table": store.display("adaptation.md")}
    write_summary(store.display(), summary, f"adaptation {cfg['name']}")
    return summary


def main() -> None:
    args = parse_args(__doc__, "pipelines/experiments/adaptation.yaml")
    run(resolve_config(args), args.address)


if __name__ == "__main__":
    main()
