"""One static page of a run's results: each job's figure, its headline table and the command that
made it, read from the job's own record (``summary.json``; ``detectors.json`` for detector
training).

    python -m icm.report OUT_DIR [OUT_DIR ...] [--out PAGE.html]

An ``OUT_DIR`` is one job's output folder, or a folder of them (``outputs/demo``: every job folder
up to two levels down). The page goes to ``OUT_DIR/index.html`` (one folder) or ``--out``. Figures
inside the page's folder are linked relatively; others (another folder, object storage) are
copied next to the page into ``report_files/``. A job folder in object storage (``s3://…``) works
too, named directly.

Every table cell carries ``data-record`` (the record file, relative to the page) and
``data-pointer`` (a JSON Pointer, RFC 6901, into it): what the page shows can be checked against
the records it was made from. Plain HTML and matplotlib PNGs: no server, no script.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RECORDS = ("summary.json", "detectors.json")
JOB_ORDER = ("train_detectors", "maa", "jrd", "train_jrd_predictor", "train_codec", "train_codec_local", "evaluate",
             "sweep_rd", "maa_generalisation", "export")
JOB_TITLES = {"train_detectors": "Detector training", "maa": "MAA images", "jrd": "OW-JRD distorted set",
              "train_jrd_predictor": "OW-JRD predictor", "train_codec": "Codec training",
              "train_codec_local": "Codec training (one process)", "evaluate": "Codec evaluation (real bitstreams)",
              "sweep_rd": "Rate-distortion sweep", "maa_generalisation": "MAA generalisation experiment",
              "export": "Dataset export"}


def pointer(*parts: Any) -> str:
    """A JSON Pointer (RFC 6901) to ``parts``."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def resolve_pointer(doc: Any, ptr: str) -> Any:
    for raw in ptr.split("/")[1:]:
        part = raw.replace("~1", "/").replace("~0", "~")
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    return doc


def format_value(value: Any) -> str:
    """How a record's value is shown: numbers to 4 significant digits (1 decimal from 1000 on)."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.1f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


@dataclass
class Job:
    """One job's record, where it lives and what the page shows of it."""

    location: str                  # the job's out_dir (a local path or a URI)
    record_name: str               # summary.json or detectors.json
    record: dict
    kind: str = ""
    figures: list[str] = field(default_factory=list)   # record-relative names or paths of PNGs

    @property
    def name(self) -> str:
        return self.location.rstrip("/").rsplit("/", 1)[-1]


def _storage(location: str):
    from icm.data.storage import Storage

    return Storage(location)


def load_job(location: str) -> Job | None:
    store = _storage(location)
    for name in RECORDS:
        if store.exists(name):
            record = json.loads(store.read_text(name))
            kind = "train_detectors" if name == "detectors.json" else str(record.get("job", "job"))
            return Job(location, name, record, kind)
    return None


def find_jobs(root: str, depth: int = 2) -> list[Job]:
    """``root`` when it is a job's folder, else the job folders under it (``depth`` levels; a
    job's own subfolders are not searched)."""
    job = load_job(root)
    if job is not None:
        return [job]
    if "://" in root or depth == 0 or not Path(root).is_dir():
        return []
    jobs = []
    for child in sorted(p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith((".", "report_files"))):
        jobs += find_jobs(str(child), depth - 1)
    return jobs


