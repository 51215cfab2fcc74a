"""What the OW-JRD job reports: per-ladder statistics and the JRD figure."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from icm.data.writers import figure_png
from icm.jrd.export import read_table

AREA_BINS = (("small", 0, 32 ** 2), ("medium", 32 ** 2, 96 ** 2), ("large", 96 ** 2, float("inf")))
STAT_COLUMNS = ["source_id", "object_index", "ladder", "class_name", "area", "levels", "jrd", "jrd_tolerant",
                "monotonic", "recognised_pristine"]


def read_objects(run_dir: str | Path) -> list[dict]:
    """The columns of a run's ``objects`` shards that the statistics and the figure use."""
    return read_table(run_dir, "objects", columns=STAT_COLUMNS).to_pylist()


def jrd_stats(objects: list[dict]) -> dict:
    """Per ladder: objects, how many the detector recognises at all, mean JRD (over recognised
    objects) overall / per class / per area bin (COCO's), and the share with monotonic labels."""
    by_ladder = defaultdict(list)
    for o in objects:
        by_ladder[o["ladder"]].append(o)
    stats = {}
    for ladder, rows in sorted(by_ladder.items()):
        rec = [o for o in rows if o["jrd"] >= 0]
        per_class = defaultdict(list)
        for o in rec:
            per_class[o["class_name"]].append(o["jrd"])
        stats[ladder] = {
            "levels": rows[0]["levels"], "objects": len(rows), "recognised_at_some_level": len(rec),
            "recognised_pristine": sum(o["recognised_pristine"] for o in rows),
            "mean_jrd": round(float(np.mean([o["jrd"] for o in rec])), 2) if rec else None,
            "mean_jrd_by_class": {k: round(float(np.mean(v)), 2) for k, v in sorted(per_class.items())},
            "mean_jrd_by_area": {name: round(float(np.mean(v)), 2) for name, lo, hi in AREA_BINS
                                 if (v := [o["jrd"] for o in rec if lo <= o["area"] < hi])},
            "monotonic_share": round(sum(o["monotonic"] for o in rec) / len(rec), 3) if rec else None,
        }
    return stats


def jrd_figure(objects: list[dict]) -> bytes:
    """Per ladder: histogram of JRD per class, and JRD vs object area."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objects = [o for o in objects if o["jrd"] >= 0]
    ladders = sorted({o["ladder"] for o in objects}) or ["(no recognised objects)"]
    fig, axes = plt.subplots(len(ladders), 2, figsize=(11, 3.6 * len(ladders)), squeeze=False)
    for row, ladder in enumerate(ladders):
        rows = [o for o in objects if o["ladder"] == ladder]
        levels = rows[0]["levels"] if rows else 1
        classes = sorted({o["class_name"] for o in rows})
        ax = axes[row, 0]
        if rows:
            ax.hist([[o["jrd"] for o in rows if o["class_name"] == c] for c in classes],
                    bins=np.arange(levels + 1) - 0.5, stacked=True, label=classes)
            ax.legend(fontsize=7)
        ax.set_title(f"{ladder}: JRD per class ({len(rows)} recognised objects)", fontsize=9)
        ax.set_xlabel("JRD (level)")
        ax.set_ylabel("objects")
        ax = axes[row, 1]
        for c in classes:
            pts = [(o["area"], o["jrd"]) for o in rows if o["class_name"] == c]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=10, label=c, alpha=0.7)
        ax.set_xscale("log")
        ax.set_title(f"{ladder}: JRD vs object area", fontsize=9)
        ax.set_xlabel("box area (px², log)")
        ax.set_ylabel("JRD (level)")
    fig.tight_layout()
    return figure_png(fig)
