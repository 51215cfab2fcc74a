"""Optional detectron2 backend (Wu et al. 2019). detectron2 is not on PyPI: build it from source
(https://detectron2.readthedocs.io/en/latest/tutorials/install.html); until then any
``detectron2:<config>`` name fails with that advice. Nothing imports detectron2 at module load."""

from __future__ import annotations

from icm.zoo.registry import register


def detectron2_available() -> bool:
    try:
        import detectron2  # noqa: F401
    except ImportError:
        return False
    return True


@register("detector", "detectron2:")
def build_detectron2(name: str, classes: list[str], weights: str = "random", **_):
    if not detectron2_available():
        raise ImportError(f"detector {name!r} needs detectron2, which is not installed; it is not on "
                          "PyPI: build it from source (see README, 'Optional: detectron2')")
    raise NotImplementedError(
        f"detector {name!r}: the detectron2 wrapper of the Detector interface is not written yet; "
        "use a torchvision, ultralytics or CenterNet detector")
