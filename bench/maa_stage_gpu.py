"""MAA at the stage level on one device, Ray-free (it runs with a GPU machine's own torch, no
Ray): the project's own ``MAAStage.run_unit`` — decode, letterbox, Meta-AAFG, paste back, PNG,
manifest shard — on a unit of shapes images, per setting (detector trio × deterministic on/off ×
optional precision variants):

- throughput: every setting runs in its own fresh process (``configure`` is process-wide, and
  cuBLAS reads its workspace setting once), is warmed up at its own shape (same batch and canvas,
  one outer step), then timed over ≥ ``--repeats`` whole units, ``torch.cuda.synchronize`` before
  and after each;
- GPU busy: the share of wall time the GPU ran kernels — from the profiler (union of kernel and
  copy intervals over one profiled outer step) and from NVML's utilisation samples read in-process
  for exactly the timed repeats;
- host syncs per step: one loss + input-gradient step per detector under
  ``torch.cuda.set_sync_debug_mode("warn")`` (every synchronizing CUDA call, CPU→device copies
  included) and under ``icm.dispatch.DispatchCounter`` (aten ops, dispatch-level syncs);
- reproducibility (deterministic settings): two more fresh processes run the same unit *at the
  same time* on the device, each capped at half its memory as two Ray actors sharing a GPU are —
  their PNGs against the timed process's, byte for byte, and their summed images/s against one
  process alone;
- ``batch_size: auto``: what the probe picks at a whole GPU and at the shipped half share.

A ``--budget-s`` keeps the whole command within a few minutes: settings run in priority order
(shipped trio first), each timed repeat only when its estimate (from the warm-up) fits, and what
did not fit is reported as not measured, never extrapolated.

    python bench/maa_stage_gpu.py                       # the prepared GPU command (bench/RESULTS.md)
    python bench/maa_stage_gpu.py --device cpu --canvas 64 --outer 1 --inner 1 --batch 2 \\
        --detectors yolov8n fasterrcnn_mobilenet_v3_large_fpn centernet_resnet18 --trios custom   # CPU check

Random detector weights (speed and determinism do not depend on them). Prints JSON lines and a
Markdown summary; ``--out`` also writes the JSON there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

TRIOS = {"shipped": ["yolov3", "fasterrcnn_resnet50_fpn", "centernet_resnet50"],   # maa_model.yaml
         "yolov8n": ["yolov8n", "fasterrcnn_resnet50_fpn", "centernet_resnet50"]}  # the earlier bench's


def stage_params(detectors: list[str], args, deterministic: bool, extra: dict | None = None) -> dict:
    return {"method": "meta_model", "canvas": args.canvas, "outer": args.outer, "inner_steps": args.inner,
            "alpha": "2/255", "bound": {"type": "linf", "eps": "8/255"}, "device": args.device,
            "deterministic": deterministic, "seed": 0,
            "detectors": [{"label": n, "name": n, "weights": f"random:{i}"} for i, n in enumerate(detectors)],
            **(extra or {})}


# ---------------------------------------------------------------- one setting, in its own process

def _unit(batch: int):
    from icm.data.ray_io import select_refs, work_units
    from icm.data.samples import shapes_reader

    (unit,) = work_units(select_refs(shapes_reader("photo", "train"), batch), batch)
    return unit


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class NvmlBusy:
    """NVML's GPU utilisation samples (the % of each ~1/6 s sample period a kernel ran) read in
    this process for exactly the window between ``start`` and ``stop``."""

    def __init__(self, device):
        self.handle = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            index = device.index if device.index is not None else 0
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            if visible:
                index = int(visible.split(",")[index])
            self.nvml, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            self.error = f"{type(exc).__name__}: {exc}"

    def start(self) -> None:
        self.t0 = time.time_ns() // 1000

    def stop(self) -> float | None:
        if self.handle is None:
            return None
        try:
            _, samples = self.nvml.nvmlDeviceGetSamples(self.handle, self.nvml.NVML_GPU_UTILIZATION_SAMPLES, self.t0)
        except self.nvml.NVMLError:
            return None
        values = [s.sampleValue.uiVal for s in samples if s.timeStamp >= self.t0]
        return round(sum(values) / len(values), 1) if values else None


def _kernel_busy(stage, unit, outer_steps: int = 1) -> dict:
    """Profile one unit at ``outer_steps``: union of the GPU's kernel/copy intervals over wall time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    stage.cfg = {**stage.cfg, "outer": outer_steps}
    _sync(stage.device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        stage.run_unit(unit)
        _sync(stage.device)
        wall = time.perf_counter() - start
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start)
    busy, end = 0.0, float("-inf")
    for a, b in spans:
        if b > end:
            busy += b - max(a, end)
            end = b
    return {"profiled_wall_s": round(wall, 3), "kernel_busy_s": round(busy / 1e6, 3),
            "kernel_busy_pct": round(100 * busy / 1e6 / wall, 1) if wall else None}


