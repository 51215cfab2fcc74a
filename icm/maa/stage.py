"""The MAA job's per-unit stage: a callable class built once per worker (detectors load once),
turning a fixed unit of images into MAA PNGs and manifest rows. Ray-free; Ray Data calls it."""

from __future__ import annotations

import json
import time
import zlib
from fractions import Fraction
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from icm.data.classes import class_list
from icm.data.records import load_record
from icm.data.units import UnitStage, output_relpath
from icm.data.writers import png_bytes, to_uint8
from icm.detectors.base import map_targets
from icm.maa.bounds import build_bound
from icm.maa.canvas import boxes_to_canvas, letterbox, paste_back, to_tensor
from icm.maa.methods import METHODS, Member, aafg, gradient, group_loss, meta_aafg, per_image_losses
from icm.runtime import Precision, configure, describe, fail_fast_on_nondeterminism
from icm.zoo import build_detector

MAA_COLUMNS = pa.schema([
    ("method", pa.string()), ("width", pa.int64()), ("height", pa.int64()),
    ("resized", pa.bool_()), ("placement", pa.string()),
    ("loss_before", pa.string()), ("loss_after", pa.string()),   # JSON {detector: loss}
    ("linf", pa.float64()), ("l2", pa.float64()), ("notes", pa.list_(pa.string())),
])


def as_float(value: Any) -> float:
    """Numbers or fractions written as strings ("2/255")."""
    return float(Fraction(value)) if isinstance(value, str) else float(value)


def resolve_device(name: str | None) -> torch.device:
    """``auto``: CUDA when available. A worker Ray gave GPUs to that cannot use CUDA fails here,
    at start: running on its CPU instead would waste the GPU silently."""
    from icm.data.ray_io import assigned_gpu_ids

    gpus = assigned_gpu_ids()
    if gpus and not torch.cuda.is_available():
        raise RuntimeError(
            f"this worker holds GPU(s) {gpus} but torch {torch.__version__} cannot use CUDA (built for CUDA "
            f"{torch.version.cuda or 'none: a CPU build'}): the node's NVIDIA driver is too old for this build or "
            "missing (nvidia-smi shows its version; see cluster/README.md for the minimum), or torch is a CPU build")
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def claim_worker_share(device: torch.device) -> float:
    """Fit this process to what Ray reserved for its actor: torch threads = its CPUs (at least 1),
    so actors sharing a node never oversubscribe its cores; below a whole GPU, PyTorch's caching
    allocator capped at that share of the GPU's memory, so actors sharing a GPU cannot crowd each
    other out. Returns the GPU share (1.0 outside Ray or with a whole GPU)."""
    from icm.data.ray_io import assigned_resources

    reserved = assigned_resources()
    if reserved.get("CPU"):
        torch.set_num_threads(max(1, int(reserved["CPU"] + 1e-9)))
    share = float(reserved.get("GPU") or 1.0)
    if device.type == "cuda" and share < 1:
        torch.cuda.set_per_process_memory_fraction(share, device)
    return min(share, 1.0)


def image_seed(source_id: str, seed: int) -> int:
    """Per-image seed from the image's id (never from the order of work)."""
    return (zlib.crc32(source_id.encode()) ^ (seed * 0x9E3779B1)) % (2 ** 31)


