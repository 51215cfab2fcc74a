"""Codec evaluation with real bitstreams (Ray-free; ``pipelines/evaluate.py`` runs it on Ray Data).

Per image and per rate point of every configured codec: compress → bytes → decompress; bpp from
the bytes; PSNR and MS-SSIM of each decode against the original; detections of every configured
detector on each decode. A conditional codec (UG-ICM) is compressed once and its one bitstream
decoded at β = 0 (``human``) and β = 1 (``machine``); other codecs have one decode (``single``).
Anchors (JPEG, WebP, HEVC, …) are the OW-JRD ladders, each level a rate point; ``original`` is the
uncompressed reference.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from icm.codecs.dynamic import DynamicCodec
from icm.codecs.ugicm import UGICM
from icm.data.classes import class_list
from icm.data.records import load_record
from icm.data.units import UnitStage
from icm.data.writers import figure_png, to_uint8
from icm.detectors.base import map_targets
from icm.detectors.evaluate import detect_images
from icm.jrd.ladders import build_ladder
from icm.maa.canvas import to_tensor
from icm.maa.stage import build_from_spec, detector_label, resolve_device
from icm.runtime import configure, describe
from icm.metrics.bitstream import CodedImage, code_image, decode_again
from icm.metrics.detection import coco_map, detections_to_coco, records_to_coco_gt
from icm.metrics.image import ms_ssim, psnr

POINT_SCHEMA = pa.schema([
    ("source_id", pa.string()), ("curve", pa.string()), ("point", pa.int64()), ("params", pa.string()),
    ("decode", pa.string()), ("bytes", pa.int64()), ("bpp", pa.float64()), ("psnr", pa.float64()),
    ("ms_ssim", pa.float64()), ("detections", pa.string()), ("info", pa.string())])
EVAL_COLUMNS = pa.schema([("width", pa.int64()), ("height", pa.int64()), ("gt", pa.string())])


class LearnedPoint:
    """One trained codec = one rate point. A conditional codec (UG-ICM's β, dynamic adaptation's
    g_t) has a human and a machine decode of its one bitstream. ``refine: {steps, lr, lmbda,
    lmbda_machine, detector}`` refines each image's latent at encode time against
    ``R + λ_h·255²·MSE(x, x̂) + λ_m·L_det(x̄)`` with that detector's training loss on the machine
    decode (this project's addition; ``icm.codecs.refine``), for any codec, wrapped or not — the
    bitstream stays a standard one, decoded by the unchanged decoder; its cost per image and the
    objective's terms before and after go into ``info``."""

    REFINE_DEFAULTS = {"steps": 10, "lr": 0.5, "lmbda": 0.0130, "lmbda_machine": 1.0}

    def __init__(self, spec: dict, device, dataset_classes: list[str] | None = None, canvas: int = 512):
        from icm.zoo import build_codec

        kwargs = {k: v for k, v in spec.items() if k not in ("label", "curve", "name", "refine")}
        self.model = build_codec(spec["name"], **kwargs).eval().to(device)
        self.model.update(force=True)
        self.device = device
        self.decode_modes = ({"human": {"beta": 0.0}, "machine": {"beta": 1.0}} if isinstance(self.model, UGICM)
                             else {"human": {"machine": False}, "machine": {"machine": True}}
                             if isinstance(self.model, DynamicCodec) else {"single": {}})
        self.refine = {**self.REFINE_DEFAULTS, **spec["refine"]} if spec.get("refine") else None
        self.params = {k: v for k, v in spec.items() if k not in ("label", "curve")} | (
            {"refine": self.refine} if self.refine else {})
        if self.refine:
            from icm.losses.task import DetectorTrainingLoss

            det_spec = self.refine["detector"]
            classes = list(dataset_classes or [])
            self.refine_loss = DetectorTrainingLoss(build_from_spec(det_spec, classes, canvas).to(device), classes,
                                                    det_spec.get("class_map"))

    def _refined(self, x: torch.Tensor, record: dict) -> tuple[CodedImage, dict]:
        from icm.codecs.refine import compress_latent, refine_latent
        from icm.metrics.bitstream import pad_to_multiple

        start = time.time()
        padded, pad = pad_to_multiple(x)
        boxes = torch.as_tensor(np.asarray(record["boxes"], np.float32)).reshape(-1, 4).to(self.device)
        boxes = boxes + torch.tensor([pad[0], pad[2], pad[0], pad[2]], device=self.device)
        labels = torch.as_tensor(np.asarray(record["class_ids"], np.int64)).reshape(-1)

        def detection_loss(x_bar):   # the padded machine decode, with the boxes moved by the padding
            return self.refine_loss(x_bar, [boxes], [labels])
        with torch.enable_grad():
            y, history = refine_latent(self.model, padded, detection_loss, steps=int(self.refine["steps"]),
                                       lr=float(self.refine["lr"]), lmbda=float(self.refine["lmbda"]),
                                       lmbda_machine=float(self.refine["lmbda_machine"]), pad=pad)
        out = compress_latent(self.model, padded, y)
        h, w = x.shape[-2:]
        num_bytes = sum(len(b) for group in out["strings"] for b in group)
        coded = CodedImage(out["strings"], tuple(out["shape"]), num_bytes, 8.0 * num_bytes / (h * w), x, pad)
        chosen = min(history, key=lambda terms: terms["objective"])
        return coded, {"refine": {"seconds": round(time.time() - start, 3), "before": history[0], "after": chosen,
                                  "steps": len(history) - 1}}

    @torch.no_grad()
    def decodes(self, image: np.ndarray, record: dict | None = None) -> tuple[int, dict[str, np.ndarray], dict]:
        x = to_tensor(image)[None].to(self.device)
        if self.refine:
            coded, info = self._refined(x, record)
        else:
            coded, info = code_image(self.model, x, decode_kwargs=next(iter(self.decode_modes.values()))), {}
        return coded.num_bytes, {mode: to_uint8(decode_again(self.model, coded, kwargs)[0].cpu().numpy())
                                 for mode, kwargs in self.decode_modes.items()}, info


class LadderPoint:
    def __init__(self, ladder, level: int):
        self.ladder, self.level = ladder, level
        self.params = {"type": ladder.kind, **ladder.levels[level]}

    def decodes(self, image, record=None):
        coded = self.ladder.code(image, self.level)
        return coded.num_bytes, {"single": coded.decoded}, {}


class OriginalPoint:
    params = {"type": "original"}

    def decodes(self, image, record=None):
        return image.nbytes, {"single": image}, {}


def rate_points(codecs: list[dict], device, dataset_classes: list[str] | None = None,
                canvas: int = 512) -> list[tuple[str, int, Any]]:
    """(curve, point index, coder) for every rate point of every codec entry."""
    points, per_curve = [("original", 0, OriginalPoint())], defaultdict(int)
    for spec in codecs:
        curve = spec.get("curve") or spec["label"]
        if "ladder" in spec:
            ladder = build_ladder({**spec["ladder"], "name": curve})
            for level in range(len(ladder.levels)):
                points.append((curve, per_curve[curve], LadderPoint(ladder, level)))
                per_curve[curve] += 1
        else:
            points.append((curve, per_curve[curve], LearnedPoint(spec, device, dataset_classes, canvas)))
            per_curve[curve] += 1
    return points


class EvalStage(UnitStage):
    extra_schema = EVAL_COLUMNS

    def __init__(self, out_dir: str, params: dict, dataset_classes: list[str]):
        deterministic = bool(params.get("deterministic", True))
        configure(deterministic)
        self.device = resolve_device(params.get("device"))
        self.runtime = describe(self.device, deterministic)
        self.canvas = int(params.get("canvas", 512))
        self.score_threshold = float(params.get("score_threshold", 0.01))
        self.points = rate_points(params["codecs"], self.device, dataset_classes, self.canvas)
        self.detectors = [(detector_label(s), build_from_spec(s, dataset_classes, self.canvas).to(self.device))
                          for s in params.get("detectors", [])]
        models = [{**getattr(c.model, "icm_provenance", {}), "label": curve}
                  for curve, _, c in self.points if isinstance(c, LearnedPoint)]
        models += [{**d.icm_provenance, "label": label} for label, d in self.detectors]
        super().__init__(out_dir, params, models=models, seed=int(params.get("seed", 0)))

    def error_row(self, ref, reason, started_at):
        return self.row(ref, status="error", error=reason, started_at=started_at, width=0, height=0, gt="")

    def evaluate_image(self, record: dict) -> list[dict]:
        image = record["image"]
        x = to_tensor(image)[None]
        rows, decoded = [], []
        for curve, point, coder in self.points:
            num_bytes, decodes, info = coder.decodes(image, record)
            for mode, dec in decodes.items():
                y = to_tensor(dec)[None]
                decoded.append(dec)
                rows.append({"source_id": record["source_id"], "curve": curve, "point": point,
                             "params": json.dumps(coder.params, sort_keys=True), "decode": mode,
                             "bytes": int(num_bytes), "bpp": 8.0 * num_bytes / (image.shape[0] * image.shape[1]),
                             "psnr": psnr(y, x), "ms_ssim": ms_ssim(y, x), "info": json.dumps(info)})
        # every decode of the image through each detector in batches
        per_detector = {label: detect_images(det, decoded, self.canvas, self.score_threshold, device=self.device)
                        for label, det in self.detectors}
        for i, row in enumerate(rows):
            row["detections"] = json.dumps({label: _as_lists(dets[i]) for label, dets in per_detector.items()})
        return rows

    def process_unit(self, refs):
        started = time.time()
        rows, points = [], []
        for ref in refs:
            record = load_record(ref, min_side=8)
            if record["status"] != "ok":
                rows.append(self.error_row(ref, record["error"], started))
                continue
            try:
                points += self.evaluate_image(record)
            except Exception as exc:  # noqa: BLE001 - this image fails, the unit goes on
                rows.append(self.error_row(ref, f"evaluation failed: {type(exc).__name__}: {exc}", started))
                continue
            gt = {"boxes": np.asarray(record["boxes"]).tolist(), "class_names": list(record["class_names"])}
            rows.append(self.row(ref, status="ok", output_path=f"points/{self.unit_id}.parquet", started_at=started,
                                 width=record["width"], height=record["height"], gt=json.dumps(gt)))
        self.storage.write_table(f"points/{self.unit_id}.parquet", pa.Table.from_pylist(points, schema=POINT_SCHEMA))
        return rows


def evaluate_locally(params: dict, refs: list[dict], out_dir: str, dataset_classes: list[str],
                     unit_size: int = 4) -> list[dict]:
    """The evaluation job's stage run in this process over ``refs`` (a Ray Tune trial evaluating
    its own codec, or an anchor curve): the same rows, files and RD points as
    ``pipelines/evaluate.py``, resumable the same way."""
    from icm.data.manifest import ManifestStore
    from icm.data.ray_io import work_units

    store = ManifestStore(out_dir, EVAL_COLUMNS)
    units = work_units(refs, unit_size, done=store.done_source_ids())
    if units:
        stage = EvalStage(out_dir, params, dataset_classes)
        for unit in units:
            if stage.run_unit(unit) is None:
                raise RuntimeError(f"evaluation unit {unit['unit_id']} failed: {stage.failure}")
    store.consolidate(source_ids={r["source_id"] for r in refs})
    manifest = store.storage.read_table("manifest.parquet").to_pylist()
    point_rows = [r for t in store.storage.read_tables("points") for r in t.to_pylist()]
    return rd_points(manifest, point_rows, params.get("detectors", []), dataset_classes)


def _finite(value) -> float | None:
    """PSNR of a lossless decode is infinite: None in the JSON summary."""
    return float(value) if np.isfinite(value) else None


def _as_lists(pred: dict[str, np.ndarray]) -> dict[str, list]:
    return {"boxes": np.round(pred["boxes"], 3).tolist(), "scores": np.round(pred["scores"], 5).tolist(),
            "labels": pred["labels"].astype(int).tolist()}


def rd_points(manifest_rows: list[dict], point_rows: list[dict], detectors: list[dict],
              dataset_classes: list[str]) -> list[dict]:
    """One RD point per (curve, rate point, decode): mean bpp / PSNR / MS-SSIM over the images and
    COCO mAP per detector (pycocotools) over the same images, ground truth mapped into each
    detector's classes."""
    ok = sorted((r for r in manifest_rows if r["status"] == "ok"), key=lambda r: r["source_id"])
    ok_ids = {r["source_id"] for r in ok}
    groups = defaultdict(list)
    for row in point_rows:
        if row["source_id"] in ok_ids:
            groups[(row["curve"], row["point"], row["decode"])].append(row)
    out = []
    for (curve, point, decode), rows in sorted(groups.items()):
        entry = {"curve": curve, "point": point, "decode": decode, "params": json.loads(rows[0]["params"]),
                 "images": len(rows), "bpp": float(np.mean([r["bpp"] for r in rows])),
                 "psnr": _finite(np.mean([r["psnr"] for r in rows])),
                 "ms_ssim": float(np.mean([r["ms_ssim"] for r in rows])), "map": {}, "map50": {}}
        refined = [json.loads(r.get("info") or "{}").get("refine") for r in rows]
        if any(refined):
            entry["refine_seconds_per_image"] = float(np.mean([r["seconds"] for r in refined if r]))
        for spec in detectors:
            label = detector_label(spec)
            classes = class_list(spec.get("classes")) or dataset_classes
            result = coco_map(*coco_inputs(ok, rows, label, classes, spec.get("class_map")))
            entry["map"][label], entry["map50"][label] = result["map"], result["map50"]
        out.append(entry)
    return out


def image_points(eval_dir: str, detectors: list[dict], dataset_classes: list[str]) -> dict[tuple, dict]:
    """The per-image results of one evaluation's output (``pipelines/evaluate.py``, a sweep
    trial's or an anchor's ``evaluate_locally``), for bootstrap over images: for each (curve, rate
    point, decode) ``{"params", "source_ids"`` (sorted), ``"bpp"``, ``"psnr"`` (per-image arrays in
    that order) and ``"matches": {detector: ImageMatches}}`` (pycocotools' per-image matching)."""
    from icm.data.storage import Storage
    from icm.metrics.bootstrap import ImageMatches

    store = Storage(eval_dir)
    ok = sorted((r for r in store.read_table("manifest.parquet").to_pylist() if r["status"] == "ok"),
                key=lambda r: r["source_id"])
    ids = [r["source_id"] for r in ok]
    groups = defaultdict(dict)
    for table in store.read_tables("points"):
        for row in table.to_pylist():
            groups[(row["curve"], row["point"], row["decode"])][row["source_id"]] = row
    out = {}
    for key, by_id in sorted(groups.items()):
        rows = [by_id[i] for i in ids if i in by_id]
        if len(rows) != len(ids):
            raise ValueError(f"{eval_dir}: {key} has rows for {len(rows)} of its {len(ids)} images")
        matches = {}
        for spec in detectors:
            classes = class_list(spec.get("classes")) or dataset_classes
            matches[detector_label(spec)] = ImageMatches(*coco_inputs(ok, rows, detector_label(spec), classes,
                                                                      spec.get("class_map")))
        out[key] = {"params": json.loads(rows[0]["params"]), "source_ids": ids,
                    "bpp": np.asarray([r["bpp"] for r in rows], float), "psnr": np.asarray([r["psnr"] for r in rows], float),
                    "matches": matches}
    return out


def coco_inputs(manifest_rows, rows, label, classes, class_map) -> tuple[dict, list[dict]]:
    """Ground truth (mapped into the detector's classes) and one decode's detections, in the
    manifest's image order, for ``coco_map``."""
    records = []
    for r in manifest_rows:
        gt = json.loads(r["gt"])
        mapped = map_targets(torch.as_tensor(gt["boxes"], dtype=torch.float32).reshape(-1, 4), gt["class_names"],
                             classes, class_map)
        records.append({"width": r["width"], "height": r["height"], "boxes": mapped["boxes"],
                        "class_ids": mapped["labels"]})
    by_image = {row["source_id"]: json.loads(row["detections"])[label] for row in rows}
    empty = {"boxes": [], "scores": [], "labels": []}
    predictions = [{k: np.asarray(v) for k, v in by_image.get(r["source_id"], empty).items()} for r in manifest_rows]
    return records_to_coco_gt(records, classes), detections_to_coco(predictions)


def rd_figure(points: list[dict], detectors: list[str]) -> bytes:
    """PSNR vs bpp (human / single decodes) and mAP@.5 vs bpp per detector (machine / single)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 1 + len(detectors)
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.8), squeeze=False)
    curves = sorted({(p["curve"], p["decode"]) for p in points if p["curve"] != "original"})
    for curve, decode in curves:
        pts = sorted((p for p in points if p["curve"] == curve and p["decode"] == decode), key=lambda p: p["bpp"])
        name = curve if decode == "single" else f"{curve} ({decode})"
        style = "--" if decode == "machine" else "-"
        if decode != "machine" and all(p["psnr"] is not None for p in pts):
            axes[0, 0].plot([p["bpp"] for p in pts], [p["psnr"] for p in pts], style, marker="o", label=name)
        if decode != "human":
            for k, det in enumerate(detectors, start=1):
                axes[0, k].plot([p["bpp"] for p in pts], [p["map50"][det] for p in pts], style, marker="o", label=name)
    original = [p for p in points if p["curve"] == "original"]
    for k, det in enumerate(detectors, start=1):
        if original:
            axes[0, k].axhline(original[0]["map50"][det], color="gray", lw=0.8, label="uncompressed")
        axes[0, k].set_title(f"{det}: mAP@.5 vs bpp", fontsize=9)
        axes[0, k].set_ylabel("mAP@.5")
    axes[0, 0].set_title("PSNR vs bpp (human decode)", fontsize=9)
    axes[0, 0].set_ylabel("PSNR (dB)")
    for ax in axes[0]:
        ax.set_xlabel("bpp (real bitstream)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return figure_png(fig)
