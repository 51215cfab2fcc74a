"""The OW-JRD predictor (IEEE TMM 2023; METHODS.md §5), its inputs, its evaluation, and
JRD-guided compression.

Predictor: a Siamese, truncated EfficientNetV2-S — torchvision's own stem and first four stages
(FusedMBConv 2×24 s1, 4×48 s2, 4×64 s2, MBConv 6×128 s2 with SE 0.25), shared by the original
and the distorted crop (each zero-padded to a centred ``canvas``-sized square, ImageNet-normalised).
Each stage's outputs are pooled to ``canvas/16`` (40×40 at the authors' 640) and concatenated as
``[o, d, o − d]`` over the four stages (792 channels) → 1×1 640 → two 3×3 640 (conv–BN–ReLU) →
1×1 1280 (conv–BN–SiLU) → global average pool → dropout 0.2 → Linear 2 (0 = still recognised,
1 = not), as the authors' ``EffTrainableCNN``/``EffProjectionHead``: BatchNorm eps 1e-3, convs
kaiming-normal (fan-out), the Linear N(0, 0.01), biases zero. (The authors concatenate
``o₀ d₀ … o₃ d₃ (o−d)₀ … (o−d)₃``; ours groups per stage — a fixed permutation of the first 1×1
conv's input channels, the same function class.) The backbone is frozen and, unlike the
authors' (left in train mode: BatchNorm on batch statistics, stochastic depth on), runs in eval
mode, so a pair's prediction does not depend on the rest of its batch. ImageNet weights come
through the zoo (``torchvision:DEFAULT``) where a user has them; here, weights pretrained on the
shapes' object crops (``trained:jrd-efficientnet_v2_s``) or random ones.

Evaluation as the authors do it: an object's ordered per-level predictions → JRD with the error
tolerance rule (``icm.jrd.labelling.error_tolerant_jrd``); MAE in level units, also by COCO area
bin and by class, beside the per-level label accuracy.

JRD-guided compression (the paper's application, image level): per image, the coarsest level at
which a chosen share of its objects is still recognised according to their (predicted or true) JRD.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Iterator

import numpy as np
import torch
import torchvision
from torch import nn

from icm.data.storage import Storage
from icm.data.writers import decode_png
from icm.jrd.export import object_name, split_images
from icm.jrd.labelling import error_tolerant_jrd, jrd
from icm.jrd.report import AREA_BINS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STAGE_CHANNELS = (24, 48, 64, 128)


def _conv(cin: int, cout: int, k: int, act: type[nn.Module]) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout, eps=1e-3),
                         act(inplace=True))


def fusion_head(in_channels: int, dropout: float) -> nn.Sequential:
    """The authors' trainable part, initialised as they do."""
    head = nn.Sequential(_conv(in_channels, 640, 1, nn.ReLU), _conv(640, 640, 3, nn.ReLU), _conv(640, 640, 3, nn.ReLU),
                         _conv(640, 1280, 1, nn.SiLU), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                         nn.Linear(1280, 2))
    for m in head.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return head


