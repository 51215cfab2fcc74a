"""The OW-JRD job's two stages (Ray-free callable classes; Ray Data chains them).

``LadderStage`` (CPU): decode a unit's images, encode → decode each at every level of every
ladder, and (ground-truth reference) encode every object's crop at every level as PNG.
``LabelStage`` (detector, a share of a GPU on a cluster): run the detector on the pristine image
and all its levels, label every object at every level, and write the unit's rows (with
``code_units``, a label stage without a GPU codes its own units first: one CPU pool doing both,
as a separate coder pool would only compete for the same cores and ship every decoded level
between processes):

* ``levels/<unit>.parquet`` — one row per (object, ladder, level) with the crop's PNG bytes;
* ``objects/<unit>.parquet`` — one row per (object, ladder) with its JRD and the original crop;
* ``manifest/<unit>.parquet`` — one row per image (the manifest contract), written last.

Coder actors import this module too, so the detector stack (torchvision, ultralytics, CompressAI:
seconds of CPU per process, on every actor start) is imported only where a detector is built.
"""

from __future__ import annotations

import json
import pickle
import time
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from icm.data.classes import class_list
from icm.data.records import load_record
from icm.data.storage import StorageUnavailable
from icm.data.units import UnitStage
from icm.data.writers import png_bytes
from icm.jrd.labelling import (error_tolerant_jrd, first_unrecognised, is_monotonic, jrd, match_objects,
                               not_recognised_labels)
from icm.jrd.ladders import build_ladder

BOX = pa.list_(pa.float64(), 4)
OBJECT_KEY = [("source_id", pa.string()), ("image_id", pa.string()), ("object_index", pa.int64()),
              ("category_id", pa.int64()), ("CategoryId", pa.int64()), ("class_name", pa.string()),
              ("box", BOX), ("area", pa.float64()), ("ladder", pa.string())]
LEVEL_SCHEMA = pa.schema(OBJECT_KEY + [
    ("level", pa.int64()), ("codec_params", pa.string()), ("bytes", pa.int64()), ("bpp", pa.float64()),
    ("recognised", pa.bool_()), ("label", pa.int64()), ("best_iou", pa.float64()), ("score", pa.float64()),
    ("crop_png", pa.binary())])
OBJECT_SCHEMA = pa.schema(OBJECT_KEY + [
    ("reference", pa.string()), ("levels", pa.int64()), ("recognised_pristine", pa.bool_()),
    ("jrd", pa.int64()), ("first_unrecognised", pa.int64()), ("jrd_tolerant", pa.int64()), ("monotonic", pa.bool_()),
    ("original_png", pa.binary())])
JRD_COLUMNS = pa.schema([("width", pa.int64()), ("height", pa.int64()), ("objects", pa.int64()),
                         ("ladders", pa.string()), ("notes", pa.list_(pa.string()))])


def crop_box(image: np.ndarray, box) -> np.ndarray:
    """The box's pixels (rounded outwards, at least 1×1)."""
    h, w = image.shape[:2]
    x1, y1 = int(np.floor(max(box[0], 0))), int(np.floor(max(box[1], 0)))
    x2, y2 = int(np.ceil(min(box[2], w))), int(np.ceil(min(box[3], h)))
    x2, y2 = max(x2, min(x1 + 1, w)), max(y2, min(y1 + 1, h))
    return np.ascontiguousarray(image[y1:y2, x1:x2])


CODING_FAILED = "coding failed in ladder"


def build_ladders(specs: list[dict]) -> list:
    ladders = [build_ladder(s) for s in specs]
    names = [lad.name for lad in ladders]
    if len(set(names)) != len(names):
        raise ValueError(f"ladder names must be unique, got {names}; give each a name:")
    return ladders


def probe_ladders(ladders: list, side: int = 64) -> None:
    """Code a small gradient at each ladder's first and last level, so that a ladder that cannot
    work here (a binary that rejects its arguments, a codec without weights) fails the job at
    start, naming the ladder, instead of recording every image as an error."""
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    image = np.stack([ramp[None, :].repeat(side, 0), ramp[:, None].repeat(side, 1),
                      np.full((side, side), 128, np.float32)], axis=2).astype(np.uint8)
    for lad in ladders:
        for level in sorted({0, len(lad.levels) - 1}):
            try:
                coded = lad.code(image, level)
            except Exception as exc:  # noqa: BLE001 - reported as the job's reason to stop
                raise RuntimeError(f"ladder {lad.name!r} cannot code a {side}x{side} test image at level {level} "
                                   f"({lad.levels[level]}): {type(exc).__name__}: {exc}") from exc
            if coded.decoded.shape != image.shape:
                raise RuntimeError(f"ladder {lad.name!r} decoded a {side}x{side} test image to {coded.decoded.shape}")


