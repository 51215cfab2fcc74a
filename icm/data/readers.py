"""Dataset readers: each lists ``ImageRef`` s (annotations only, no pixels) for one dataset.

Decoding happens in ``icm.data.records.load_record`` so that, under Ray Data, it runs inside the
workers. Every path a reader takes (annotation files, list files, image roots, manifests) may be
a local path or an object-store URI (``s3://bucket/prefix``, ``gs://…``), read through pyarrow's
filesystems: on a cluster, nodes read the dataset from shared storage. Every reader exposes
``name``, ``root``, ``classes`` (contiguous class index -> name) and ``refs()`` (listed once per
reader, so a job lists its dataset once); ``records()`` decodes sequentially for use without Ray.
A listing that the storage refuses or fails raises ``StorageUnavailable``: only an annotation the
storage says is missing, or one that does not parse, becomes the image's error.

Class ids in records are contiguous indices into ``classes``; ``category_ids`` maps them back to
the dataset's own ids (e.g. COCO's 1..90) for evaluation and export.
"""

from __future__ import annotations

import json
import posixpath
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterator, Sequence

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from icm.data.classes import VOC, class_list
from icm.data.paths import PathEscapesRoot, resolve_location_under
from icm.data.records import ImageRef, load_record
from icm.data.storage import (is_uri, list_files, location_info, map_threads, parent_location, read_file,
                              read_location, resolve_location)


def _require(location, what: str) -> str:
    """``location`` as a string, failing with its name when no file is there."""
    if location_info(location).type != pafs.FileType.File:
        raise FileNotFoundError(f"{what} {location} does not exist")
    return str(location)


def _root(location) -> str:
    """A dataset root as given: a URI as is, a local path made absolute."""
    return str(location) if is_uri(location) else str(Path(location).expanduser())

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")


class Reader:
    name: str
    root: Path
    classes: list[str]
    category_ids: list[int]

    def refs(self) -> list[ImageRef]:
        """The dataset's references, listed on the first call and kept: a job that cuts units,
        then decodes a few images for its figure and evaluates, reads the annotations once."""
        if getattr(self, "_refs", None) is None:
            self._refs = self.list_refs()
        return list(self._refs)

    def list_refs(self) -> list[ImageRef]:
        raise NotImplementedError

    def records(self, min_side: int = 1, source_ids=None) -> Iterator[dict]:
        """Decode the dataset's images in ``source_id`` order — only ``source_ids`` if given."""
        wanted = None if source_ids is None else set(source_ids)
        for ref in self.refs():
            if wanted is None or ref.source_id in wanted:
                yield load_record(ref, min_side=min_side)


def _classes_from(classes: Sequence[str] | str | Path | None) -> list[str]:
    return class_list(str(classes) if isinstance(classes, Path) else classes) or []


def _compact_annotation(obj: dict):
    """``json.loads`` hook: an annotation becomes ``(image_id, category_id, iscrowd, xyxy box)`` as
    soon as it is parsed, its polygon and other fields dropped; other objects stay dicts."""
    if "bbox" in obj and "image_id" in obj:
        x, y, w, h = obj["bbox"]
        return obj["image_id"], obj["category_id"], obj.get("iscrowd", 0), [x, y, x + w, y + h]
    return obj


class CocoReader(Reader):
    """COCO ``instances_*.json``; crowd annotations are skipped.

    Read with a parse hook rather than pycocotools' ``COCO`` index (which keeps every annotation
    dict, polygon included): records carry boxes only, and train2017's 448 MB, parsed whole, would
    take several GB of the driver's memory. Each annotation is reduced to its box as it is parsed,
    and the boxes are handed to the references once they are listed. Evaluation still goes through
    pycocotools (``icm.metrics``)."""

    def __init__(self, annotation_file: str | Path, image_root: str | Path, name: str = "coco",
                 include_crowd: bool = False):
        self.annotation_file = _require(annotation_file, "COCO annotation file")
        text = read_location(self.annotation_file).decode("utf-8-sig")   # the bytes go before the parse
        dataset = json.loads(text, object_hook=_compact_annotation)
        del text
        self.root = _root(image_root)
        self.name = name
        self.include_crowd = include_crowd
        cats = sorted(dataset.get("categories", []), key=lambda c: c["id"])
        self.category_ids = [c["id"] for c in cats]
        self.classes = [c["name"] for c in cats]
        self._index = {cid: i for i, cid in enumerate(self.category_ids)}
        self._images = {img["id"]: img["file_name"] for img in dataset.get("images", [])}
        self._annotations: dict[int, list] = {}
        for ann in dataset.get("annotations", []):
            self._annotations.setdefault(ann[0], []).append(ann)

    def list_refs(self) -> list[ImageRef]:
        out = []
        for image_id in sorted(self._images):
            ref = ImageRef(source_id=f"{self.name}/{image_id}", dataset=self.name,
                           image_id=str(image_id), root=str(self.root), path=self._images[image_id])
            unknown = 0
            for _, category_id, iscrowd, box in self._annotations.get(image_id, []):
                if iscrowd and not self.include_crowd:
                    continue
                if category_id not in self._index:
                    unknown += 1
                    continue
                idx = self._index[category_id]
                ref.boxes.append(box)
                ref.class_ids.append(idx)
                ref.class_names.append(self.classes[idx])
            if unknown:
                ref.notes.append(f"dropped {unknown} annotation(s) with unknown category ids")
            out.append(ref)
        self._annotations = {}   # the boxes live in the references now (kept by refs())
        return out


