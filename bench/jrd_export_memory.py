"""Peak memory of the OW-JRD export at two dataset sizes: the streamed export (shard by shard)
vs reading every level row with its crop into the driver, which is what the export did before
(each measured in a fresh process: peak resident memory, sampled every 5 ms, above what the
imports took). A COCO-sized set has ~2 M crops; the streamed
export's peak should stay nearly flat as the set grows, the baseline's grows with it.

    .venv/bin/python bench/jrd_export_memory.py [--objects 500 2000] [--levels 16] [--crop 32]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

CHILD = r"""
import sys, json, threading, time
sys.path.insert(0, {repo!r})
from icm.jrd.export import export_authors_layout, read_table

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2 ** 20

imported, peak, done = rss_mb(), [0.0], False
def sample():
    while not done:
        peak[0] = max(peak[0], rss_mb())
        time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
mode, run, out = sys.argv[1:4]
if mode == "stream":
    export_authors_layout(run, "jpeg", out, fractions={{"train": 1}})
else:
    table = read_table(run, "levels", "jpeg")      # every crop in memory, as before
    rows = table.to_pylist()
done = True
time.sleep(0.02)
print(json.dumps({{"peak_rss_mb": peak[0], "above_imports_mb": peak[0] - imported}}))
"""


def synthesize(run_dir: Path, objects: int, levels: int, crop: int, per_shard: int = 64) -> int:
    """A JRD run with ``objects`` objects (one per image) × ``levels`` levels of random crops."""
    import numpy as np
    import pyarrow as pa

    from icm.data.storage import Storage
    from icm.data.writers import png_bytes
    from icm.jrd.stage import LEVEL_SCHEMA, OBJECT_SCHEMA

    store, rng = Storage(run_dir), np.random.default_rng(0)
    for start in range(0, objects, per_shard):
        obj_rows, level_rows = [], []
        for i in range(start, min(start + per_shard, objects)):
            key = {"source_id": f"coco/{i}", "image_id": str(i), "object_index": 0, "category_id": 3,
                   "CategoryId": 2, "class_name": "car", "box": [0.0, 0.0, float(crop), float(crop)],
                   "area": float(crop * crop), "ladder": "jpeg"}
            png = png_bytes(rng.integers(0, 256, (crop, crop, 3), dtype=np.uint8))
            obj_rows.append({**key, "reference": "gt", "levels": levels, "recognised_pristine": True,
                             "jrd": levels // 2, "first_unrecognised": levels // 2 + 1, "jrd_tolerant": levels // 2,
                             "monotonic": True, "original_png": png})
            level_rows += [{**key, "level": lv, "codec_params": "{}", "bytes": 1000, "bpp": 1.0,
                            "recognised": lv <= levels // 2, "label": int(lv > levels // 2), "best_iou": 0.9,
                            "score": 0.9, "crop_png": png_bytes(rng.integers(0, 256, (crop, crop, 3), dtype=np.uint8))}
                           for lv in range(levels)]
        store.write_table(f"objects/unit-{start:08d}.parquet", pa.Table.from_pylist(obj_rows, schema=OBJECT_SCHEMA))
        store.write_table(f"levels/unit-{start:08d}.parquet", pa.Table.from_pylist(level_rows, schema=LEVEL_SCHEMA))
    return objects * levels


def measure(mode: str, run: Path, out: Path) -> float:
    proc = subprocess.run([sys.executable, "-c", CHILD.format(repo=str(REPO)), mode, str(run), str(out)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])["above_imports_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--objects", type=int, nargs=2, default=[500, 2000])
    parser.add_argument("--levels", type=int, default=16)
    parser.add_argument("--crop", type=int, default=32)
    args = parser.parse_args()
    print(f"{'crops':>8} {'MB of parquet':>14} {'streamed export (MB)':>22} {'load-all baseline (MB)':>24}"
          "   (peak RSS above the imports)")
    with tempfile.TemporaryDirectory(prefix="icm-jrd-mem-") as tmp:
        for n in args.objects:
            run = Path(tmp, f"run{n}")
            crops = synthesize(run, n, args.levels, args.crop)
            size = sum(p.stat().st_size for p in run.rglob("*.parquet")) / 2 ** 20
            stream = measure("stream", run, Path(tmp, f"out{n}"))
            baseline = measure("load", run, Path(tmp, f"base{n}"))
            print(f"{crops:>8} {size:>14.0f} {stream:>22.0f} {baseline:>24.0f}", flush=True)


if __name__ == "__main__":
    main()