def detector_groups(cfg: dict) -> list[dict]:
    """Config → groups: ``{"name", "detectors": [spec, ...]}``, each spec carrying its effective
    ``class_map`` (the top-level map, then the domain's, then the detector's own, later entries
    winning), so detectors with different label spaces each get theirs.

    aafg: one group of all listed detectors; meta_model: one group per detector;
    meta_domain: one group per entry of ``domains``. Detector labels must be unique: each names
    its loss in the manifest."""
    method = cfg["method"]
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {METHODS}")

    def with_map(spec: dict, *maps) -> dict:
        merged = {k: v for m in (*maps, spec.get("class_map")) for k, v in (m or {}).items()}
        return {**spec, "class_map": merged or None}
    top = cfg.get("class_map")
    if method == "meta_domain":
        domains = cfg.get("domains") or []
        if len(domains) < 2:
            raise ValueError("meta_domain needs at least 2 entries under 'domains'")
        groups = [{"name": d["name"], "detectors": [with_map(s, top, d.get("class_map")) for s in d["detectors"]]}
                  for d in domains]
    else:
        detectors = [with_map(s, top) for s in cfg.get("detectors") or []]
        if method == "aafg":
            if not detectors:
                raise ValueError("aafg needs at least one entry under 'detectors'")
            groups = [{"name": "aafg", "detectors": detectors}]
        else:
            if len(detectors) < 2:
                raise ValueError("meta_model needs at least 2 entries under 'detectors'")
            groups = [{"name": detector_label(d), "detectors": [d]} for d in detectors]
    labels = [detector_label(s) for g in groups for s in g["detectors"]]
    repeated = sorted({x for x in labels if labels.count(x) > 1})
    if repeated:
        raise ValueError(f"detector labels must be unique (each names its loss in the manifest); repeated: "
                         f"{repeated}: give each entry its own label:")
    return groups


def reachable_classes(spec: dict, dataset_classes: list[str]) -> list[str]:
    """The dataset classes whose objects reach the detector of ``spec`` through its
    ``class_map``; fails when none do (the detector would get no ground truth at all). A dataset
    without a class list (an image folder) has no ground truth to check."""
    classes = class_list(spec.get("classes")) or dataset_classes
    class_map = spec.get("class_map") or {}
    reached = [c for c in dataset_classes if class_map.get(c, c) in classes]
    if dataset_classes and not reached:
        raise ValueError(
            f"detector {detector_label(spec)!r}: none of the dataset's classes {dataset_classes[:8]} maps into its "
            f"classes {classes[:8]}, so it would get no ground truth; give it a class_map: {{dataset class: "
            "detector class} (or the right classes:)")
    return reached


def check_detectors(params: dict, dataset_classes: list[str]) -> list[dict]:
    """The detector groups of an MAA config, checked before any worker starts."""
    groups = detector_groups(params)
    for g in groups:
        for spec in g["detectors"]:
            reachable_classes(spec, dataset_classes)
    return groups


def detector_label(spec: dict) -> str:
    return spec.get("label") or spec["name"]


def build_from_spec(spec: dict, dataset_classes: list[str], canvas: int):
    """A frozen detector from a config entry ``{name, weights, classes?, label?, class_map?,
    **builder kwargs}``; ``classes`` defaults to the dataset's."""
    classes = class_list(spec.get("classes")) or dataset_classes
    if not classes:
        raise ValueError(f"detector {detector_label(spec)!r}: the dataset has no class list; "
                         "give the detector's classes (a list, voc, coco80, coco91 or a file)")
    extra = {k: v for k, v in spec.items() if k not in ("name", "weights", "classes", "label", "class_map")}
    return build_detector(spec["name"], classes, weights=spec.get("weights", "random"), image_size=canvas,
                          **extra).freeze()