class VocReader(Reader):
    """Pascal VOC: ``Annotations/<id>.xml`` + ``ImageSets/Main/<split>.txt`` + ``JPEGImages``."""

    VOC_CLASSES = VOC

    def __init__(self, root: str | Path, split: str = "trainval", name: str = "voc",
                 classes: Sequence[str] | str | Path | None = None, include_difficult: bool = False):
        self.root = _root(root)
        self.split = split
        self.name = name
        self.classes = _classes_from(classes) or list(self.VOC_CLASSES)
        self.category_ids = list(range(len(self.classes)))
        self.include_difficult = include_difficult
        self.list_file = _require(resolve_location_under(self.root, f"ImageSets/Main/{split}.txt"), "VOC split list")

    def list_refs(self) -> list[ImageRef]:
        ids = [line.split()[0] for line in read_location(self.list_file).decode().splitlines() if line.strip()]
        ids = sorted(set(ids))   # a split list naming an id twice means one image
        # the annotations are read in parallel: one GET each, on the driver (VOC2007: ~10 k files)
        return map_threads(self._ref, ids)

    def _ref(self, image_id: str) -> ImageRef:
        ref = ImageRef(source_id=f"{self.name}/{image_id}", dataset=self.name, image_id=image_id,
                       root=str(self.root), path=f"JPEGImages/{image_id}.jpg")
        try:
            location = resolve_location_under(self.root, f"Annotations/{image_id}.xml")
            data = read_file(location)   # a storage fault raises: the listing fails, nothing is recorded
            if data is None:
                raise FileNotFoundError(f"{location} does not exist")
            tree = ET.ElementTree(ET.fromstring(data))
        except (PathEscapesRoot, FileNotFoundError, ET.ParseError) as exc:
            ref.error = f"cannot read VOC annotation for {image_id}: {exc}"
            return ref
        filename = tree.findtext("filename")
        if filename:
            ref.path = f"JPEGImages/{filename.strip()}"
        index = {c: i for i, c in enumerate(self.classes)}
        unknown = 0
        for obj in tree.findall("object"):
            if obj.findtext("difficult", "0").strip() == "1" and not self.include_difficult:
                continue
            cls = (obj.findtext("name") or "").strip()
            if cls not in index:
                unknown += 1
                continue
            bb = obj.find("bndbox")
            try:
                # VOC boxes are 1-based inclusive pixel indices.
                box = [float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
            except (TypeError, ValueError, AttributeError):
                ref.notes.append("dropped an object with an unreadable bndbox")
                continue
            ref.boxes.append([box[0] - 1, box[1] - 1, box[2], box[3]])
            ref.class_ids.append(index[cls])
            ref.class_names.append(cls)
        if unknown:
            ref.notes.append(f"dropped {unknown} object(s) of classes not in the class list")
        return ref


class ListTxtReader(Reader):
    """The seeds' list format: one line per image, ``path x1,y1,x2,y2,cls x1,y1,x2,y2,cls ...``.

    Paths are resolved under ``root`` (default: the list file's folder) and may not escape it. A
    path listed again is another image (its own boxes): its k-th repetition gets the id
    ``<name>/<path>#<k>``.
    """

    def __init__(self, list_file: str | Path, root: str | Path | None = None, name: str | None = None,
                 classes: Sequence[str] | str | Path | None = None):
        self.list_file = _require(list_file, "list file")
        self.root = _root(root) if root is not None else parent_location(self.list_file)
        self.name = name or Path(posixpath.basename(self.list_file)).stem
        self.classes = _classes_from(classes)
        self.category_ids = list(range(len(self.classes)))

    def list_refs(self) -> list[ImageRef]:
        out, seen = [], {}
        for lineno, line in enumerate(read_location(self.list_file).decode().splitlines(), start=1):
            parts = line.split()
            if not parts:
                continue
            path = parts[0]
            image_id = Path(path).as_posix()
            seen[image_id] = seen.get(image_id, 0) + 1
            if seen[image_id] > 1:
                image_id = f"{image_id}#{seen[image_id]}"
            ref = ImageRef(source_id=f"{self.name}/{image_id}", dataset=self.name,
                           image_id=image_id, root=str(self.root), path=path)
            for token in parts[1:]:
                fields = token.split(",")
                try:
                    x1, y1, x2, y2, cls = (float(fields[0]), float(fields[1]), float(fields[2]),
                                           float(fields[3]), int(fields[4]))
                except (ValueError, IndexError):
                    ref.notes.append(f"line {lineno}: dropped unreadable box {token!r}")
                    continue
                if cls < 0 or (self.classes and cls >= len(self.classes)):
                    ref.notes.append(f"line {lineno}: dropped box with unknown class id {cls}")
                    continue
                ref.boxes.append([x1, y1, x2, y2])
                ref.class_ids.append(cls)
                ref.class_names.append(self.classes[cls] if self.classes else str(cls))
            out.append(ref)
        return sorted(out, key=lambda r: r.source_id)


class FolderReader(Reader):
    """Every image file under a folder (recursively), without annotations."""

    def __init__(self, root: str | Path, name: str | None = None,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS):
        self.root = _root(root)
        if location_info(self.root).type != pafs.FileType.Directory:
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self.name = name or posixpath.basename(self.root.rstrip("/"))
        self.extensions = tuple(e.lower() for e in extensions)
        self.classes, self.category_ids = [], []

    def list_refs(self) -> list[ImageRef]:
        return [ImageRef(source_id=f"{self.name}/{rel}", dataset=self.name, image_id=rel, root=self.root, path=rel)
                for rel in list_files(self.root) if posixpath.splitext(rel)[1].lower() in self.extensions]


class ManifestReader(Reader):
    """A job's parquet manifest: rows with ``status == ok`` and their ``output_path`` images.

    Paths are resolved under ``root`` (default: the manifest's folder). Annotations travel in the
    optional ``boxes`` / ``class_ids`` / ``class_names`` columns; ``source_id`` is kept, so an
    output keeps the id of the image it was made from.
    """

    def __init__(self, manifest: str | Path, root: str | Path | None = None,
                 path_column: str = "output_path", name: str | None = None,
                 classes: Sequence[str] | str | Path | None = None):
        self.manifest = str(manifest)
        kind = location_info(self.manifest).type
        if kind == pafs.FileType.NotFound:
            raise FileNotFoundError(f"manifest {self.manifest} does not exist")
        self.root = _root(root) if root is not None else (
            self.manifest if kind == pafs.FileType.Directory else parent_location(self.manifest))
        self.path_column = path_column
        self.name = name or Path(posixpath.basename(self.manifest.rstrip("/"))).stem
        self.classes = _classes_from(classes)
        self.category_ids = list(range(len(self.classes)))

    def list_refs(self) -> list[ImageRef]:
        fs, path = resolve_location(self.manifest)
        table = pq.read_table(path, filesystem=fs)
        if self.path_column not in table.column_names:
            raise KeyError(f"manifest {self.manifest} has no column {self.path_column!r} "
                           f"(has: {table.column_names})")
        out = []
        for row in table.to_pylist():
            if row.get("status", "ok") != "ok" or not row.get(self.path_column):
                continue
            source_id = row.get("source_id") or f"{self.name}/{row[self.path_column]}"
            dataset, _, image_id = source_id.partition("/")
            out.append(ImageRef(source_id=source_id, dataset=dataset, image_id=image_id or source_id,
                                root=str(self.root), path=row[self.path_column],
                                boxes=[list(b) for b in (row.get("boxes") or [])],
                                class_ids=list(row.get("class_ids") or []),
                                class_names=list(row.get("class_names") or [])))
        return sorted(out, key=lambda r: r.source_id)


READERS = {"coco": CocoReader, "voc": VocReader, "listtxt": ListTxtReader,
           "folder": FolderReader, "manifest": ManifestReader}


def build_reader(spec: dict) -> Reader:
    """Build a reader from a config mapping ``{"type": <coco|voc|listtxt|folder|manifest>, ...}``."""
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind not in READERS:
        raise ValueError(f"dataset type {kind!r} is not one of {sorted(READERS)}")
    return READERS[kind](**spec)


def _shapes(**kwargs) -> Reader:
    from icm.data.samples import shapes_reader

    return shapes_reader(**kwargs)


def _photos(**kwargs) -> Reader:
    from icm.data.samples import photos_reader

    return photos_reader(**kwargs)


READERS.update(shapes=_shapes, photos=_photos)
