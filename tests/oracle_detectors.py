"""An oracle detector for tests of the evaluation path: it returns the ground truth of the image it
is shown, with a known jitter, so mAP figures are nonzero, below 1 and worse on worse decodes.

Registered in the zoo as ``oracle`` (``build_detector("oracle", classes, dataset=<reader spec>)``)
when this module is imported: by ``tests/conftest.py`` in the test process and, through Ray's
``worker_process_setup_hook``, in every worker of the shared cluster; a driver run as a
subprocess gets it with ``python tests/oracle_detectors.py <script> [args]``.

It knows the dataset's images: shown a canvas, it takes the dataset image whose letterboxed canvas
is nearest (a decode of the image, a rate point of a codec, …) and returns that image's boxes on
the canvas, object ``k`` shifted right by ``SHIFTS[k % 4]`` of its width plus ``blur`` × the
canvas RMSE against the pristine canvas (in widths), with score ``0.9 − 0.2·(k % 4)``.
"""

from __future__ import annotations

import os
import sys

import torch

TESTS = os.path.dirname(os.path.abspath(__file__))
SHIFTS = (0.0, 0.1, 0.3, 0.6)     # IoU 1, 0.82, 0.54, 0.25 with the object's own box


def shifted(box: list[float], k: int, extra: float = 0.0) -> list[float]:
    """Object ``k``'s box as the oracle reports it (``extra``: more shift, in box widths)."""
    x1, y1, x2, y2 = box
    dx = (SHIFTS[k % 4] + extra) * (x2 - x1)
    return [x1 + dx, y1, x2 + dx, y2]


def build_oracle(name: str, classes: list[str], weights: str = "random", image_size: int = 512,
                 dataset: dict | None = None, blur: float = 20.0, **_):
    from icm.data.readers import build_reader
    from icm.detectors.base import Detector
    from icm.maa.canvas import boxes_to_canvas, letterbox, to_tensor
    from icm.zoo.weights import resolve

    class Oracle(Detector):
        family = "oracle"

        def __init__(self):
            super().__init__(classes)
            canvases, self.objects = [], []
            for rec in build_reader(dataset).records():
                if rec["status"] != "ok":
                    continue
                canvas, _, p = letterbox(to_tensor(rec["image"]), image_size)
                canvases.append(canvas)
                boxes = boxes_to_canvas(rec["boxes"], p).tolist()
                self.objects.append([(b, classes.index(n)) for b, n in zip(boxes, rec["class_names"]) if n in classes])
            self.canvases = torch.stack(canvases)

        def predict(self, images, score_threshold=0.05):
            out = []
            for im in images:
                errors = ((self.canvases - im.cpu()) ** 2).flatten(1).mean(1)
                i = int(errors.argmin())
                rmse = float(errors[i].sqrt())
                dets = [(shifted(b, k, blur * rmse), 0.9 - 0.2 * (k % 4), c) for k, (b, c) in enumerate(self.objects[i])]
                dets = [d for d in dets if d[1] >= score_threshold]
                out.append({"boxes": torch.tensor([d[0] for d in dets], dtype=torch.float32).reshape(-1, 4),
                            "scores": torch.tensor([d[1] for d in dets], dtype=torch.float32),
                            "labels": torch.tensor([d[2] for d in dets], dtype=torch.int64)})
            return out

    det = Oracle()
    det.icm_provenance = {"name": "oracle", "family": "oracle", "weights": weights, "sha256": resolve(weights).sha256}
    return det


def install() -> None:
    """Register ``oracle`` in this process (the worker setup hook)."""
    from icm.zoo.registry import REGISTRIES

    REGISTRIES["detector"]["oracle"] = build_oracle


def worker_setup() -> None:
    """Ray's worker_process_setup_hook: make this module importable, then register."""
    if TESTS not in sys.path:
        sys.path.insert(0, TESTS)
    import oracle_detectors

    oracle_detectors.install()


install()


def main() -> None:
    """``python tests/oracle_detectors.py <script> [args]``: run a driver with the oracle
    registered in it and in every worker of the local Ray cluster it starts."""
    import runpy

    import ray

    from icm.data.ray_io import DEFAULT_LOCAL_NODE_IP

    script, *args = sys.argv[1:]
    ray.init(num_cpus=int(os.environ.get("ICM_TEST_NUM_CPUS", "2")), include_dashboard=False,
             _node_ip_address=DEFAULT_LOCAL_NODE_IP, runtime_env={"worker_process_setup_hook": worker_setup})
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