class Page:
    """Builds the HTML; ``figure`` places a PNG next to the page when it is not already there."""

    def __init__(self, path: Path):
        self.path = path
        self.parts: list[str] = []

    def rel(self, target: Path) -> str:
        return os.path.relpath(target, self.path.parent).replace(os.sep, "/")

    def figure(self, job: Job, ref: str, caption: str) -> None:
        store = _storage(job.location)
        name = ref.rstrip("/").rsplit("/", 1)[-1]
        local = Path(ref) if "://" not in ref and Path(ref).is_file() else None
        if "://" not in job.location and (Path(job.location) / name).is_file():
            local = Path(job.location) / name    # the job folder's own copy (the folder may have moved)
        if local is not None and self.path.parent.resolve() in local.resolve().parents:
            src = self.rel(local.resolve())
        else:
            data = local.read_bytes() if local is not None else (store.read_bytes(name) if store.exists(name) else None)
            if data is None:
                self.parts.append(f"<p class='missing'>figure {html.escape(ref)} not found</p>")
                return
            dest = self.path.parent / "report_files" / _slug(job) / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
            src = self.rel(dest)
        self.parts.append(f"<figure><a href='{html.escape(src)}'><img src='{html.escape(src)}' "
                          f"alt='{html.escape(caption)}'></a><figcaption>{html.escape(caption)}</figcaption></figure>")

    def table(self, job: Job, title: str, header: list[str], rows: list[tuple[str, list[tuple[str, Any]]]],
              record_file: str) -> None:
        """``rows``: (row label, [(JSON pointer into the record, value)]); a pointer of "" is a
        label cell of no record value."""
        out = [f"<table data-record='{html.escape(record_file)}'><caption>{html.escape(title)}</caption><thead><tr>"]
        out += [f"<th>{html.escape(h)}</th>" for h in header]
        out.append("</tr></thead><tbody>")
        for label, cells in rows:
            out.append(f"<tr><th scope='row'>{html.escape(label)}</th>")
            for ptr, value in cells:
                if ptr:
                    out.append(f"<td data-pointer='{html.escape(ptr)}'>{html.escape(format_value(value))}</td>")
                else:
                    out.append(f"<td>{html.escape(str(value))}</td>")
            out.append("</tr>")
        out.append("</tbody></table>")
        self.parts.append("".join(out))

    def add(self, fragment: str) -> None:
        self.parts.append(fragment)


def _slug(job: Job) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", job.name) or "job"


def _record_file(page: Page, job: Job) -> str:
    if "://" in job.location:
        return f"{job.location.rstrip('/')}/{job.record_name}"
    return page.rel((Path(job.location) / job.record_name).resolve())


def _scalars(record: dict, keys: list[str]) -> list[tuple[str, list[tuple[str, Any]]]]:
    """Rows for the scalar entries ``keys`` (a ``/``-path reaches into a mapping) present in the record."""
    rows = []
    for key in keys:
        parts = key.split("/")
        try:
            value = resolve_pointer(record, pointer(*parts))
        except (KeyError, IndexError, TypeError):
            continue
        if isinstance(value, (dict, list)):
            continue
        rows.append((key.replace("/", " "), [(pointer(*parts), value)]))
    return rows


def _list_table(page: Page, job: Job, rf: str, title: str, key: str, columns: list[tuple[str, tuple]],
                label_key: str) -> None:
    """One row per entry of the record's list ``key``; ``columns``: (header, keys into an entry)."""
    entries = job.record.get(key) or []
    rows = []
    for i, entry in enumerate(entries):
        cells = []
        for _, parts in columns:
            try:
                cells.append((pointer(key, i, *parts), resolve_pointer(entry, pointer(*parts))))
            except (KeyError, IndexError, TypeError):
                cells.append(("", "—"))
        rows.append((str(entry.get(label_key, i)), cells))
    if rows:
        page.table(job, title, [label_key] + [h for h, _ in columns], rows, rf)