def ladder_failing_everywhere(rows: list[dict], ladder_names: list[str]) -> str | None:
    """The reason to stop a run in which one ladder failed on every image it coded (this run's
    manifest rows): the ladder's name and its first error; None otherwise."""
    tried = [r for r in rows if r["status"] == "ok" or str(r.get("error", "")).startswith(CODING_FAILED)]
    for name in ladder_names:
        failed = [r for r in tried if str(r.get("error", "")).startswith(f"{CODING_FAILED} {name!r}:")]
        if tried and len(failed) == len(tried):
            return (f"ladder {name!r} failed on every image ({len(failed)} of {len(failed)}); first error — "
                    f"{failed[0]['source_id']}: {failed[0]['error'].split(': ', 1)[1]}")
    return None


def label_categories(params: dict, reader) -> tuple[list[str], list[int]]:
    """The categories objects are labelled in: the dataset's; or, with ``reference: detector`` on
    a dataset without a class list, the detector's own (``detector.classes``). Fails at start when
    nothing could be labelled."""
    from icm.maa.stage import reachable_classes

    spec, reference = params["detector"], params.get("reference", "gt")
    if reference not in ("gt", "detector"):
        raise ValueError(f"reference must be 'gt' or 'detector', got {reference!r}")
    if reader.classes:
        reachable_classes(spec, reader.classes)
        return list(reader.classes), list(reader.category_ids)
    if reference == "gt":
        raise ValueError(f"dataset {reader.name!r} has no class list, so it has no ground truth to label: use "
                         "reference: detector (the detector's detections on the pristine image) with detector.classes")
    classes = class_list(spec.get("classes"))
    if not classes:
        raise ValueError(f"reference: detector on dataset {reader.name!r}, which has no class list: give the "
                         "detector's classes (detector.classes: a list, voc, coco80, coco91 or a file)")
    return classes, list(range(len(classes)))


def gt_boxes(record: dict) -> torch.Tensor:
    """The record's ground-truth boxes as the label stage holds them (float32, N×4): crops cut on
    the coder side and on the label side from the same numbers are the same pixels."""
    return torch.as_tensor(np.asarray(record["boxes"], np.float32)).reshape(-1, 4)


class LadderStage:
    """Decode each image of a unit and code it at every ladder level (CPU work); with
    ``crop_gt``, also encode each ground-truth object's crop of the pristine image and of every
    level as PNG (the rows' ``original_png`` / ``crop_png``), so the label actors only detect."""

    def __init__(self, ladders: list[dict], min_side: int = 8, crop_gt: bool = False):
        self.ladders = build_ladders(ladders)
        self.min_side = min_side
        self.crop_gt = crop_gt

    def code_image(self, ref: dict) -> dict[str, Any]:
        try:
            record = load_record(ref, min_side=self.min_side)
        except StorageUnavailable as exc:   # the labelling unit fails on it (and is retried), not this pipeline
            return {"storage_fault": str(exc)}
        return self.code_record(record)

    def code_record(self, record: dict) -> dict[str, Any]:
        """``{"record", "coded": {ladder: [(bytes, decoded, level params), ...]}}``."""
        if record["status"] != "ok":
            return {"record": record}
        coded = {}
        for lad in self.ladders:
            try:
                coded[lad.name] = [(c.num_bytes, c.decoded, {"type": lad.kind, **params})
                                   for c, params in zip(lad.code_all(record["image"]), lad.levels)]
            except Exception as exc:  # noqa: BLE001 - one image's codec failure is that image's error
                return {"record": {**record, "image": None, "status": "error",
                                   "error": f"{CODING_FAILED} {lad.name!r}: {type(exc).__name__}: {exc}"}}
        return {"record": record, "coded": coded}

    def with_crops(self, entry: dict[str, Any]) -> dict[str, Any]:
        """With ``crop_gt``, a coded entry plus ``"crops": {"original": [png per object], ladder:
        [[png per object] per level]}``: every ground-truth object cut from the pristine image and
        from each decoded level."""
        if not self.crop_gt or "coded" not in entry:
            return entry
        record, boxes = entry["record"], [b.tolist() for b in gt_boxes(entry["record"])]
        crops = {"original": [png_bytes(crop_box(record["image"], b)) for b in boxes]}
        for name, levels in entry["coded"].items():
            crops[name] = [[png_bytes(crop_box(dec, b)) for b in boxes] for _, dec, _ in levels]
        return {**entry, "crops": crops}

    def code_unit(self, refs: list[dict]) -> dict[str, dict[str, Any]]:
        """``{source_id: entry}`` for a unit's images, what the label stage takes."""
        return {r["source_id"]: self.with_crops(self.code_image(r)) for r in refs}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        payloads = []
        for unit_json in batch["unit_json"]:
            unit = json.loads(str(unit_json))
            payloads.append(pickle.dumps(self.code_unit(unit["refs"]), protocol=pickle.HIGHEST_PROTOCOL))
        return {"unit_json": batch["unit_json"], "payload": np.array(payloads, dtype=object)}


