"""What the MAA job reports: summary statistics from its manifest, the figure, and the
seen-vs-held-out detector comparison on original vs MAA images."""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np

from icm.data.writers import figure_png


def manifest_stats(rows: list[dict]) -> dict:
    ok = [r for r in rows if r["status"] == "ok"]
    change: dict[str, list[float]] = {}
    for r in ok:
        before, after = json.loads(r["loss_before"]), json.loads(r["loss_after"])
        for name in before:
            change.setdefault(name, []).append(after[name] - before[name])
    return {
        "images_in_manifest": len(rows), "ok": len(ok), "errors": len(rows) - len(ok),
        "resized_to_fit_canvas": sum(bool(r["resized"]) for r in ok),
        "max_linf_255": round(max((r["linf"] for r in ok), default=0.0) * 255, 3),
        "mean_l2": round(float(np.mean([r["l2"] for r in ok])) if ok else 0.0, 4),
        "mean_loss_change": {k: round(float(np.mean(v)), 4) for k, v in sorted(change.items())},
        "images_with_lower_loss": {k: f"{sum(x < 0 for x in v)}/{len(v)}" for k, v in sorted(change.items())},
    }


def summary_figure(pairs: Sequence[tuple[np.ndarray, np.ndarray, str]], amplify: float = 15.0) -> bytes:
    """Rows of (original, MAA, signed difference × amplify around mid-gray) for a few images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(pairs))
    fig, axes = plt.subplots(n, 3, figsize=(9, 3 * n), squeeze=False)
    for row, (orig, adv, title) in enumerate(pairs):
        diff = np.clip(128 + (adv.astype(np.float32) - orig.astype(np.float32)) * amplify, 0, 255).astype(np.uint8)
        for col, (img, name) in enumerate(((orig, "original"), (adv, "MAA"),
                                           (diff, f"(MAA − original) × {amplify:g} + gray"))):
            axes[row, col].imshow(img)
            axes[row, col].set_title(f"{title}\n{name}" if col == 0 else name, fontsize=8)
            axes[row, col].axis("off")
    fig.tight_layout()
    return figure_png(fig)