def render_detectors(page: Page, job: Job, rf: str) -> None:
    rec = job.record
    cross = rec.get("cross_domain") or {}
    domains = sorted({d for per in cross.values() for d in per})
    rows = []
    for i, det in enumerate(rec.get("detectors") or []):
        cells = [(pointer("detectors", i, "model"), det.get("model")), (pointer("detectors", i, "domain"), det.get("domain")),
                 (pointer("detectors", i, "train_s"), det.get("train_s")), (pointer("detectors", i, "map50"), det.get("map50")),
                 (pointer("detectors", i, "target"), det.get("target"))]
        cells += [(pointer("cross_domain", det["label"], d), cross[det["label"]][d]) if d in cross.get(det["label"], {})
                  else ("", "—") for d in domains]
        rows.append((det["label"], cells))
    page.table(job, "val mAP@.5 of each detector (on its own domain, and on each domain's val split)",
               ["detector", "model", "domain", "train s", "val mAP@.5", "target"] + [f"on {d}" for d in domains], rows, rf)
    backbones = rec.get("backbones") or []
    if backbones:
        page.table(job, "pretrained backbones", ["backbone", "val crop accuracy", "train s"],
                   [(b["label"], [(pointer("backbones", i, "val", "crop_accuracy"), b["val"]["crop_accuracy"]),
                                  (pointer("backbones", i, "train_time_s"), b.get("train_time_s"))])
                    for i, b in enumerate(backbones)], rf)


def render_maa(page: Page, job: Job, rf: str) -> None:
    rec = job.record
    if rec.get("evaluation"):
        rows = [(e["detector"], [("", "seen" if e.get("in_maa_set") else "HELD OUT"),
                                 (pointer("evaluation", i, "loss_original"), e["loss_original"]),
                                 (pointer("evaluation", i, "loss_maa"), e["loss_maa"]),
                                 (pointer("evaluation", i, "map50_original"), e["map50_original"]),
                                 (pointer("evaluation", i, "map50_maa"), e["map50_maa"])])
                for i, e in enumerate(rec["evaluation"])]
        page.table(job, "per detector: mean training loss and mAP@.5 on the original vs the MAA images (the held-out "
                   "detector is the honest figure)", ["detector", "role", "loss orig", "loss MAA", "mAP@.5 orig",
                                                      "mAP@.5 MAA"], rows, rf)
    changes = rec.get("mean_loss_change") or {}
    if changes:
        page.table(job, "mean change of each MAA detector's own loss, and images whose loss went down",
                   ["detector", "mean loss change", "images with lower loss"],
                   [(d, [(pointer("mean_loss_change", d), v),
                         (pointer("images_with_lower_loss", d), (rec.get("images_with_lower_loss") or {}).get(d))])
                    for d, v in changes.items()], rf)
    page.table(job, "run", ["", "value"], _scalars(rec, ["method", "dataset", "images/done", "images/failed",
                                                         "images/skipped", "images/not_run", "batch_size",
                                                         "max_linf_255", "mean_l2", "images_per_s", "elapsed_s"]), rf)


def render_jrd(page: Page, job: Job, rf: str) -> None:
    per = job.record.get("per_ladder") or {}
    keys = [("levels", "levels"), ("objects", "objects"), ("recognised in the pristine image", "recognised_pristine"),
            ("recognised at some level", "recognised_at_some_level"), ("mean JRD", "mean_jrd"),
            ("monotonic share", "monotonic_share")]
    page.table(job, "per ladder: objects, recognition and JRD (the index of the last recognised level)",
               ["ladder"] + [h for h, _ in keys],
               [(ladder, [(pointer("per_ladder", ladder, k), s.get(k)) for _, k in keys]) for ladder, s in per.items()],
               rf)
    page.table(job, "run", ["", "value"], _scalars(job.record, ["dataset", "images/done", "images/failed",
                                                                "object_levels", "elapsed_s"]), rf)


def render_evaluate(page: Page, job: Job, rf: str) -> None:
    detectors = job.record.get("detectors") or {}
    columns = [("point", ("point",)), ("decode", ("decode",)), ("bpp", ("bpp",)), ("PSNR", ("psnr",)),
               ("MS-SSIM", ("ms_ssim",))]
    columns += [(f"mAP@.5 {d} ({role})", ("map50", d)) for d, role in detectors.items()]
    _list_table(page, job, rf, "RD points: one per codec, rate point and decode", "rd_points", columns, "curve")


