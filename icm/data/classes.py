"""Named class lists, so configs can say ``classes: coco80`` instead of listing 80 names."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

VOC = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
       "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
       "tvmonitor"]

COCO80 = ["person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
          "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
          "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
          "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
          "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
          "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
          "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
          "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
          "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
          "teddy bear", "hair drier", "toothbrush"]


def coco91() -> list[str]:
    """torchvision's COCO label space without background (90 entries, 'N/A' for unused ids)."""
    import torchvision

    return list(torchvision.models.detection.FasterRCNN_ResNet50_FPN_Weights.DEFAULT.meta["categories"][1:])


def class_list(spec: Sequence[str] | str | None) -> list[str] | None:
    """A list as given, a named list (voc, coco80, coco91), or a file with one name per line."""
    if spec is None or not isinstance(spec, str):
        return None if spec is None else list(spec)
    named = {"voc": lambda: list(VOC), "coco80": lambda: list(COCO80), "coco91": coco91}
    if spec in named:
        return named[spec]()
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"class list {spec!r} is neither voc/coco80/coco91 nor an existing file")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]
