"""The results page (``python -m icm.report``) for detector training, whose record is
``detectors.json``: the page against that record, the command line entry point, and, where
Debian's headless Chromium is installed, a rendering of the page. (The MAA, OW-JRD, codec
training and evaluation jobs check their pages in their own end-to-end tests.)"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from page_checks import check_page, page_commands
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"type": "shapes", "n_train": 24, "n_val": 12, "seed": 7}       # = small_shapes


@pytest.fixture(scope="module")
def detectors_run(ray_cluster, small_shapes, tmp_path_factory):
    """A detector-training run whose two detectors are already in the weights cache (random
    weights, published as the driver publishes its own): the driver writes ``detectors.json`` and
    evaluates each detector on the other domain, without training."""
    import train_detectors

    from icm.zoo import build_detector
    from icm.zoo.weights import publish_trained

    root = tmp_path_factory.mktemp("detectors")
    mp = pytest.MonkeyPatch()
    mp.setenv("ICM_WEIGHTS_DIR", str(root / "weights"))
    cfg = {"out_dir": str(root / "out"), "dataset": SHAPES, "canvas": 64, "cross_domain": True,
           "detectors": [{"label": "p-yolo", "name": "yolov8n", "domain": "photo", "trainer": "ultralytics",
                          "epochs": 1, "min_map50": 0.0},
                         {"label": "s-yolo", "name": "yolov8n", "domain": "sketch", "trainer": "ultralytics",
                          "epochs": 1, "min_map50": 0.0}]}
    classes = ["circle", "square", "triangle", "cross"]
    for i, spec in enumerate(cfg["detectors"]):
        state = build_detector("yolov8n", classes, weights=f"random:{i}").state_dict()
        path = root / f"{spec['label']}.pth"
        torch.save(state, path)
        publish_trained(spec["label"], path.read_bytes(), ".pth",
                        {"label": spec["label"], "cache_key": train_detectors.cache_key(cfg, spec),
                         "weights": str(root / "weights" / "trained" / f"{spec['label']}.pth"),
                         "train_time_s": 10.0 + i, "val": {"map50": 0.25 + i / 10}})
    config = root / "detectors.yaml"
    config.write_text(yaml.safe_dump(cfg))
    mp.setattr(sys, "argv", ["pipelines/train_detectors.py", "--config", str(config)])
    train_detectors.main()
    yield Path(cfg["out_dir"])
    mp.undo()


@pytest.mark.slow
def test_detector_training_page_matches_its_record(detectors_run):
    from icm.report import write_report

    record = json.loads((detectors_run / "detectors.json").read_text())
    page = write_report([str(detectors_run)])
    shown = check_page(page)[str((detectors_run / "detectors.json").resolve())]
    for i, det in enumerate(record["detectors"]):
        assert {f"/detectors/{i}/map50", f"/detectors/{i}/train_s"} <= shown
        assert {f"/cross_domain/{det['label']}/{d}" for d in record["cross_domain"][det["label"]]} <= shown
    assert len(record["cross_domain"]["p-yolo"]) == 2                  # its own domain and the other one
    assert page_commands(page) == [record["command"]] and "train_detectors.py" in record["command"]

    # the command line, onto a page elsewhere: the job's figures are copied next to it
    elsewhere = detectors_run.parent / "pages" / "all.html"
    printed = subprocess.run([sys.executable, "-m", "icm.report", str(detectors_run.parent), "--out", str(elsewhere)],
                             capture_output=True, text=True, cwd=REPO, timeout=300)
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.strip() == f"[icm] results page: {elsewhere.resolve()}"
    check_page(elsewhere)


@pytest.mark.slow
def test_page_renders_in_headless_chromium(detectors_run, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from icm.report import write_report

    page = write_report([str(detectors_run)])
    shot = tmp_path / "page.png"
    done = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1600",
                           f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True, timeout=180)
    assert shot.is_file(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (1600, 1200)
    # text and the bar chart, not a blank page: many non-white pixels, and the chart's colours
    assert (pixels.min(axis=2) < 200).mean() > 0.01
    assert (np.abs(pixels[..., 0] - pixels[..., 2]) > 60).sum() > 500    # matplotlib's blue/orange bars