def render_sweep(page: Page, job: Job, rf: str) -> None:
    points = job.record.get("points") or []
    metric_keys = sorted({k for p in points for k in p if k.startswith("map50/")})
    _list_table(page, job, rf, "RD points of the sweep's trials", "points",
                [("bpp", ("bpp",)), ("PSNR", ("psnr",)), ("MS-SSIM", ("ms_ssim",))]
                + [(f"mAP@.5 {k.split('/', 1)[1]}", (k,)) for k in metric_keys], "trial")
    page.table(job, "sweep", ["", "value"], _scalars(job.record, ["name", "trials_finished", "trials_total", "wall_s"]),
               rf)


def render_training(page: Page, job: Job, rf: str) -> None:
    rec = job.record
    metrics = rec.get("final_metrics") or {}
    page.table(job, "last reported training metrics", ["metric", "value"],
               [(k, [(pointer("final_metrics", k), v)]) for k, v in metrics.items() if not isinstance(v, (dict, list))], rf)
    page.table(job, "run", ["", "value"], _scalars(rec, ["codec", "loss", "stage", "steps", "machine_targets", "clip",
                                                         "train_wall_s", "train_images_listed", "device"]), rf)


def render_predictor(page: Page, job: Job, rf: str) -> None:
    rec = job.record
    evaluation = rec.get("evaluation") or {}
    page.table(job, "test split: JRD error (levels) and per-level label accuracy", ["", "value"],
               [(k, [(pointer("evaluation", k), v)]) for k, v in evaluation.items() if not isinstance(v, (dict, list))], rf)
    guided = rec.get("guided_compression") or {}
    scalars = [(k, [(pointer("guided_compression", k), v)]) for k, v in guided.items() if not isinstance(v, (dict, list))]
    for mode, values in guided.items():
        if isinstance(values, dict):
            scalars += [(f"{mode} {k}", [(pointer("guided_compression", mode, k), v)]) for k, v in values.items()
                        if not isinstance(v, (dict, list))]
    if scalars:
        page.table(job, "JRD-guided compression", ["", "value"], scalars, rf)
    page.table(job, "run", ["", "value"], _scalars(rec, ["steps", "train_wall_s"]), rf)


def render_generic(page: Page, job: Job, rf: str) -> None:
    rows = []
    for key, value in job.record.items():
        if isinstance(value, dict):
            rows += [(f"{key} {k}", [(pointer(key, k), v)]) for k, v in value.items() if not isinstance(v, (dict, list))]
        elif not isinstance(value, list):
            rows.append((key, [(pointer(key), value)]))
    page.table(job, "summary", ["", "value"], rows, rf)


RENDERERS = {"train_detectors": render_detectors, "maa": render_maa, "jrd": render_jrd, "evaluate": render_evaluate,
             "sweep_rd": render_sweep, "train_codec": render_training, "train_codec_local": render_training,
             "train_jrd_predictor": render_predictor}


