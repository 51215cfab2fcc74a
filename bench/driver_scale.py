"""The driver's own work at COCO scale: listing, unit cutting, the resume check over done rows and
manifest consolidation, for a COCO-format annotation file of 118,287 images (COCO train2017's
count, with its annotation statistics: ~7.3 objects per image, a polygon per object) and of
10,000 (the linearity check), on local disk and on moto's S3 server.

    .venv/bin/python bench/driver_scale.py                       # both sizes, local + s3
    .venv/bin/python bench/driver_scale.py --images 10000 --storage local

Per size and storage, two driver processes run the phases the pipelines' drivers run
(``build_reader`` + ``select_refs``, ``ManifestStore.done_source_ids``, ``work_units`` + the
per-unit JSON rows ``run_units`` hands Ray Data, ``ManifestStore.consolidate``):

* **fresh**: an empty output dir (listing, resume check, cutting);
* **rerun, half done**: every other unit already has its shard (listing, resume check over the
  done rows, cutting the rest); then the rest is written by a no-op stage (the MAA stage's rows
  and schema, no pixels: not timed) and the manifest consolidated — the same consolidation a fresh
  job does at its end.

Wall time per phase (in the driver) and the driver's peak RSS during the phase (sampled from
outside, every 10 ms, so a phase holding the GIL is still seen). No image is read by these phases:
the annotation file names image files that need not exist. Targets (issue 24): each phase
≤ 60 s and ≤ 2 GB RSS on 2 cores, and no phase more than linear in the image count.

    .venv/bin/python bench/driver_scale.py --voc-listing 400

lists a VOC dataset of 400 annotation files on moto, one GET at a time (as ``VocReader`` did)
and in parallel (``ICM_IO_THREADS``, 32), with no added latency and with 20 ms per request (a
typical S3 first-byte latency; moto on loopback answers in about 1 ms), and counts the requests.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGE = os.sysconf("SC_PAGE_SIZE")
COCO_IMAGES = 118_287
OBJECTS_PER_IMAGE = 7.3        # train2017: 860,001 instances / 118,287 images
POLYGON_POINTS = 20            # ~the mean polygon size in train2017 (a 448 MB file)


def write_coco(path: Path, n: int, seed: int = 0) -> int:
    """A COCO instances file of ``n`` images, written as it is generated (the bench never holds it)."""
    from icm.data.classes import coco91

    rng = random.Random(seed)
    cats = [{"id": i + 1, "name": name, "supercategory": "x"} for i, name in enumerate(coco91()) if name != "N/A"]
    ann_id = 0
    with open(path, "w") as f:
        f.write('{"info": {"description": "bench/driver_scale.py"}, "licenses": [], "categories": ')
        f.write(json.dumps(cats))
        f.write(', "images": [')
        for i in range(n):
            f.write(("," if i else "") + json.dumps({"id": i + 1, "file_name": f"{i + 1:012d}.jpg", "width": 640,
                                                     "height": 480, "license": 1}))
        f.write('], "annotations": [')
        for i in range(n):
            for _ in range(min(40, int(rng.expovariate(1 / OBJECTS_PER_IMAGE)))):
                x, y, w, h = rng.uniform(0, 500), rng.uniform(0, 350), rng.uniform(4, 140), rng.uniform(4, 130)
                poly = [round(v, 2) for _ in range(POLYGON_POINTS) for v in (x + rng.uniform(0, w), y + rng.uniform(0, h))]
                ann_id += 1
                f.write(("," if ann_id > 1 else "") + json.dumps({
                    "id": ann_id, "image_id": i + 1, "category_id": rng.choice(cats)["id"], "iscrowd": 0,
                    "area": round(w * h, 2), "bbox": [round(x, 2), round(y, 2), round(w, 2), round(h, 2)],
                    "segmentation": [poly]}))
        f.write("]}")
    return ann_id


# --- the driver process --------------------------------------------------------------------

def _phase(name: str):
    class Phase:
        def __enter__(self):
            print(f"PHASE start {name}", flush=True)
            self.t, self.cpu = time.perf_counter(), time.process_time()

        def __exit__(self, *exc):
            print(f"PHASE end {name} {time.process_time() - self.cpu:.3f} {time.perf_counter() - self.t:.3f}",
                  flush=True)
    return Phase()


def _noop_rows(stage, unit: dict) -> list[dict]:
    """The rows the MAA stage writes for a unit (its columns, typical sizes), computing nothing."""
    from icm.data.units import output_relpath

    return [stage.row(ref, status="ok", started_at=time.time(), output_path=output_relpath(ref["source_id"]),
                      method="meta_model", width=640, height=480, resized=True, placement="[0.8, 0, 64, 512, 384]",
                      loss_before='{"centernet": 3.4567, "frcnn": 1.2345, "yolov8n": 2.3456}',
                      loss_after='{"centernet": 4.5678, "frcnn": 2.3456, "yolov8n": 3.4567}',
                      linf=0.0313, l2=0.0123, notes=[]) for ref in unit["refs"]]


def driver(args) -> None:
    """One driver process: the phases of ``--mode`` (fresh | prepare-half | rerun-half)."""
    from icm.data.manifest import ManifestStore
    from icm.data.ray_io import select_refs, work_units
    from icm.data.readers import build_reader
    from icm.data.storage import map_threads
    from icm.data.units import UnitStage
    from icm.maa.stage import MAA_COLUMNS

    class NoopStage(UnitStage):
        extra_schema = MAA_COLUMNS

    spec = {"type": "coco", "annotation_file": args.annotations, "image_root": args.image_root, "name": "coco"}
    params = {"method": "meta_model", "canvas": 512, "steps": 10, "outer": 10, "inner_steps": 8, "alpha": "1/255",
              "bound": {"type": "linf", "eps": "8/255"}, "seed": 0, "device": "cuda", "deterministic": True,
              "detectors": [{"label": d, "name": d, "weights": f"trained:{d}"} for d in ("frcnn", "yolov8n", "centernet")]}
    models = [{"name": d, "family": "x", "weights": f"trained:{d}", "sha256": "0" * 64} for d in ("frcnn", "yolov8n",
                                                                                                    "centernet")]
    with _phase("listing"):
        refs = select_refs(build_reader(spec))
    store = ManifestStore(args.out, MAA_COLUMNS)
    with _phase("resume check"):
        done = store.done_source_ids()
    with _phase("unit cutting"):
        units = work_units(refs, args.unit_size, done=done)
        unit_rows = [{"unit_json": json.dumps(u, sort_keys=True)} for u in units]   # what run_units hands Ray Data
    print(f"INFO images={len(refs)} done={len(done)} units={len(units)} unit_json_mb="
          f"{sum(len(r['unit_json']) for r in unit_rows) / 1e6:.1f}", flush=True)
    del unit_rows
    if args.mode == "fresh":
        return
    stage = NoopStage(args.out, params, models=models)
    todo = units[::2] if args.mode == "prepare-half" else units
    t = time.perf_counter()
    map_threads(lambda u: store.write_unit(u["unit_id"], _noop_rows(stage, u)), todo)
    print(f"INFO wrote {len(todo)} shards in {time.perf_counter() - t:.1f} s (no-op stage, not a driver phase)",
          flush=True)
    if args.mode == "rerun-half":
        with _phase("consolidation"):
            store.consolidate(source_ids={r["source_id"] for r in refs})


# --- the bench: runs drivers, samples their RSS --------------------------------------------

def run_driver(mode: str, annotations: str, image_root: str, out: str, unit_size: int, env: dict) -> dict:
    cmd = [sys.executable, __file__, "--driver", mode, "--annotations", annotations, "--image-root", image_root,
           "--out", out, "--unit-size", str(unit_size)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, **env}, cwd=REPO)
    current, phases, info = [None], {}, []

    def read():
        for line in proc.stdout:
            parts = line.split()
            if line.startswith("PHASE start"):
                current[0] = " ".join(parts[2:])
                phases[current[0]] = {"rss_gb": 0.0}
            elif line.startswith("PHASE end"):
                phases[" ".join(parts[2:-2])].update(cpu_s=float(parts[-2]), wall_s=float(parts[-1]))
                current[0] = None
            elif line.startswith("INFO"):
                info.append(line[5:].strip())
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while proc.poll() is None:
        try:
            rss = int(open(f"/proc/{proc.pid}/statm").read().split()[1]) * PAGE / 1e9
        except (OSError, IndexError):
            break
        if current[0] in phases:
            phases[current[0]]["rss_gb"] = max(phases[current[0]]["rss_gb"], rss)
        time.sleep(0.01)
    reader.join()
    if proc.wait():
        raise SystemExit(f"driver {mode} failed (exit {proc.returncode})")
    return {"phases": phases, "info": info}


def bench(storage: str, n: int, unit_size: int, work: Path, s3=None) -> list[dict]:
    local_ann = work / f"instances_{n}.json"
    if not local_ann.is_file():
        t = time.perf_counter()
        objects = write_coco(local_ann, n)
        print(f"[bench] wrote {local_ann} ({local_ann.stat().st_size / 1e6:.0f} MB, {n} images, {objects} objects) "
              f"in {time.perf_counter() - t:.0f} s", flush=True)
    env = {}
    if storage == "local":
        annotations, image_root, out = str(local_ann), str(work / "images"), work / f"out-{n}"
        fresh_out, rerun_out = str(out / "fresh"), str(out / "rerun")
    else:
        import pyarrow.fs as pafs

        env = s3.direct_env   # straight to moto: the proxy's request log is not needed here
        fs = pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], access_key="test", secret_key="test",
                               region="us-east-1")
        key = f"icm/bench/coco/annotations/instances_{n}.json"
        if fs.get_file_info(key).type != pafs.FileType.File:
            pafs.copy_files(str(local_ann), key, destination_filesystem=fs)
        annotations, image_root = f"s3://{key}", "s3://icm/bench/coco/train2017"
        fresh_out, rerun_out = f"s3://icm/bench/out-{n}/fresh", f"s3://icm/bench/out-{n}/rerun"
    fresh = run_driver("fresh", annotations, image_root, fresh_out, unit_size, env)
    prepared = run_driver("prepare-half", annotations, image_root, rerun_out, unit_size, env)
    rerun = run_driver("rerun-half", annotations, image_root, rerun_out, unit_size, env)
    for what, result in (("fresh", fresh), ("prepare", prepared), ("rerun", rerun)):
        for line in result["info"]:
            print(f"[bench] {storage} {n} {what}: {line}", flush=True)
    rows = []
    for job, result in (("fresh", fresh), ("rerun, half done", rerun)):
        for phase, m in result["phases"].items():
            rows.append({"storage": storage, "images": n, "job": job, "phase": phase, **m})
            print(f"[bench] {json.dumps(rows[-1])}", flush=True)
    return rows


def voc_listing(n: int, latencies=(0.0, 0.02)) -> None:
    import icm.data.storage as storage
    from icm.data.readers import VocReader
    from icm.data.storage import Storage

    sys.path.insert(0, str(REPO / "tests"))
    from s3_fake import FakeS3

    with FakeS3() as s3:
        os.environ.update(s3.env)
        root = "s3://icm/bench/VOC2007"
        data = Storage(root)
        ids = [f"{i:06d}" for i in range(n)]
        data.write_text("ImageSets/Main/trainval.txt", "".join(f"{i}\n" for i in ids))
        xml = ("<annotation><filename>{}.jpg</filename>" + "<object><name>dog</name><difficult>0</difficult><bndbox>"
               "<xmin>10</xmin><ymin>20</ymin><xmax>110</xmax><ymax>220</ymax></bndbox></object>" * 3 + "</annotation>")
        storage.map_threads(lambda i: data.write_text(f"Annotations/{i}.xml", xml.format(i)), ids)
        print(f"\nVOC listing on moto S3, {n} annotations (VocReader(...).refs(), one listing)")
        print(f"{'added latency':>14}{'threads':>9}{'wall s':>9}{'requests':>10}{'speed-up':>10}")
        for latency in latencies:
            s3.latency(latency)
            base = None
            for threads in (1, storage.IO_THREADS):
                storage.IO_THREADS = threads
                s3.reset_log()
                t = time.perf_counter()
                refs = VocReader(root).refs()
                wall = time.perf_counter() - t
                assert len(refs) == n and not any(r.error for r in refs)
                base = base or wall
                print(f"{latency * 1000:>12.0f}ms{threads:>9}{wall:>9.2f}{len(s3.requests()):>10}{base / wall:>9.1f}x")
            storage.IO_THREADS = 32
        print("a job lists its dataset once now (Reader.refs() is kept); MAA with evaluation listed it 3 times")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[10_000, COCO_IMAGES])
    parser.add_argument("--storage", nargs="+", default=["local", "s3"], choices=["local", "s3"])
    parser.add_argument("--unit-size", type=int, default=8, help="images per unit (the MAA job's batch_size)")
    parser.add_argument("--work", default="/tmp/icm-driver-scale", help="annotation files and local outputs")
    parser.add_argument("--voc-listing", type=int, default=0, metavar="N",
                        help="instead: list a VOC set of N annotations on moto, sequential vs parallel")
    parser.add_argument("--driver", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--annotations", help=argparse.SUPPRESS)
    parser.add_argument("--image-root", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.driver:
        args.mode = args.driver
        return driver(args)
    if args.voc_listing:
        return voc_listing(args.voc_listing)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    for old in work.glob("out-*"):
        import shutil

        shutil.rmtree(old)
    rows = []
    s3 = None
    try:
        if "s3" in args.storage:
            sys.path.insert(0, str(REPO / "tests"))
            from s3_fake import FakeS3

            s3 = FakeS3().__enter__()
        for storage in args.storage:
            for n in sorted(args.images):
                rows += bench(storage, n, args.unit_size, work, s3)
    finally:
        if s3 is not None:
            s3.__exit__(None, None, None)
    print(f"\n{'storage':<8}{'images':>8}  {'job':<17}{'phase':<15}{'wall s':>8}{'CPU s':>8}{'peak RSS GB':>12}")
    small = {(r["storage"], r["job"], r["phase"]): r for r in rows if r["images"] == min(args.images)}
    for r in rows:
        print(f"{r['storage']:<8}{r['images']:>8}  {r['job']:<17}{r['phase']:<15}{r['wall_s']:>8.2f}{r['cpu_s']:>8.2f}"
              f"{r['rss_gb']:>12.2f}")
    if len(args.images) > 1:
        print(f"\ngrowth {min(args.images)} -> {max(args.images)} images ({max(args.images) / min(args.images):.1f}x "
              "more) per phase, wall and CPU time (linear = the image ratio)")
        for r in rows:
            base = small.get((r["storage"], r["job"], r["phase"]))
            if r["images"] == max(args.images) and base and base["wall_s"] > 0.01:
                print(f"  {r['storage']:<6} {r['job']:<17} {r['phase']:<14} wall {r['wall_s'] / base['wall_s']:5.1f}x"
                      f"  CPU {r['cpu_s'] / max(base['cpu_s'], 1e-3):5.1f}x")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