class LabelStage(UnitStage):
    """Label every object at every level of every ladder with one detector. Detection only runs
    forward: ``deterministic`` sets cuDNN's flags (``configure_inference``), not PyTorch's
    deterministic-algorithm mode."""

    extra_schema = JRD_COLUMNS
    overlap_io = True   # unpickling the coded levels and the parquet writes beside another unit's detection

    def __init__(self, out_dir: str, params: dict, dataset_classes: list[str], category_ids: list[int],
                 code_units: bool = False):
        from icm.maa.stage import build_from_spec, claim_worker_share, detector_label, resolve_device
        from icm.runtime import configure_inference, describe

        self.cfg = params
        deterministic = bool(params.get("deterministic", True))
        configure_inference(deterministic)
        self.device = resolve_device(params.get("device"))
        claim_worker_share(self.device)
        self.runtime = describe(self.device, deterministic, algorithms="forward only: cuDNN deterministic flags",
                                threads=torch.get_num_threads())
        self.canvas = int(params.get("canvas", 512))
        self.iou_threshold = float(params.get("iou_threshold", 0.5))
        self.score_threshold = float(params.get("score_threshold", 0.5))
        self.reference = params.get("reference", "gt")
        if self.reference not in ("gt", "detector"):
            raise ValueError(f"reference must be 'gt' or 'detector', got {self.reference!r}")
        self.batch_size = int(params.get("detect_batch", 16))
        self.coder = LadderStage(params["ladders"], crop_gt=self.reference == "gt") if code_units else None
        spec = params["detector"]
        self.det = build_from_spec(spec, dataset_classes, self.canvas).to(self.device)
        self.class_map = spec.get("class_map")
        self.dataset_classes, self.category_ids = list(dataset_classes), list(category_ids)
        models = [{**self.det.icm_provenance, "label": detector_label(spec)}]
        super().__init__(out_dir, params, models=models, seed=int(params.get("seed", 0)))

    def load_unit(self, batch, i):
        unit = super().load_unit(batch, i)
        return {**unit, "coded": batch["payload"][i]} if "payload" in batch else unit

    def prepare_unit(self, unit):
        """The coder's output for the unit's images (``{source_id: entry}``), unpickled off the
        lock; with ``code_units``, the unit coded here."""
        if self.coder is not None:
            return self.coder.code_unit(unit["refs"])
        coded = unit.get("coded", {})
        return pickle.loads(coded) if isinstance(coded, bytes) else coded

    def error_row(self, ref, reason, started_at):
        return self.row(ref, status="error", error=reason, started_at=started_at, width=0, height=0, objects=0,
                        ladders="", notes=list(ref.get("notes") or []))

    def detect(self, images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        from icm.detectors.evaluate import detect_images

        return detect_images(self.det, images, self.canvas, self.score_threshold, self.batch_size, self.device)

    def reference_objects(self, record: dict, pristine: dict) -> tuple[list[dict], list[str]]:
        """Objects to label: ``{box, det_label, CategoryId}`` (and ``gt_index``, the object's
        index in the record); the ground truth (in the detector's classes) or the detector's own
        detections on the pristine image."""
        from icm.detectors.base import map_targets

        notes = []
        index = {c: i for i, c in enumerate(self.dataset_classes)}
        if self.reference == "gt":
            names = list(record["class_names"])
            mapped = map_targets(gt_boxes(record), names, self.det.classes, self.class_map)
            kept = [i for i, n in enumerate(names) if (self.class_map or {}).get(n, n) in self.det.classes]
            if len(kept) < len(names):
                notes.append(f"{len(names) - len(kept)} object(s) of classes the detector lacks were skipped")
            return [{"box": mapped["boxes"][j].tolist(), "det_label": int(mapped["labels"][j]),
                     "CategoryId": int(record["class_ids"][i]), "gt_index": i} for j, i in enumerate(kept)], notes
        inverse = {v: k for k, v in (self.class_map or {}).items()}
        objects = []
        for box, label in zip(pristine["boxes"], pristine["labels"]):
            name = self.det.classes[int(label)]
            name = inverse.get(name, name)
            if name in index:
                objects.append({"box": [float(v) for v in box], "det_label": int(label), "CategoryId": index[name]})
        return objects, notes

    def process_unit(self, refs):
        started = time.time()
        coded = self.prepared if self.prepared is not None else {}
        rows, level_rows, object_rows = [], [], []
        for ref in refs:
            entry = coded.get(ref["source_id"], {})
            if "storage_fault" in entry:
                raise StorageUnavailable(entry["storage_fault"])
            record = entry.get("record") or {"status": "error", "error": "no ladder output for this image"}
            if record["status"] != "ok":
                rows.append(self.error_row(ref, record["error"], started))
                continue
            try:
                levels, objects, notes = self.label_image(record, entry["coded"], entry.get("crops"))
            except Exception as exc:  # noqa: BLE001 - the image fails, the unit goes on
                rows.append(self.error_row(ref, f"labelling failed: {type(exc).__name__}: {exc}", started))
                continue
            level_rows += levels
            object_rows += objects
            rows.append(self.row(ref, status="ok", output_path=f"levels/{self.unit_id}.parquet", started_at=started,
                                 width=record["width"], height=record["height"],
                                 objects=len({(o["object_index"]) for o in objects}),
                                 ladders=json.dumps({k: len(v) for k, v in entry["coded"].items()}, sort_keys=True),
                                 notes=list(record["notes"]) + notes))
        for kind, table_rows, schema in (("levels", level_rows, LEVEL_SCHEMA), ("objects", object_rows, OBJECT_SCHEMA)):
            self.write_later(partial(write_table_rows, self.storage, f"{kind}/{self.unit_id}.parquet", table_rows, schema))
        return rows

    def label_image(self, record: dict, coded: dict[str, list],
                    crops: dict | None = None) -> tuple[list[dict], list[dict], list[str]]:
        """Rows for one image; ``crops``: the coder's PNG crops of the ground-truth objects (else,
        and always for detector references, the crops are encoded here)."""
        image = record["image"]
        h, w = image.shape[:2]
        names = list(coded)
        decoded = [image] + [d for name in names for _, d, _ in coded[name]]
        detections = self.detect(decoded)
        pristine, per_level = detections[0], detections[1:]
        objects, notes = self.reference_objects(record, pristine)
        if not objects:
            return [], [], notes
        ref_boxes = [o["box"] for o in objects]
        ref_labels = [o["det_label"] for o in objects]
        keys = []
        for k, o in enumerate(objects):
            cid = o["CategoryId"]
            keys.append({"source_id": record["source_id"], "image_id": str(record["image_id"]), "object_index": k,
                         "category_id": int(self.category_ids[cid]), "CategoryId": cid,
                         "class_name": self.dataset_classes[cid], "box": [float(v) for v in o["box"]],
                         "area": float((o["box"][2] - o["box"][0]) * (o["box"][3] - o["box"][1]))})
        at_pristine = match_objects(ref_boxes, ref_labels, pristine["boxes"], pristine["scores"], pristine["labels"],
                                    self.iou_threshold, self.score_threshold)
        coder_crops = crops is not None and self.reference == "gt"
        originals = [crops["original"][o["gt_index"]] if coder_crops else png_bytes(crop_box(image, o["box"]))
                     for o in objects]
        level_rows, object_rows, offset = [], [], 0
        for name in names:
            recognised = []
            for level, (num_bytes, dec, level_params) in enumerate(coded[name]):
                d = per_level[offset + level]
                m = match_objects(ref_boxes, ref_labels, d["boxes"], d["scores"], d["labels"],
                                  self.iou_threshold, self.score_threshold)
                recognised.append(m.recognised)
                params = json.dumps(level_params, sort_keys=True)
                for k, key in enumerate(keys):
                    level_rows.append({**key, "ladder": name, "level": level, "codec_params": params,
                                       "bytes": int(num_bytes), "bpp": 8.0 * num_bytes / (h * w),
                                       "recognised": bool(m.recognised[k]), "label": int(not m.recognised[k]),
                                       "best_iou": float(m.best_iou[k]), "score": float(m.score[k]),
                                       "crop_png": crops[name][level][objects[k]["gt_index"]] if coder_crops
                                       else png_bytes(crop_box(dec, key["box"]))})
            offset += len(coded[name])
            table = np.stack(recognised, axis=1)  # objects × levels
            for k, key in enumerate(keys):
                labels = not_recognised_labels(table[k])
                tolerant = error_tolerant_jrd(labels) if len(labels) >= 8 else jrd(labels)
                object_rows.append({**key, "ladder": name, "reference": self.reference, "levels": len(labels),
                                    "recognised_pristine": bool(at_pristine.recognised[k]), "jrd": jrd(labels),
                                    "first_unrecognised": first_unrecognised(labels),
                                    "jrd_tolerant": int(tolerant), "monotonic": is_monotonic(labels),
                                    "original_png": originals[k]})
        return level_rows, object_rows, notes


def write_table_rows(storage, rel: str, rows: list[dict], schema: pa.Schema) -> None:
    storage.write_table(rel, pa.Table.from_pylist(rows, schema=schema))