def detectors_figure(job: Job) -> bytes:
    """Detector training has no figure of its own: val mAP@.5 per detector and domain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from icm.data.writers import figure_png

    dets = job.record.get("detectors") or []
    cross = job.record.get("cross_domain") or {}
    domains = sorted({d for per in cross.values() for d in per}) or ["own domain"]
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(dets) + 2), 3.2))
    width = 0.8 / len(domains)
    for k, d in enumerate(domains):
        values = [cross.get(det["label"], {}).get(d, det["map50"] if d == "own domain" else np.nan) for det in dets]
        ax.bar(np.arange(len(dets)) + k * width, values, width, label=f"on {d}")
    ax.set_xticks(np.arange(len(dets)) + width * (len(domains) - 1) / 2, [d["label"] for d in dets], rotation=20,
                  ha="right")
    ax.set_ylabel("val mAP@.5")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return figure_png(fig)


def render_job(page: Page, job: Job) -> None:
    rec = job.record
    title = JOB_TITLES.get(job.kind, job.kind)
    detail = rec.get("method") or rec.get("name") or rec.get("codec") or ""
    page.add(f"<section id='{html.escape(_slug(job))}'><h2>{html.escape(title)}"
             f"{' — ' + html.escape(str(detail)) if detail else ''} <small>{html.escape(job.location)}</small></h2>")
    command = rec.get("command")
    where = f", in <code>{html.escape(rec['cwd'])}</code>" if rec.get("cwd") else ""
    page.add(f"<p>made by{where}</p><pre class='command'>" + html.escape(command) + "</pre>" if command else
             "<p class='missing'>command not recorded (a run from before jobs recorded their command line)</p>")
    rf = _record_file(page, job)
    figures = [rec["figure"]] if isinstance(rec.get("figure"), str) else []
    for ref in figures:
        page.figure(job, ref, f"{title}: {ref.rsplit('/', 1)[-1]}")
    if job.kind == "train_detectors" and rec.get("detectors"):
        dest = page.path.parent / "report_files" / _slug(job) / "detectors.png"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(detectors_figure(job))
        page.figure(job, str(dest), "val mAP@.5 per detector and domain")
    RENDERERS.get(job.kind, render_generic)(page, job, rf)
    page.add("</section>")


STYLE = """body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:72rem;padding:0 1rem;color:#222}
h2{border-bottom:1px solid #ccc;padding-bottom:.2rem;margin-top:2.5rem}h2 small{font-size:.6em;color:#777;font-weight:normal}
table{border-collapse:collapse;margin:1rem 0;font-size:.9rem}caption{text-align:left;font-weight:600;padding:.3rem 0}
th,td{border:1px solid #ddd;padding:.25rem .6rem;text-align:right}th[scope=row],thead th{text-align:left;background:#f6f6f6}
pre.command{background:#f4f4f4;padding:.6rem;overflow-x:auto;white-space:pre-wrap}img{max-width:100%;border:1px solid #eee}
figure{margin:1rem 0}figcaption{color:#666;font-size:.85rem}.missing{color:#a33}nav a{margin-right:1rem}"""


def write_report(locations: list[str], out: str | Path | None = None, title: str = "icm-ray results") -> Path:
    """Write the page for the jobs at ``locations`` (job folders, or folders of them); returns its path."""
    jobs = [job for loc in locations for job in find_jobs(str(loc))]
    if not jobs:
        raise SystemExit(f"no job record ({' or '.join(RECORDS)}) in {', '.join(map(str, locations))}: "
                         "name a job's out_dir, or a folder of them")
    if out is None:
        if len(locations) != 1 or "://" in str(locations[0]):
            raise SystemExit("several folders or an object-store folder: say where the page goes with --out PAGE.html")
        out = Path(locations[0]) / "index.html"
    page = Page(Path(out).resolve())
    page.path.parent.mkdir(parents=True, exist_ok=True)
    order = {k: i for i, k in enumerate(JOB_ORDER)}
    jobs.sort(key=lambda j: (order.get(j.kind, len(order)), j.location))
    page.add(f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>")
    page.add("<nav>" + "".join(f"<a href='#{html.escape(_slug(j))}'>{html.escape(JOB_TITLES.get(j.kind, j.kind))}"
                               f" ({html.escape(j.name)})</a>" for j in jobs) + "</nav>")
    for job in jobs:
        render_job(page, job)
    page.add("</body></html>\n")
    page.path.write_text("\n".join(page.parts), encoding="utf-8")
    return page.path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("locations", nargs="+", help="a job's out_dir, or a folder of job folders")
    parser.add_argument("--out", default=None, help="the page (default: OUT_DIR/index.html for one folder)")
    parser.add_argument("--title", default="icm-ray results")
    args = parser.parse_args(argv)
    path = write_report(args.locations, args.out, args.title)
    print(f"[icm] results page: {path}")


if __name__ == "__main__":
    main()