class MAAStage(UnitStage):
    extra_schema = MAA_COLUMNS
    overlap_io = True   # decode and PNG writes of one unit beside another's attack (icm.data.units)

    def __init__(self, out_dir: str, params: dict, dataset_classes: list[str]):
        self.cfg = params
        self.deterministic = bool(params.get("deterministic", True))
        self.precision = Precision.from_config(params.get("precision"))
        configure(self.deterministic, self.precision)
        self.device = resolve_device(params.get("device"))
        self.gpu_share = claim_worker_share(self.device)
        self.runtime = describe(self.device, self.deterministic, self.precision)
        self.canvas = int(params.get("canvas", 512))
        self.bound = build_bound({k: (as_float(v) if k == "eps" else v)
                                  for k, v in (params.get("bound") or {"type": "linf"}).items()})
        self.alpha = as_float(params.get("alpha", "2/255"))
        self.groups = []   # per group: [(label, detector, class_map)]
        models = []
        for group in check_detectors(params, dataset_classes):
            built = []
            for spec in group["detectors"]:
                det = build_from_spec(spec, dataset_classes, self.canvas).to(self.device).apply_precision(self.precision)
                if self.deterministic:
                    fail_fast_on_nondeterminism(detector_label(spec), lambda: preflight_step(det, self.canvas))
                built.append((detector_label(spec), det, spec["class_map"]))
                models.append({**det.icm_provenance, "label": detector_label(spec), "group": group["name"]})
            self.groups.append(built)
        super().__init__(out_dir, params, models=models, seed=int(params.get("seed", 0)))

    def error_row(self, ref, reason, started_at):
        return self.row(ref, status="error", error=reason, started_at=started_at, method=self.cfg["method"],
                        width=0, height=0, resized=False, placement="", loss_before="", loss_after="",
                        linf=float("nan"), l2=float("nan"), notes=list(ref.get("notes") or []))

    def _bound_maps(self, refs: list[dict], placements):
        """Per-pixel bound maps for ``map`` bounds: (canvas lower, canvas upper) CPU tensors and the
        full-size maps, read from ``lower_dir``/``upper_dir`` at the image's relative path."""
        if self.bound.kind != "map":
            return None, []
        canvas_maps, full_maps = [], []
        for ref, p in zip(refs, placements):
            pair = []
            for key in ("lower_dir", "upper_dir"):
                rec = load_record({**ref, "root": self.cfg["bound"][key], "path": f"{ref['dataset']}/{ref['image_id']}",
                                   "boxes": [], "class_ids": [], "class_names": [], "error": ""})
                if rec["status"] != "ok" or rec["image"].shape[:2] != (p.height, p.width):
                    raise ValueError(f"bound map {key} for {ref['source_id']}: {rec['error'] or 'size differs'}")
                pair.append(to_tensor(rec["image"]))
            full_maps.append(pair)
            canvas_maps.append([letterbox(m, self.canvas)[0] for m in pair])
        return (torch.stack([c[0] for c in canvas_maps]), torch.stack([c[1] for c in canvas_maps])), full_maps

    def prepare_unit(self, unit):
        """Decode and letterbox the unit's images and read its bound maps: CPU work, done outside
        the compute lock (while the actor's other unit uses the GPU)."""
        started = time.time()
        bad, good = [], []
        for ref in unit["refs"]:
            record = load_record(ref)
            if record["status"] != "ok":
                bad.append((ref, record["error"]))
            else:
                good.append((ref, record))
        originals = [to_tensor(record["image"]) for _, record in good]
        placed = [letterbox(original, self.canvas) for original in originals]
        canvas_maps, full_maps = self._bound_maps([r for r, _ in good], [p for _, _, p in placed])
        return {"started": started, "bad": bad, "good": good, "originals": originals, "placed": placed,
                "canvas_maps": canvas_maps, "full_maps": full_maps}

    def process_unit(self, refs):
        unit = self.prepared if self.prepared is not None else self.prepare_unit({"refs": refs})
        started, good, originals, full_maps = unit["started"], unit["good"], unit["originals"], unit["full_maps"]
        self.runtime = describe(self.device, self.deterministic, self.precision, batch=len(refs),
                                threads=torch.get_num_threads())
        rows = [self.error_row(ref, reason, started) for ref, reason in unit["bad"]]
        if not good:
            return rows
        x = torch.stack([c for c, _, _ in unit["placed"]]).to(self.device)
        mask = torch.stack([m for _, m, _ in unit["placed"]]).to(self.device)
        placements = [p for _, _, p in unit["placed"]]
        seeds = [image_seed(ref["source_id"], self.seed) for ref, _ in good]
        groups, dropped = [], [[] for _ in good]
        for built in self.groups:
            members = []
            for label, det, class_map in built:
                targets = [map_targets(boxes_to_canvas(rec["boxes"], p), list(rec["class_names"]), det.classes,
                                       class_map) for (_, rec), p in zip(good, placements)]
                for i, ((_, rec), t) in enumerate(zip(good, targets)):
                    if len(t["labels"]) < len(rec["class_names"]):
                        dropped[i].append(f"{label}: {len(rec['class_names']) - len(t['labels'])} object(s) of "
                                          "classes outside its label space left out of its loss")
                targets = det.prepare_targets([{k: v.to(self.device) for k, v in t.items()} for t in targets],
                                              (self.canvas, self.canvas))
                members.append(Member(label, det, targets, seeds))
            groups.append(members)
        lower, upper = (m.to(self.device) for m in unit["canvas_maps"]) if unit["canvas_maps"] else (None, None)

        def project(adv):
            return self.bound.project(adv, x, lower, upper)
        method = self.cfg["method"]
        if method == "aafg":
            adv = aafg(x, mask, groups[0], project, steps=int(self.cfg.get("steps", 10)), alpha=self.alpha)
        else:
            adv = meta_aafg(x, mask, groups, project, outer=int(self.cfg.get("outer", 10)),
                            inner_steps=int(self.cfg.get("inner_steps", 8)), alpha=self.alpha)
        outputs = []
        for i, ((ref, record), p) in enumerate(zip(good, placements)):
            out = paste_back(originals[i], adv[i].cpu(), x[i].cpu(), p)
            # Re-project at full size: exact after upsampling a downscaled image's perturbation.
            out = self.bound.project(out, originals[i], *(full_maps[i] if full_maps else (None, None)))
            out_u8 = to_uint8(out.numpy())
            if self.bound.kind == "linf":  # and after rounding to 8 bits
                orig = record["image"].astype(np.int16)
                step = int(np.floor(self.bound.eps * 255 + 1e-6))
                out_u8 = np.clip(out_u8.astype(np.int16), orig - step, orig + step).astype(np.uint8)
            outputs.append(out_u8)
        # losses of the images as read and as written (the 8-bit PNG, letterboxed again)
        written = torch.stack([letterbox(to_tensor(out), self.canvas)[0] for out in outputs]).to(self.device)
        members = [m for g in groups for m in g]
        before = {m.name: per_image_losses(m, x) for m in members}
        after = {m.name: per_image_losses(m, written) for m in members}
        for i, ((ref, record), p, out_u8) in enumerate(zip(good, placements, outputs)):
            rel = output_relpath(ref["source_id"])
            self.write_later(partial(write_png_to, self.storage, rel, out_u8))   # encoded and written off the lock
            diff = (out_u8.astype(np.float64) - record["image"].astype(np.float64)) / 255.0
            rows.append(self.row(
                ref, status="ok", output_path=rel, started_at=started, seed=seeds[i], method=method,
                width=p.width, height=p.height, resized=p.resized, placement=json.dumps(p.to_dict()),
                loss_before=json.dumps({k: v[i] for k, v in before.items()}, sort_keys=True),
                loss_after=json.dumps({k: v[i] for k, v in after.items()}, sort_keys=True),
                linf=float(np.abs(diff).max()), l2=float(np.sqrt((diff ** 2).sum())),
                notes=list(record["notes"]) + dropped[i]
                + ([f"downscaled to {p.placed_w}x{p.placed_h} on the canvas"] if p.resized else [])))
        return rows


