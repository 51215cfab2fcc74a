"""RD figure and BD-rate table from CompressAI-style results JSON files — this project's sweep
curves and published ones (e.g. ../shared/anchors/kodak/*.json) alike.

    python tuning/rd_report.py CURVE.json [CURVE.json ...] --anchor JPEG --out outputs/report

Writes ``rd.png`` (PSNR–bpp, MS-SSIM–bpp and mAP@.5–bpp per detector found in the curves) and the
BD-rate table of every curve against the anchor (``bd_table.md`` + ``bd_table.json``) on PSNR,
MS-SSIM and each mAP axis the two curves share. Where BD cannot be trusted (too few points, too
little overlap, quality not rising with rate) the cell says "n/a" and the reason is listed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from icm.data.storage import Storage, read_location  # noqa: E402
from icm.data.writers import figure_png  # noqa: E402
from icm.metrics.rd import bd_metrics, span_note  # noqa: E402

QUALITY_AXES = (("psnr-rgb", "PSNR (dB)"), ("ms-ssim-rgb", "MS-SSIM"))


def load_curves(paths: list[str]) -> list[dict]:
    curves = []
    for path in paths:
        curve = json.loads(read_location(path))
        if "results" not in curve or "bpp" not in curve["results"]:
            raise ValueError(f"{path} is not a CompressAI results JSON (no results.bpp)")
        curves.append({**curve, "name": curve.get("name") or Path(str(path)).stem})
    return curves


def map_axes(curves: list[dict]) -> list[str]:
    return sorted({k for c in curves for k in c["results"] if k.startswith("map50-")})


def bd_table(curves: list[dict], anchor: str, span: str = "union") -> dict:
    """``{curve: {axis: bd_metrics(...)}}`` against the curve named ``anchor`` (``span`` as there)."""
    base = next((c for c in curves if c["name"] == anchor), None)
    if base is None:
        raise ValueError(f"anchor {anchor!r} is not among the curves {[c['name'] for c in curves]}")
    table = {}
    for curve in curves:
        if curve is base:
            continue
        row = {}
        for axis in [a for a, _ in QUALITY_AXES] + map_axes(curves):
            if axis in curve["results"] and axis in base["results"]:
                row[axis] = bd_metrics(base["results"]["bpp"], base["results"][axis],
                                       curve["results"]["bpp"], curve["results"][axis], span=span)
        table[curve["name"]] = row
    return table


def bd_markdown(table: dict, anchor: str, span: str = "union") -> str:
    axes = sorted({a for row in table.values() for a in row}, key=lambda a: (not a.startswith("psnr"), a))
    over = span_note(span, anchor)
    lines = [f"BD-rate (%) against {anchor} (negative: fewer bits at equal quality){', ' + over if over else ''}", "",
             "| curve | " + " | ".join(axes) + " |", "|---|" + "---|" * len(axes)]
    notes = []
    for name, row in table.items():
        cells = []
        for axis in axes:
            entry = row.get(axis)
            if entry is None:
                cells.append("—")
            elif entry["bd_rate_percent"] == "n/a":
                notes.append(f"{name}, {axis}: {entry['bd_rate_percent_reason']}")
                cells.append(f"n/a [{len(notes)}]")
            else:
                cells.append(f"{entry['bd_rate_percent']:+.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if notes:
        lines += [""] + [f"[{i}] {n}" for i, n in enumerate(notes, start=1)]
    return "\n".join(lines) + "\n"


def rd_figure(curves: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(QUALITY_AXES) + [(a, f"mAP@.5 {a.removeprefix('map50-')}") for a in map_axes(curves)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.8), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for curve in curves:
            r = curve["results"]
            if key in r and all(v is not None for v in r[key]):
                ax.plot(r["bpp"], r[key], marker="o", ms=3, label=curve["name"])
        ax.set_xlabel("bpp")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return figure_png(fig)


def report(curve_paths: list[str], anchor: str, out_dir: str, span: str = "union") -> dict:
    curves = load_curves(curve_paths)
    table = bd_table(curves, anchor, span)
    out = Storage(out_dir)
    out.write_bytes("rd.png", rd_figure(curves))
    out.write_text("bd_table.json", json.dumps({"anchor": anchor, "span": span, "table": table}, indent=2,
                                               sort_keys=True))
    markdown = bd_markdown(table, anchor, span)
    out.write_text("bd_table.md", markdown)
    print(markdown)
    return {"figure": out.display("rd.png"), "bd_table": out.display("bd_table.md"), "table": table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("curves", nargs="+", help="CompressAI-style results JSON files (paths or URIs)")
    parser.add_argument("--anchor", required=True, help="the name of the anchor curve (its JSON 'name')")
    parser.add_argument("--out", required=True, help="where rd.png and bd_table.{md,json} go")
    parser.add_argument("--span", choices=["union", "test"], default="union",
                        help="the overlap a BD figure needs (75 %%) is a share of both curves' range (union, the "
                             "bjontegaard package's rule) or of each test curve's (test: an anchor sampled past both "
                             "its ends)")
    args = parser.parse_args()
    report(args.curves, args.anchor, args.out, args.span)


if __name__ == "__main__":
    main()
