"""The OW-JRD predictor (IEEE TMM 2023; METHODS.md §5), its inputs, its evaluation, and
JRD-guided compression.

Predictor: a Siamese, truncated EfficientNetV2-S — torchvision's own stem and first four stages
(FusedMBConv 2×24 s1, 4×48 s2, 4×64 s2, MBConv 6×128 s2 with SE 0.25), shared by the original
and the distorted crop (each zero-padded to a centred ``canvas``-sized square, ImageNet-normalised).
Each stage's outputs are pooled to ``canvas/16`` (40×40 at the authors' 640) and concatenated as
``[o, d, o − d]`` over the four stages (792 channels) → 1×1 640 → two 3×3 640 → 1×1 1280 (each
conv–BN–SiLU) → global average pool → dropout 0.2 → Linear 2 (0 = still recognised, 1 = not). The
backbone is frozen; ImageNet weights come through the zoo (``torchvision:DEFAULT``) where a user
has them, random otherwise.

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


def _conv(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.SiLU(inplace=True))


class JRDPredictor(nn.Module):
    def __init__(self, backbone: nn.Module | None = None, canvas: int = 640, dropout: float = 0.2):
        super().__init__()
        backbone = backbone or torchvision.models.efficientnet_v2_s(weights=None)
        self.stages = nn.ModuleList(backbone.features[:5])       # stem + the first four stages
        self.stages.requires_grad_(False)
        self.pool = nn.AdaptiveAvgPool2d(canvas // 16)
        self.head = nn.Sequential(_conv(3 * sum(STAGE_CHANNELS), 640, 1), _conv(640, 640, 3), _conv(640, 640, 3),
                                  _conv(640, 1280, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(1280, 2))
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
    a local file, ``random[:seed]``), provenance attached."""
    from icm.zoo import build_classifier
    from icm.zoo.weights import seeded

    backbone = build_classifier("efficientnet_v2_s", weights=backbone_weights)
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
        pairs.append({"name": name, "level": level, "label": int(label), "jrd": int(jrd_info[name]),
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
            yield {"name": object_name(o["image_id"], o["object_index"]), "level": row["level"], "label": row["label"],
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

def object_jrds(rows: list[dict]) -> list[dict]:
    """Per object: its ordered per-level predicted labels → predicted JRD (error tolerance when
    there are ≥ 8 levels), beside its true JRD, area and class."""
    by_object = defaultdict(list)
    for r in rows:
        by_object[r["name"]].append(r)
    out = []
    for name, items in sorted(by_object.items()):
        items.sort(key=lambda r: r["level"])
        predicted = [int(r["prediction"]) for r in items]
        out.append({"name": name, "source_id": items[0]["source_id"], "class_name": items[0]["class_name"],
                    "area": items[0]["area"], "jrd": int(items[0]["jrd"]), "levels": len(items),
                    "jrd_predicted": int(error_tolerant_jrd(predicted) if len(predicted) >= 8 else max(jrd(predicted), 0)),
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
