"""Built-in sample data, generated deterministically on first use (no download).

* ``sample_photos``: real photos shipped inside scikit-image, for codec / human-quality demos.
* ``shapes``: a synthetic COCO-format detection set in two visually different domains —
  ``photo`` (filled, shaded shapes on crops of real photos) and ``sketch`` (outlined, hatched
  shapes on gray paper-like textures) — with the same four classes, train/val splits and real
  ``instances_<split>.json`` files. Domain-wise Meta-AAFG needs the two domains.
* ``shapes(variant="jrd")``: the OW-JRD demo's harder photo-domain set (its own folder and
  version; v2 is untouched): smaller objects whose colour differs from the background by a
  spread of contrasts, without v2's dark outline, so that the codecs' coarse levels erase them at
  different levels instead of all surviving JPEG quality 1 (``JRD_VARIANT``).

Files go under ``$ICM_DATA_DIR`` (default ``~/.cache/icm-ray/data``); a finished set is marked by a
stamp file holding its generation parameters, and is written to a temporary folder first and
renamed, so an interrupted generation never leaves a half set behind.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from icm.data.readers import CocoReader, FolderReader

SHAPES_VERSION = 2
# The OW-JRD variant (photo domain only): its parameters are its identity (in its stamp).
JRD_VARIANT = {"version": 1, "domains": ("photo",), "sides": (128, 193), "r_min": 8.0, "contrast": (24.0, 120.0)}
VARIANTS = {"v2": None, "jrd": JRD_VARIANT}
N_TRAIN, N_VAL = 800, 100     # per domain; ~15 s to generate both domains
SHAPE_CLASSES = ["circle", "square", "triangle", "cross"]
DOMAINS = ("photo", "sketch")
PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
               "immunohistochemistry", "colorwheel")
TEXTURE_NAMES = ("brick", "grass", "gravel", "camera", "page", "text")


def data_dir() -> Path:
    return Path(os.environ.get("ICM_DATA_DIR") or Path.home() / ".cache" / "icm-ray" / "data")


def _finished(path: Path, stamp: dict) -> bool:
    marker = path / "STAMP.json"
    return marker.is_file() and json.loads(marker.read_text()) == stamp


def _build_atomically(target: Path, stamp: dict, build) -> Path:
    if _finished(target, stamp):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        (tmp / "STAMP.json").write_text(json.dumps(stamp, sort_keys=True))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _skimage(name: str) -> np.ndarray:
    import skimage.data

    arr = getattr(skimage.data, name)()
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return np.ascontiguousarray(arr[..., :3]).astype(np.uint8)


def sample_photos(root: str | Path | None = None) -> Path:
    """Write the scikit-image photos as PNGs under ``<root>/photos`` and return that folder."""
    target = Path(root or data_dir()) / "photos"

    def build(tmp: Path) -> None:
        for name in PHOTO_NAMES:
            Image.fromarray(_skimage(name)).save(tmp / f"{name}.png")

    return _build_atomically(target, {"version": 1, "photos": list(PHOTO_NAMES)}, build)


def photos_reader(root: str | Path | None = None) -> FolderReader:
    return FolderReader(sample_photos(root), name="photos")


def _background(domain: str, rng: np.random.Generator, size: tuple[int, int],
                sources: dict[str, np.ndarray]) -> Image.Image:
    w, h = size
    names = PHOTO_NAMES if domain == "photo" else TEXTURE_NAMES
    src = sources[names[rng.integers(len(names))]]
    sh, sw = src.shape[:2]
    scale = max(w / sw, h / sh, 1.0)
    if scale > 1.0:
        src = np.asarray(Image.fromarray(src).resize((math.ceil(sw * scale), math.ceil(sh * scale))))
        sh, sw = src.shape[:2]
    y0, x0 = rng.integers(0, sh - h + 1), rng.integers(0, sw - w + 1)
    crop = src[y0:y0 + h, x0:x0 + w].astype(np.float32)
    if domain == "sketch":
        # Low-contrast gray "paper": luminance only, squeezed into [150, 230].
        gray = crop.mean(axis=2, keepdims=True)
        crop = np.repeat(150 + 80 * (gray - gray.min()) / max(float(np.ptp(gray)), 1.0), 3, axis=2)
    return Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8))


def _polygon(cls: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if cls == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    elif cls == "triangle":
        pts = [(0, -1), (0.95, 0.8), (-0.95, 0.8)]
    else:  # cross
        a, b = 1.0, 0.33
        pts = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b),
               (-a, b), (-a, -b), (-b, -b)]
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def _contrasting_color(rng: np.random.Generator, under: np.ndarray) -> tuple[int, int, int]:
    """A random colour at least 120 (RGB distance) from the mean of the background under the
    object: an object a detector cannot see is a label it cannot learn."""
    mean = under.reshape(-1, 3).mean(axis=0)
    for _ in range(64):
        color = rng.integers(0, 256, size=3)
        if np.linalg.norm(color - mean) >= 120:
            break
    else:   # a mid-gray background: go to the far corner of the RGB cube
        color = np.where(mean < 128, 255, 0)
    return tuple(int(v) for v in color)


def _color_at(rng: np.random.Generator, under: np.ndarray, contrast: float) -> tuple[int, int, int]:
    """A colour ``contrast`` away (RGB distance) from the mean of the background under the
    object, in a random direction that stays inside the RGB cube (the JRD variant)."""
    mean = under.reshape(-1, 3).mean(axis=0)
    for _ in range(64):
        direction = rng.normal(size=3)
        color = mean + contrast * direction / np.linalg.norm(direction)
        if np.all((color >= 0) & (color <= 255)):
            break
    else:   # a background near a corner of the cube: towards its centre
        color = mean + contrast * (127.5 - mean) / max(float(np.linalg.norm(127.5 - mean)), 1e-6)
    return tuple(int(v) for v in np.clip(np.rint(color), 0, 255))


def _draw_object(img: Image.Image, domain: str, cls: str, cx: float, cy: float, r: float,
                 rng: np.random.Generator, contrast: float | None = None) -> list[float]:
    """Draw one object and return its box. ``contrast`` (the JRD variant, photo domain): the fill
    is that far from the background and the outline is the fill (v2's darker outline would be an
    edge the codecs keep)."""
    draw = ImageDraw.Draw(img)
    if domain == "photo" and contrast is not None:
        under = np.asarray(img)[int(max(0, cy - r)):int(cy + r) + 1, int(max(0, cx - r)):int(cx + r) + 1]
        fill = _color_at(rng, under, contrast)
        outline, width = fill, 1
    elif domain == "photo":
        under = np.asarray(img)[int(max(0, cy - r)):int(cy + r) + 1, int(max(0, cx - r)):int(cx + r) + 1]
        color = _contrasting_color(rng, under)
        fill, outline, width = color, tuple(max(0, v - 60) for v in color), 2
    else:
        ink = int(rng.integers(0, 70))
        fill, outline, width = None, (ink, ink, ink), int(rng.integers(2, 4))
    angle = float(rng.uniform(-0.35, 0.35))
    if cls == "circle":
        bbox = [cx - r, cy - r, cx + r, cy + r]
        draw.ellipse(bbox, fill=fill, outline=outline, width=width)
        pts = [(bbox[0], bbox[1]), (bbox[2], bbox[3])]
    else:
        pts = _polygon(cls, cx, cy, r, angle)
        draw.polygon(pts, fill=fill, outline=outline, width=width)
    if domain == "sketch":
        # Hatching inside the shape's box keeps the sketch domain's objects textured, not flat.
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        mask = Image.new("L", img.size, 0)
        mdraw = ImageDraw.Draw(mask)
        if cls == "circle":
            mdraw.ellipse([min(xs), min(ys), max(xs), max(ys)], fill=255)
        else:
            mdraw.polygon(pts, fill=255)
        hatch = Image.new("RGB", img.size, outline)
        lines = Image.new("L", img.size, 0)
        ldraw = ImageDraw.Draw(lines)
        for k in range(int(min(xs)) - int(2 * r), int(max(xs)) + 1, 5):
            ldraw.line([(k, max(ys)), (k + (max(ys) - min(ys)), min(ys))], fill=255, width=1)
        img.paste(hatch, (0, 0), Image.fromarray(np.minimum(np.asarray(mask), np.asarray(lines))))
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return [max(0.0, min(xs)), max(0.0, min(ys)), min(float(img.width), max(xs)),
            min(float(img.height), max(ys))]


def _place(rng: np.random.Generator, w: int, h: int, placed: list[tuple[float, float, float]], r_min: float = 12):
    """Centre and radius of a new object whose box keeps a gap from every placed one (occluded
    objects make labels no small detector can learn), or None after a few tries. A rotated
    square reaches √2·r from its centre: boxes are checked at that half-size."""
    r_max = min(w, h) / 5
    for _ in range(30):
        r = float(rng.uniform(r_min, r_max))
        half = 1.42 * r
        cx, cy = float(rng.uniform(half + 1, w - half - 1)), float(rng.uniform(half + 1, h - half - 1))
        if all(abs(cx - px) > half + 1.42 * pr + 3 or abs(cy - py) > half + 1.42 * pr + 3 for px, py, pr in placed):
            return cx, cy, r
    return None


def _make_image(domain: str, rng: np.random.Generator, sources: dict[str, np.ndarray], variant: dict | None = None):
    """One image and its objects; ``variant`` None is v2 (its random draws, in its order)."""
    # Sides up to 1.5× the demo canvas (128): letterboxing shrinks objects by at most 1.5×.
    sides = variant["sides"] if variant else (128, 193)
    w, h = int(rng.integers(*sides)), int(rng.integers(*sides))
    img = _background(domain, rng, (w, h), sources)
    objects, placed = [], []
    for _ in range(int(rng.integers(2, 6))):
        spot = _place(rng, w, h, placed, *([variant["r_min"]] if variant else []))
        if spot is None:
            break
        placed.append(spot)
        cls_idx = int(rng.integers(len(SHAPE_CLASSES)))
        contrast = float(rng.uniform(*variant["contrast"])) if variant else None
        box = _draw_object(img, domain, SHAPE_CLASSES[cls_idx], *spot, rng, contrast)
        objects.append((box, cls_idx))
    if domain == "photo":
        img = img.filter(ImageFilter.GaussianBlur(0.6))
    return img, objects


def shapes(root: str | Path | None = None, n_train: int = N_TRAIN, n_val: int = N_VAL,
           seed: int = 0, variant: str = "v2") -> Path:
    """Generate (once) and return the synthetic shapes set (``variant``: ``v2``, or ``jrd``, the
    OW-JRD demo's harder photo-domain set).

    Layout: ``<root>/shapes[-jrd][-<n_train>-<n_val>-<seed>]/<domain>/{train,val}/*.png`` and
    ``<domain>/annotations/instances_{train,val}.json``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"shapes variant {variant!r} is not one of {sorted(VARIANTS)}")
    params = VARIANTS[variant]
    suffix = "" if (n_train, n_val, seed) == (N_TRAIN, N_VAL, 0) else f"-{n_train}-{n_val}-{seed}"
    target = Path(root or data_dir()) / f"shapes{'' if params is None else '-' + variant}{suffix}"
    stamp = {"version": SHAPES_VERSION, "n_train": n_train, "n_val": n_val, "seed": seed,
             "classes": SHAPE_CLASSES}
    if params is not None:
        stamp["variant"] = {"name": variant, **{k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}}
    domains = DOMAINS if params is None else params["domains"]

    def build(tmp: Path) -> None:
        sources = {n: _skimage(n) for n in PHOTO_NAMES + TEXTURE_NAMES}
        categories = [{"id": i + 1, "name": n, "supercategory": "shape"}
                      for i, n in enumerate(SHAPE_CLASSES)]
        for domain in domains:
            d_index = DOMAINS.index(domain)
            for split, count in (("train", n_train), ("val", n_val)):
                rng = np.random.default_rng([seed, d_index, 0 if split == "train" else 1])
                (tmp / domain / split).mkdir(parents=True)
                images, annotations = [], []
                for i in range(count):
                    img, objects = _make_image(domain, rng, sources, params)
                    file_name = f"{split}/{domain}_{split}_{i:05d}.png"
                    img.save(tmp / domain / file_name)
                    images.append({"id": i + 1, "file_name": file_name,
                                   "width": img.width, "height": img.height})
                    for box, cls_idx in objects:
                        bw, bh = box[2] - box[0], box[3] - box[1]
                        annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                                            "category_id": cls_idx + 1,
                                            "bbox": [round(v, 2) for v in (box[0], box[1], bw, bh)],
                                            "area": round(bw * bh, 2), "iscrowd": 0})
                (tmp / domain / "annotations").mkdir(exist_ok=True)
                (tmp / domain / "annotations" / f"instances_{split}.json").write_text(json.dumps(
                    {"images": images, "annotations": annotations, "categories": categories,
                     "info": {"description": f"icm-ray synthetic shapes, domain {domain}"
                                             + ("" if params is None else f", variant {variant}"),
                              "version": SHAPES_VERSION if params is None else f"{variant}-{params['version']}",
                              "seed": seed}}))

    return _build_atomically(target, stamp, build)


def shapes_reader(domain: str = "photo", split: str = "train", root: str | Path | None = None,
                  n_train: int = N_TRAIN, n_val: int = N_VAL, seed: int = 0, variant: str = "v2") -> CocoReader:
    domains = DOMAINS if VARIANTS.get(variant) is None else VARIANTS[variant]["domains"]
    if domain not in domains:
        raise ValueError(f"shapes domain {domain!r} is not one of {domains}" + ("" if variant == "v2" else
                                                                               f" (variant {variant!r})"))
    base = shapes(root, n_train=n_train, n_val=n_val, seed=seed, variant=variant) / domain
    return CocoReader(base / "annotations" / f"instances_{split}.json", base,
                      name=f"shapes-{domain}-{split}" if variant == "v2" else f"shapes-{variant}-{domain}-{split}")