def preflight_step(det, canvas: int) -> None:
    """One loss + input gradient of ``det`` on one canvas with one box: the ops a unit's steps run."""
    device = next(det.parameters()).device
    c = canvas / 2
    target = {"boxes": torch.tensor([[c / 2, c / 2, c + c / 2, c + c / 2]], device=device),
              "labels": torch.zeros(1, dtype=torch.int64, device=device)}
    member = Member("preflight", det, det.prepare_targets([target], (canvas, canvas)), [0])
    image = torch.rand(1, 3, canvas, canvas, generator=torch.Generator().manual_seed(0)).to(device)
    gradient(lambda a: member.loss(a, 0), image)



def write_png_to(storage, rel: str, image: np.ndarray) -> None:
    storage.write_bytes(rel, png_bytes(image))


def _probe_members(stage: MAAStage, size: int) -> list[Member]:
    """Every detector of ``stage`` on ``size`` canvases with one centred object each."""
    c = stage.canvas / 2
    box = torch.tensor([[c - c / 2, c - c / 2, c + c / 2, c + c / 2]], device=stage.device)
    target = {"boxes": box, "labels": torch.zeros(1, dtype=torch.int64, device=stage.device)}
    return [Member(label, det, det.prepare_targets([target] * size, (stage.canvas, stage.canvas)), list(range(size)))
            for group in stage.groups for label, det, _ in group]