def _step_counts(stage, batch: int) -> dict:
    """Per detector, one loss + input-gradient step on ``batch`` canvases: aten ops and syncs."""
    import torch

    from icm.dispatch import DispatchCounter
    from icm.maa.methods import gradient
    from icm.maa.stage import _probe_members

    out = {}
    x = torch.rand(batch, 3, stage.canvas, stage.canvas, generator=torch.Generator().manual_seed(0)).to(stage.device)
    for member in _probe_members(stage, batch):
        def step():
            gradient(lambda a: member.loss(a, 0), x)
        step()                                                  # warm-up at this shape
        _sync(stage.device)
        with DispatchCounter() as count:
            step()
        row = {"aten_ops": count.ops, "dispatch_syncs": count.syncs}
        if stage.device.type == "cuda":
            _sync(stage.device)
            torch.cuda.set_sync_debug_mode("warn")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                step()
            torch.cuda.set_sync_debug_mode("default")
            row["cuda_syncs"] = sum("synchronizing" in str(w.message) for w in caught)
        out[member.name] = row
    return out


def _hashes(out_dir: Path, rows: list[dict]) -> dict:
    return {r["source_id"]: hashlib.sha256((out_dir / r["output_path"]).read_bytes()).hexdigest() for r in rows}


def run_setting(setting: dict, work: Path, deadline: float) -> dict:
    """One setting in this (fresh) process: build, warm up, count, profile, time the repeats."""
    import torch

    from icm.maa.stage import MAAStage, largest_batch

    role, params, batch = setting["role"], setting["params"], setting["batch"]
    if setting.get("memory_share"):
        torch.cuda.set_per_process_memory_fraction(setting["memory_share"])
    from icm.data.samples import SHAPE_CLASSES

    classes = list(SHAPE_CLASSES)
    if role == "probe":
        start = time.perf_counter()
        choice = largest_batch(params, classes, gpu_share=setting["gpu_share"])
        return {**choice, "probe_s": round(time.perf_counter() - start, 1)}
    unit = _unit(batch)
    start = time.perf_counter()
    stage = MAAStage(str(work / "warm"), {**params, "outer": 1}, classes)
    out = {"build_s": round(time.perf_counter() - start, 1), "device": stage.runtime["device_name"],
           "device_type": stage.device.type,
           "torch": torch.__version__, "images": batch, "threads": torch.get_num_threads()}
    _sync(stage.device)
    start = time.perf_counter()
    stage.run_unit(unit)                                        # warm-up: this batch and canvas, one outer step
    _sync(stage.device)
    out["warmup_outer1_s"] = round(time.perf_counter() - start, 2)
    if role == "pair":                                          # the reproducibility partner: one full unit
        stage.store = type(stage.store)(str(work / "run"), stage.extra_schema)
        stage.storage, stage.cfg = stage.store.storage, params
        if setting.get("barrier"):
            Path(setting["barrier"], f"ready-{os.getpid()}").touch()
            while len(list(Path(setting["barrier"]).glob("ready-*"))) < 2 and time.time() < deadline:
                time.sleep(0.05)
        _sync(stage.device)
        start = time.perf_counter()
        rows = stage.run_unit(unit)
        _sync(stage.device)
        return {**out, "seconds": round(time.perf_counter() - start, 2), "hashes": _hashes(work / "run", rows),
                "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2 ** 30, 2)
                if stage.device.type == "cuda" else None}
    out["step_counts"] = _step_counts(stage, batch)
    if stage.device.type == "cuda":
        out |= _kernel_busy(stage, unit)
    outer = int(params.get("outer", 10))
    per_outer = out["warmup_outer1_s"]
    fallback = min(int(setting.get("fallback_outer") or outer), outer)
    if time.time() + 2 * per_outer * outer > deadline and time.time() + 2 * per_outer * fallback <= deadline:
        outer = fallback                     # a figure at fewer outer steps, labelled as such, not extrapolated
    params = {**params, "outer": outer}
    stage.cfg = params
    out["timed_outer"] = outer
    estimate = per_outer * outer
    out["estimate_s"] = round(estimate, 1)
    busy_meter, repeats, nvml = NvmlBusy(stage.device), [], []
    for i in range(setting["repeats"]):
        if time.time() + estimate > deadline:
            out["cut"] = f"{i} of {setting['repeats']} repeats: each takes ~{estimate:.0f} s, the budget had " \
                         f"{max(0, deadline - time.time()):.0f} s left"
            break
        stage.store = type(stage.store)(str(work / f"rep{i}"), stage.extra_schema)
        stage.storage = stage.store.storage
        if stage.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        _sync(stage.device)
        busy_meter.start()
        start = time.perf_counter()
        rows = stage.run_unit(unit)
        _sync(stage.device)
        seconds = time.perf_counter() - start
        nvml.append(busy_meter.stop())
        if rows is None or any(r["status"] != "ok" for r in rows):
            raise RuntimeError(f"unit failed: {stage.failure or rows}")
        repeats.append(round(seconds, 2))
        out["hashes"] = _hashes(work / f"rep{i}", rows)
        estimate = seconds
    if repeats and time.time() + estimate <= deadline:
        # once more on another thread, as Ray runs an overlap_io actor's calls: the same bytes? (its
        # time is reported apart: a thread's CPU-side ops may run with another OpenMP team)
        stage.store = type(stage.store)(str(work / "thread"), stage.extra_schema)
        stage.storage = stage.store.storage
        start = time.perf_counter()
        with ThreadPoolExecutor(1) as pool:
            rows = pool.submit(stage.run_unit, unit).result()
        _sync(stage.device)
        out["thread_run_s"] = round(time.perf_counter() - start, 2)
        hashes = _hashes(work / "thread", rows) if rows else {}
        out["thread_byte_identical"] = f"{sum(hashes.get(k) == v for k, v in out['hashes'].items())}/{len(out['hashes'])}"
    out["repeat_s"] = repeats
    if repeats:
        out["images_per_s"] = [round(batch / s, 4) for s in repeats]
        out["images_per_s_mean"] = round(batch * len(repeats) / sum(repeats), 4)
    if stage.device.type == "cuda":
        out["nvml_busy_pct"] = nvml
        out["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2 ** 30, 2)
    return out


# ---------------------------------------------------------------- the orchestrating process

def _spawn(setting: dict, work: Path, deadline: float) -> subprocess.Popen:
    work.mkdir(parents=True, exist_ok=True)
    (work / "setting.json").write_text(json.dumps(setting))
    return subprocess.Popen([sys.executable, __file__, "--worker", str(work), "--deadline", str(deadline)],
                            stdout=sys.stderr, stderr=sys.stderr, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _result(proc: subprocess.Popen, work: Path, deadline: float) -> dict:
    try:
        proc.wait(timeout=max(1.0, deadline - time.time() + 60))
    except subprocess.TimeoutExpired:
        proc.kill()
        return {"error": "killed: past the budget"}
    path = work / "result.json"
    return json.loads(path.read_text()) if path.exists() else {"error": f"exit code {proc.returncode}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--canvas", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8, help="images per unit (one batched step)")
    parser.add_argument("--outer", type=int, default=10)
    parser.add_argument("--inner", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--trios", nargs="+", default=["shipped", "yolov8n"], choices=[*TRIOS, "custom"])
    parser.add_argument("--detectors", nargs="+", help="the 'custom' trio")
    parser.add_argument("--modes", nargs="+", default=["on", "off"], choices=["on", "off"], help="deterministic")
    parser.add_argument("--variant", nargs="+", action="append", default=[], metavar="NAME KEY=VALUE",
                        help="an extra deterministic setting of the first trio, e.g. --variant tf32 tf32=true "
                             "(values are YAML)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--fallback-outer", type=int, default=2,
                        help="when two repeats at --outer do not fit the budget, time this many outer steps instead "
                             "(reported as such)")
    parser.add_argument("--budget-s", type=float, default=480)
    parser.add_argument("--no-pair", action="store_true", help="skip the two-process reproducibility run")
    parser.add_argument("--no-probe", action="store_true", help="skip the batch_size: auto probes")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:                                             # one setting, in this fresh process
        setting = json.loads((args.worker / "setting.json").read_text())
        result = run_setting(setting, args.worker, args.deadline)
        (args.worker / "result.json").write_text(json.dumps(result))
        return

    import yaml

    trios = {**TRIOS, "custom": args.detectors or []}
    if "custom" in args.trios and not args.detectors:
        parser.error("--trios custom needs --detectors")
    plan = []
    for trio in args.trios:
        for mode in args.modes:
            plan.append({"trio": trio, "deterministic": mode == "on", "variant": ""})
    for k, (name, *pairs) in enumerate(args.variant):              # after the first trio's settings
        extra = {key: yaml.safe_load(v) for key, v in (p.split("=", 1) for p in pairs)}
        plan.insert(len(args.modes) + k, {"trio": args.trios[0], "deterministic": True, "variant": name, "extra": extra})
    begin = time.time()
    deadline = begin + args.budget_s
    results = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                          if k not in ("worker", "deadline")}, "settings": [], "probes": []}

    def record(key, value):
        results[key].append(value)
        print(json.dumps({key: value}), flush=True)
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))

    _unit(args.batch)                     # the sample images, made once here before the workers read them
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for i, item in enumerate(plan):
            entry = {"trio": item["trio"], "detectors": trios[item["trio"]], "deterministic": item["deterministic"],
                     "variant": item["variant"]}
            if deadline - time.time() < 20:
                record("settings", {**entry, "not_measured": "budget spent"})
                continue
            params = stage_params(trios[item["trio"]], args, item["deterministic"], item.get("extra"))
            base = {"params": params, "batch": args.batch, "repeats": args.repeats, "fallback_outer": args.fallback_outer}
            work = tmp / f"s{i}"
            solo = _result(_spawn({**base, "role": "time"}, work / "time", deadline), work / "time", deadline)
            entry |= solo
            if item["deterministic"] and not args.no_pair and "hashes" in solo:
                # the partners build, warm up and run at once: up to twice as slow each on a shared device
                if deadline - time.time() < 2 * (solo["build_s"] + solo["warmup_outer1_s"] + solo["repeat_s"][-1]) + 30:
                    entry["pair"] = "not measured: budget"
                else:
                    barrier = work / "barrier"
                    barrier.mkdir()
                    pair = {**base, "role": "pair", "barrier": str(barrier),    # two actors sharing one GPU
                            "params": {**params, "outer": solo["timed_outer"]},
                            "memory_share": 0.5 if solo.get("device_type") == "cuda" else None}
                    procs = [(_spawn(pair, work / f"pair{k}", deadline), work / f"pair{k}") for k in range(2)]
                    partners = [_result(p, w, deadline) for p, w in procs]
                    entry["pair"] = [{k: v for k, v in p.items() if k != "hashes"} for p in partners]
                    if all("hashes" in p for p in partners):
                        ids = sorted(solo["hashes"])
                        same = [sum(p["hashes"][s] == solo["hashes"][s] for s in ids) for p in partners]
                        entry["byte_identical_across_processes"] = f"{min(same)}/{len(ids)} (3 processes)"
                        slowest = max(p["seconds"] for p in partners)
                        entry["pair_images_per_s"] = round(2 * args.batch / slowest, 4)
            entry.pop("hashes", None)
            record("settings", entry)
        if not args.no_probe:
            for share in (1.0, 0.5):
                if deadline - time.time() < 30:
                    record("probes", {"gpu_share": share, "not_measured": "budget spent"})
                    continue
                params = stage_params(trios[args.trios[0]], args, True)
                work = tmp / f"probe{share}"
                record("probes", {"trio": args.trios[0], **_result(_spawn(
                    {"role": "probe", "params": params, "batch": args.batch, "gpu_share": share}, work, deadline),
                    work, deadline)})
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    print(f"\nMAA stage, model-wise Meta-AAFG, canvas {args.canvas}, T = {args.outer}, {args.inner} inner steps, "
          f"unit {args.batch} images; {time.time() - begin:.0f} s in all")
    print("| trio | deterministic | variant | T timed | images/s (repeats) | kernel busy % | NVML busy % | peak GiB | "
          "2 processes sharing: images/s, byte-identical | a run on another thread: s, byte-identical |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    for s in results["settings"]:
        if "not_measured" in s or "error" in s:
            print(f"| {s['trio']} | {'on' if s['deterministic'] else 'off'} | {s['variant']} | | "
                  f"not measured: {s.get('not_measured') or s.get('error')} | | | | | |")
            continue
        pair = (f"{s.get('pair_images_per_s')}, {s.get('byte_identical_across_processes')}"
                if "pair_images_per_s" in s else (s.get("pair") if isinstance(s.get("pair"), str) else ""))
        rates = s.get("images_per_s")
        print(f"| {s['trio']} | {'on' if s['deterministic'] else 'off'} | {s['variant']} | {s.get('timed_outer')} | "
              f"{s.get('images_per_s_mean')} ({', '.join(map(str, rates or [])) or s.get('cut')}) | "
              f"{s.get('kernel_busy_pct')} | {s.get('nvml_busy_pct')} | {s.get('peak_reserved_gib')} | {pair} | "
              f"{s.get('thread_run_s')}, {s.get('thread_byte_identical')} |")
    for s in results["settings"]:
        if "step_counts" in s:
            print(f"- {s['trio']} deterministic {'on' if s['deterministic'] else 'off'}: per step at batch "
                  f"{args.batch} {json.dumps(s['step_counts'])}")
    for p in results["probes"]:
        print(f"- batch_size auto at GPU share {p.get('gpu_share')}: {p.get('batch_size')} "
              f"({p.get('how') or p.get('not_measured') or p.get('error')}; {p.get('probe_s')} s)")


if __name__ == "__main__":
    main()