class JRDPredictor(nn.Module):
    def __init__(self, backbone: nn.Module | None = None, canvas: int = 640, dropout: float = 0.2):
        super().__init__()
        backbone = backbone or torchvision.models.efficientnet_v2_s(weights=None)
        self.stages = nn.ModuleList(backbone.features[:5])       # stem + the first four stages
        self.stages.requires_grad_(False)
        self.pool = nn.AdaptiveAvgPool2d(canvas // 16)
        self.head = fusion_head(3 * sum(STAGE_CHANNELS), dropout)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.stages.eval()   # frozen backbone: its BatchNorm statistics stay the pretrained ones
        return self

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, h = [], (x - self.mean) / self.std
        for i, stage in enumerate(self.stages):
            h = stage(h)
            if i >= 1:
                out.append(self.pool(h))
        return out

    def forward(self, original: torch.Tensor, distorted: torch.Tensor) -> torch.Tensor:
        """Logits (B, 2) for pairs of padded crops in [0, 1] (B×3×canvas×canvas each)."""
        with torch.no_grad():   # the backbone is frozen: only the fusion head learns
            o, d = self._features(original), self._features(distorted)
        fused = torch.cat([t for a, b in zip(o, d) for t in (a, b, a - b)], dim=1)
        return self.head(fused)


def build_predictor(backbone_weights: str = "random", canvas: int = 640) -> JRDPredictor:
    """The predictor with the EfficientNetV2-S weights a spec names (``torchvision:DEFAULT``,
    a local file, ``trained:<label>``, ``random[:seed]``), provenance attached. A checkpoint of
    a classifier with another number of classes (e.g. one pretrained on shapes crops by
    ``pipelines/train_detectors.py``'s ``backbones:``) is fine: only its feature stages are used."""
    from icm.zoo import build_classifier
    from icm.zoo.weights import load_state_dict, resolve, seeded

    spec, num_classes = str(backbone_weights), None
    if not spec.startswith(("random", "torchvision:")):
        path = resolve(spec, family="efficientnet_v2_s").path
        head = load_state_dict(path).get("classifier.1.weight") if path is not None else None
        num_classes = int(head.shape[0]) if head is not None else None
    backbone = build_classifier("efficientnet_v2_s", weights=backbone_weights, num_classes=num_classes)
    with seeded(0):
        model = JRDPredictor(backbone, canvas)
    model.icm_provenance = backbone.icm_provenance
    return model


def pad_center(image: np.ndarray, canvas: int) -> np.ndarray:
    """A crop zero-padded to a centred ``canvas``² square (larger crops are shrunk to fit first)."""
    h, w = image.shape[:2]
    if max(h, w) > canvas:
        from PIL import Image

        scale = canvas / max(h, w)
        image = np.asarray(Image.fromarray(image).resize((max(1, round(w * scale)), max(1, round(h * scale)))))
        h, w = image.shape[:2]
    out = np.zeros((canvas, canvas, 3), np.uint8)
    top, left = (canvas - h) // 2, (canvas - w) // 2
    out[top:top + h, left:left + w] = image
    return out


# --- inputs: pairs of (original crop, distorted crop, label) ---------------------------------

def pairs_from_export(export_dir: str, split: str) -> list[dict]:
    """The authors' layout (``<split>.json`` + ``JRD_info.json`` + ``objects_infos.json``): one
    pair reference per distorted crop, in the file's order."""
    store = Storage(export_dir)
    entry = json.loads(store.read_text(f"{split}.json"))
    infos = json.loads(store.read_text("objects_infos.json"))
    jrd_info = json.loads(store.read_text("JRD_info.json"))
    pairs = []
    for path, label, name in zip(entry["paths"], entry["labels"], entry["names"]):
        level = int(path.rsplit("_", 1)[-1].split(".")[0])
        info = infos[name]
        pairs.append({"name": name, "object_index": int(info["object_index"]), "level": level, "label": int(label),
                      "jrd": int(jrd_info[name]),
                      "area": info["area"], "class_name": info["class_name"], "source_id": info["source_id"],
                      "original": store.display(f"original/{name}/{name}.png"), "distorted": store.display(path)})
    return pairs


def unit_shards(run_dir: str) -> list[str]:
    """The JRD job's unit shard names (each a ``levels/`` and an ``objects/`` file)."""
    return Storage(run_dir).list("objects", ".parquet")


def pairs_from_run_unit(run_dir: str, shard: str, ladder: str, split: str, split_of: dict[str, str],
                        include_unrecognised: bool = False) -> Iterator[dict]:
    """The pairs of one unit of the JRD job's parquet output (``levels/<unit>``, ``objects/<unit>``),
    with the crops' PNG bytes inline — what Ray Data streams, unit by unit."""
    import pyarrow.compute as pc

    store = Storage(run_dir)
    objects = store.read_table(f"objects/{shard}")
    objects = objects.filter(pc.equal(objects["ladder"], ladder)).to_pylist()
    keep = {(o["source_id"], o["object_index"]): o for o in objects
            if (include_unrecognised or o["recognised_pristine"]) and split_of.get(o["source_id"]) == split}
    if not keep:
        return
    levels = store.read_table(f"levels/{shard}", columns=["source_id", "object_index", "ladder", "level", "label",
                                                           "crop_png"])
    for row in levels.filter(pc.equal(levels["ladder"], ladder)).to_pylist():
        o = keep.get((row["source_id"], row["object_index"]))
        if o is not None:
            yield {"name": object_name(o["image_id"], o["object_index"]), "object_index": o["object_index"],
                   "level": row["level"], "label": row["label"],
                   "jrd": max(o["jrd"], 0), "area": o["area"], "class_name": o["class_name"],
                   "source_id": o["source_id"], "original_png": o["original_png"], "distorted_png": row["crop_png"]}


def run_splits(run_dir: str, ladder: str, fractions: dict[str, float], seed: int) -> dict[str, str]:
    """Image → split for a parquet run, the way the export splits it (same seed, same result)."""
    table = Storage(run_dir).read_tables("objects", ["source_id", "ladder", "recognised_pristine"])
    ids = [r["source_id"] for t in table for r in t.to_pylist() if r["ladder"] == ladder and r["recognised_pristine"]]
    return split_images(ids, fractions, seed)


def split_pairs(source: dict, split: str, split_of: dict[str, str] | None) -> Iterator[dict]:
    """A split's pair references, one at a time (the export's paths, or a parquet run's pairs with
    their PNG bytes, unit by unit): evaluation never holds a split's crops at once."""
    if source.get("export_dir"):
        yield from pairs_from_export(source["export_dir"], split)
        return
    for shard in unit_shards(source["run_dir"]):
        yield from pairs_from_run_unit(source["run_dir"], shard, source["ladder"], split, split_of)


def count_pairs(source: dict, split: str, split_of: dict[str, str] | None) -> int:
    """How many pairs a split holds, from the annotations alone (no crop is decoded)."""
    if source.get("export_dir"):
        return len(json.loads(Storage(source["export_dir"]).read_text(f"{split}.json"))["paths"])
    tables = Storage(source["run_dir"]).read_tables("objects", ["source_id", "ladder", "recognised_pristine", "levels"])
    return sum(r["levels"] for t in tables for r in t.to_pylist()
               if r["ladder"] == source["ladder"] and r["recognised_pristine"] and split_of.get(r["source_id"]) == split)


def decode_pair(row: dict, canvas: int) -> dict[str, np.ndarray]:
    """Padded original and distorted crops of one pair reference (paths/URIs or PNG bytes)."""
    from icm.data.storage import read_location

    def load(key):
        data = row.get(f"{key}_png")
        return decode_png(data if data is not None else read_location(row[key]))
    return {"original": pad_center(load("original"), canvas), "distorted": pad_center(load("distorted"), canvas)}


# --- evaluation -------------------------------------------------------------------------------

def predicted_jrd(levels: list[int], predictions: list[int]) -> int:
    """An object's predicted JRD as a level **value**: the error-tolerance rule (≥ 8 levels; the
    last level predicted 0 otherwise) runs over its predictions in level order, and the position it
    picks is mapped back to that row's level, so a missing level row cannot shift the answer.
    0 (the authors' floor) when no level is predicted recognised."""
    if 0 not in predictions:
        return 0
    position = error_tolerant_jrd(predictions) if len(predictions) >= 8 else jrd(predictions)
    return int(levels[position])


def object_jrds(rows: list[dict]) -> list[dict]:
    """Per object: its per-level predicted labels → predicted JRD (``predicted_jrd``), beside its
    true JRD, area and class."""
    by_object = defaultdict(list)
    for r in rows:
        by_object[r["name"]].append(r)
    out = []
    for name, items in sorted(by_object.items()):
        items.sort(key=lambda r: r["level"])
        predicted = [int(r["prediction"]) for r in items]
        first = items[0]
        out.append({"name": name, "source_id": first["source_id"], "object_index": int(first.get("object_index", -1)),
                    "class_name": first["class_name"], "area": first["area"], "jrd": int(first["jrd"]),
                    "levels": len(items), "jrd_predicted": predicted_jrd([int(r["level"]) for r in items], predicted),
                    "label_accuracy": float(np.mean([int(r["prediction"]) == int(r["label"]) for r in items]))})
    return out


def jrd_metrics(objects: list[dict], rows: list[dict]) -> dict:
    """MAE of the predicted JRD in level units — overall, by COCO area bin, by class — and the
    accuracy of the per-level labels."""
    def mae(items):
        return round(float(np.mean([abs(o["jrd_predicted"] - o["jrd"]) for o in items])), 3) if items else None
    return {"objects": len(objects), "mae": mae(objects),
            "mae_by_area": {name: mae([o for o in objects if lo <= o["area"] < hi]) for name, lo, hi in AREA_BINS},
            "mae_by_class": {c: mae([o for o in objects if o["class_name"] == c])
                             for c in sorted({o["class_name"] for o in objects})},
            "label_accuracy": round(float(np.mean([int(r["prediction"]) == int(r["label"]) for r in rows])), 4)
            if rows else None}


def split_objects(source: dict, split: str, split_of: dict[str, str] | None) -> tuple[list[dict], list[int]]:
    """A split's objects (``class_name``, ``jrd``) and its per-level labels, from the annotations
    alone (no crop decoded): what the baselines are fitted on."""
    if source.get("export_dir"):
        store = Storage(source["export_dir"])
        infos = json.loads(store.read_text("objects_infos.json"))
        jrd_info = json.loads(store.read_text("JRD_info.json"))
        labels = json.loads(store.read_text(f"{split}.json"))["labels"]
        objects = [{"class_name": info["class_name"], "jrd": int(jrd_info[name])}
                   for name, info in infos.items() if info.get("split") == split]
        return objects, [int(v) for v in labels]
    import pyarrow.compute as pc

    store, ladder = Storage(source["run_dir"]), source["ladder"]
    objects, labels = [], []
    for shard in unit_shards(source["run_dir"]):
        table = store.read_table(f"objects/{shard}", ["source_id", "object_index", "ladder", "class_name", "jrd",
                                                       "recognised_pristine"])
        kept = [o for o in table.filter(pc.equal(table["ladder"], ladder)).to_pylist()
                if o["recognised_pristine"] and split_of.get(o["source_id"]) == split]
        if not kept:
            continue
        objects += [{"class_name": o["class_name"], "jrd": max(int(o["jrd"]), 0)} for o in kept]
        keys = {(o["source_id"], o["object_index"]) for o in kept}
        levels = store.read_table(f"levels/{shard}", ["source_id", "object_index", "ladder", "label"])
        labels += [r["label"] for r in levels.filter(pc.equal(levels["ladder"], ladder)).to_pylist()
                   if (r["source_id"], r["object_index"]) in keys]
    return objects, labels


def baseline_comparison(objects: list[dict], rows: list[dict], train_objects: list[dict], train_labels: list[int],
                        draws: int = 2000, seed: int = 0, confidence: float = 0.95) -> dict:
    """The predictor against the trivial answers, on the same test objects and pairs:

    * JRD: each test object predicted as its class's mean JRD over the training objects (the
      training objects' overall mean for a class the training split lacks);
    * per-level label: the training split's majority label.

    MAE and ΔMAE (predictor − baseline; < 0: the predictor is better) with percentile intervals
    from a seeded bootstrap over test **images** (an image's objects are resampled together)."""
    from icm.metrics.bootstrap import interval

    by_class = defaultdict(list)
    for o in train_objects:
        by_class[o["class_name"]].append(o["jrd"])
    overall = float(np.mean([o["jrd"] for o in train_objects])) if train_objects else 0.0
    means = {c: float(np.mean(v)) for c, v in by_class.items()}
    majority = int(np.mean(train_labels) > 0.5) if train_labels else 0
    images = sorted({o["source_id"] for o in objects})
    index = {sid: i for i, sid in enumerate(images)}
    model_err, base_err, counts = (np.zeros(len(images)) for _ in range(3))
    for o in objects:
        i = index[o["source_id"]]
        model_err[i] += abs(o["jrd_predicted"] - o["jrd"])
        base_err[i] += abs(means.get(o["class_name"], overall) - o["jrd"])
        counts[i] += 1

    def maes(picks):
        n = counts[picks].sum()
        return model_err[picks].sum() / n, base_err[picks].sum() / n
    out = {"objects": len(objects), "images": len(images), "draws": draws,
           "class_means": {c: round(v, 2) for c, v in sorted(means.items())}, "majority_label": majority}
    if images:
        full = maes(np.arange(len(images)))
        rng = np.random.default_rng(seed)
        boot = np.array([maes(rng.integers(0, len(images), len(images))) for _ in range(draws)])
        out |= {"mae": round(float(full[0]), 3), "mae_ci": _rounded(interval(boot[:, 0], confidence)),
                "class_mean_mae": round(float(full[1]), 3),
                "class_mean_mae_ci": _rounded(interval(boot[:, 1], confidence)),
                "delta_mae": round(float(full[0] - full[1]), 3),
                "delta_mae_ci": _rounded(interval(boot[:, 0] - boot[:, 1], confidence))}
    if rows:
        out |= {"label_accuracy": round(float(np.mean([int(r["prediction"]) == int(r["label"]) for r in rows])), 4),
                "majority_label_accuracy": round(float(np.mean([int(r["label"]) == majority for r in rows])), 4)}
    return out


def _rounded(values):
    return [round(v, 3) for v in values] if values else values


# --- JRD-guided compression ---------------------------------------------------------------------

def choose_level(jrds: list[int], share: float, levels: int) -> int:
    """The coarsest level (highest index) at which at least ``share`` of an image's objects are
    still recognised according to their JRDs (an object is recognised at every level ≤ its JRD).
    An image without objects gets the coarsest level; level 0 when even it misses the share."""
    if not jrds:
        return levels - 1
    counts = np.asarray(jrds)
    for level in range(levels - 1, -1, -1):
        if np.mean(counts >= level) >= share:
            return level
    return 0


def guided_compression(objects: list[dict], level_rows: list[dict], measure, share: float, levels: int) -> dict:
    """JRD-guided compression at image level over one set of objects.

    ``objects``: the test objects (``source_id``, ``object_index``, ``jrd``, ``jrd_predicted``) —
    those recognised in the pristine image, the ones each level is chosen for; ``level_rows``: the
    JRD job's ``{source_id, object_index, level, recognised, ...}`` rows of their images;
    ``measure(source_id, level, rows)`` codes that image at that level, re-runs the detector and
    returns ``(bytes, recognised flags of rows)``. Every share, the achieved and the uniform level's,
    counts exactly these objects: another object of the same image (one the detector missed in the
    pristine image) counts nowhere.

    Per source of JRD (predicted, true): each image at the coarsest level keeping ``share`` of
    its objects recognised by their JRD (``choose_level``); measured bytes and recognised share;
    then the coarsest uniform level whose recognised share in the job's labels is at least the one
    achieved, measured the same way."""
    kept = {(o["source_id"], o["object_index"]) for o in objects}
    per_image: dict[str, list[dict]] = {}
    for o in objects:
        per_image.setdefault(o["source_id"], []).append(o)
    at_level: dict[tuple[str, int], list[dict]] = {}
    for r in level_rows:
        if (r["source_id"], r["object_index"]) in kept:
            at_level.setdefault((r["source_id"], int(r["level"])), []).append(r)
    by_level: dict[int, list[bool]] = {}
    for (_, level), rows in at_level.items():
        by_level.setdefault(level, []).extend(bool(r["recognised"]) for r in rows)

    def run(choice: dict[str, int]) -> tuple[int, int, int]:
        total_bytes = recognised = count = 0
        for sid, level in sorted(choice.items()):
            rows = sorted(at_level.get((sid, level), []), key=lambda r: r["object_index"])
            num_bytes, flags = measure(sid, level, rows)
            total_bytes += int(num_bytes)
            recognised += int(np.sum(flags))
            count += len(rows)
        return total_bytes, recognised, count

    report = {"share": share, "images": len(per_image), "objects": len(kept), "levels": levels}
    for source, key in (("predicted", "jrd_predicted"), ("true", "jrd")):
        choice = {sid: choose_level([o[key] for o in objs], share, levels) for sid, objs in per_image.items()}
        adaptive_bytes, recognised, count = run(choice)
        achieved = recognised / count if count else 0.0
        uniform = max([lv for lv, rec in by_level.items() if np.mean(rec) >= achieved] or [0])
        uniform_bytes, u_recognised, u_count = run({sid: uniform for sid in per_image})
        report[source] = {"adaptive_bytes": adaptive_bytes, "adaptive_recognised_share": round(achieved, 4),
                          "uniform_level": uniform, "uniform_bytes": uniform_bytes,
                          "uniform_recognised_share": round(u_recognised / u_count, 4) if u_count else None,
                          "bits_saved_percent": round(100 * (1 - adaptive_bytes / uniform_bytes), 2)
                          if uniform_bytes else None,
                          "mean_level": round(float(np.mean(list(choice.values()))), 2) if choice else None}
    return report