def _heaviest_step(stage: MAAStage, size: int) -> None:
    """A gradient of every detector's loss at once on ``size`` canvases (the stage's largest step)."""
    group = _probe_members(stage, size)
    x = torch.rand(size, 3, stage.canvas, stage.canvas, generator=torch.Generator().manual_seed(size)).to(stage.device)
    gradient(lambda a: group_loss(group, a, 0), x)


def largest_batch(params: dict, dataset_classes: list[str], limit: int = 64, headroom: float = 0.85,
                  gpu_share: float | None = None, cpu_limit: int = 8, cpu_gain: float = 0.9) -> dict:
    """``batch_size: auto`` — what is fastest on the device this runs on (a worker with the job's
    resources). Returns ``{"batch_size", "device", "how", ...}``.

    * CUDA: the largest power of two ≤ ``limit`` whose heaviest step (a gradient of every
      detector's loss at once, one object per canvas) keeps PyTorch's *reserved* memory (what the
      caching allocator holds, not only what tensors use) within ``headroom`` of this actor's share
      of the GPU (``gpu_share``; default: the fraction Ray gave it) and of what is free: actors
      sharing the GPU keep room for theirs.
    * CPU: memory is not the limit and batching buys little (compute-bound, bench/RESULTS.md), so
      it times the heaviest step per image at 1, 2, 4, … ≤ ``cpu_limit`` images (each after a
      warm-up at its own shape) with the worker's threads, and doubles only while a doubling cuts
      the time per image to at most ``cpu_gain`` of the best so far: else the per-image size 1."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        stage = MAAStage(tmp, params, dataset_classes)
    device = stage.device
    share = float(gpu_share) if gpu_share is not None else stage.gpu_share
    if device.type != "cuda":
        per_image, best, size = {}, 1, 1
        while size <= cpu_limit:
            _heaviest_step(stage, size)                      # warm-up at this shape
            start = time.perf_counter()
            _heaviest_step(stage, size)
            per_image[size] = (time.perf_counter() - start) / size
            if size > 1 and per_image[size] > cpu_gain * per_image[best]:
                break
            best, size = size, size * 2
        return {"batch_size": best, "device": "cpu", "threads": torch.get_num_threads(),
                "how": "timed probe: seconds per image of the heaviest step at each size",
                "seconds_per_image": {str(k): round(v, 4) for k, v in per_image.items()}}
    free, total = torch.cuda.mem_get_info(device)
    torch.cuda.empty_cache()
    own = torch.cuda.memory_reserved(device)            # the stage's weights, already on the GPU
    budget = headroom * min(share * total, free + own)
    best, size, peaks = 0, 1, {}
    while size <= limit:
        try:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            _heaviest_step(stage, size)
            torch.cuda.synchronize(device)
            peaks[str(size)] = round(torch.cuda.max_memory_reserved(device) / 2 ** 30, 2)
            if torch.cuda.max_memory_reserved(device) > budget:
                break
            best, size = size, size * 2
        except torch.cuda.OutOfMemoryError:
            peaks[str(size)] = "out of memory"
            break
    torch.cuda.empty_cache()
    return {"batch_size": max(best, 1), "device": torch.cuda.get_device_name(device), "gpu_share": share,
            "how": f"memory probe: peak reserved GiB per size within {headroom:g} of "
                   f"{min(share * total, free + own) / 2 ** 30:.1f} GiB", "peak_reserved_gib": peaks}
