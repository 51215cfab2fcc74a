"""Mutation score of the pure-Python core, each module against its own fast tests (not in CI).

    python bench/mutation.py                      # every module below
    python bench/mutation.py icm/maa/canvas.py    # one module
    make mutation                                 # the same as the first

mutmut (pinned in the ``test`` extras) mutates one module at a time. Its own runner maps every
test of the selection to the functions it reaches and reruns, for each mutant, only those tests;
it is given the module's own tests (``MODULES``), never the whole suite. For each module this
driver copies the tracked files of the checkout into a scratch directory (``--work``, default
``$TMPDIR/icm-mutation/<module>``), appends a ``[tool.mutmut]`` section naming that module and
its tests to the copy's ``pyproject.toml``, runs ``mutmut run`` there, and reads the verdicts
back (``mutmut results``, ``mutmut show``). The checkout itself is never touched.

Score = killed / (mutants − equivalent): a mutant is killed when a test fails (or times out)
with it in place. Survivors judged equivalent (the code behaves the same) are listed in
``EQUIVALENT`` with the reason; they are named by mutmut's mutant ids, which hold for the code
they were judged on (a change to the module renumbers them: judge again). Writes
``<work>/summary.json`` and prints a table and every surviving mutant's diff.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# module → its own fast tests (pytest arguments)
MODULES = {
    "icm/maa/canvas.py": ["tests/test_maa.py", "-k", "letterbox_and_boxes or paste_back"],
    "icm/maa/bounds.py": ["tests/test_maa.py", "-k", "bounds_by_hand or meta_round or paste_back"],
    "icm/maa/methods.py": ["tests/test_maa.py", "-k", "meta_round or masked_sign or meta_aafg_rounds or aafg_lowers"],
    "icm/jrd/labelling.py": ["tests/test_jrd.py", "-k", "labelling_rule or conventions or error_tolerance"],
    "icm/data/manifest.py": ["tests/test_data.py", "-k", "manifest"],
    "icm/data/units.py": ["tests/test_data.py", "tests/test_resume.py", "-k", "relpath or unit_stage_retries"],
    "icm/metrics/rd.py": ["tests/test_metrics.py", "-k", "bd_"],
    "icm/metrics/detection.py": ["tests/test_metrics.py", "tests/test_bootstrap.py", "-k",
                                 "coco_map or coco_conversions or matches_pycocotools"],
    "icm/metrics/bootstrap.py": ["tests/test_bootstrap.py", "-k", "not shapes_set"],
}

# libraries the modules import lazily (inside functions): imported once by the fork server that
# mutmut forks each mutant's test run from, instead of once per mutant (seconds each on a busy machine)
PRELOAD = ("bjontegaard", "scipy.interpolate", "pycocotools.coco", "pycocotools.cocoeval")

# mutant id → why it cannot change behaviour (judged on the commit named in bench/RESULTS.md)
SORT_KIND = ("only rows with equal source_id can come out in another order, and a manifest has one row per "
             "source_id (comparable's contract)")
COCO_INFO = ("the dataset's 'info' entry: pycocotools 2.0.11 (pinned) reads it only in loadRes, as "
             ".get('info', {}), and in COCO.info(), which is never called; absent, None or {} gives the same result")
UNREAD_FAILURE = ("the loop runs 1 + unit_retries ≥ 1 times and every failed attempt sets failure before it is "
                  "returned; the initial value is never returned")
ALIGN_DEFAULT = "align_corners None or left out is F.interpolate's default, False for bilinear"
ANY_NEGATIVE = "numpy 1.26 (pinned) reads any negative size in reshape as the unknown one: reshape(-2) is reshape(-1)"
LABEL_DTYPE = ("class ids are only compared for equality, which numpy does by value across integer, float and bool "
               "dtypes: the same matches without the int64 conversion")
BELOW_THRESHOLD = ("a placeholder IoU of -2 instead of -1 (not eligible / already claimed) is below every IoU threshold "
                   "(> -1) either way, and the reported IoU and score treat both as 'none' (< 0)")
ALL_IMAGES = ("None for the image indices means all images here too: numpy's x[None] keeps every value (a new axis "
              "the mean ignores) and ap50(None) takes every image")
AS_FLOAT = "the values are Python or NumPy floats (and NaN): the array is float64 with or without the dtype"
EQUIVALENT: dict[str, str] = {
    **{f"icm.data.manifest.x_status_counts__mutmut_{n}": "reads every column instead of status, source_id and error: "
       "the same counts and first error (a cost, not a behaviour)" for n in (6, 9)},
    **{f"icm.data.manifest.x_status_counts__mutmut_{n}": "keeps more than the first error row (slice(0, None) or "
       "(0, 2)); only errors[0] is read" for n in (22, 24, 35)},
    "icm.metrics.bootstrap.xǁImageMatchesǁ__init____mutmut_8": "redirect_stdout(None) silences pycocotools' prints "
                                                              "as the StringIO does",
    **{f"icm.metrics.bootstrap.xǁImageMatchesǁ__init____mutmut_{n}": COCO_INFO for n in (11, 12, 13, 14, 16, 17, 18)},
    "icm.metrics.bootstrap.xǁImageMatchesǁ__init____mutmut_37": "the upper area bound 1e10 + 1 instead of 1e10 px²: "
                                                               "only an object of area in (1e10, 1e10 + 1] (an image "
                                                               "of 100 000² px) would differ; pycocotools' 'all' is 1e10 too",
    **{f"icm.metrics.bootstrap.xǁImageMatchesǁ__init____mutmut_{n}": "the area range's label is read only by "
       "summarize(), which is not called" for n in (38, 39)},
    "icm.metrics.bootstrap.xǁImageMatchesǁ__init____mutmut_42": "pycocotools' evaluateImg already cuts each image's "
                                                               "detections at maxDets = max_dets: the second cut "
                                                               "([:max_dets] vs [:None]) removes nothing",
    **{f"icm.metrics.bootstrap.xǁImageMatchesǁ__init____mutmut_{n}": "counts in float64 instead of int64: the same "
       "integers (summed, tested against 0, divided)" for n in (45, 47)},
    **{f"icm.metrics.bootstrap.xǁImageMatchesǁ__init____mutmut_{n}": "the default of a missing iscrowd: every "
       "annotation COCOeval accepts has one (evaluateImg reads o['iscrowd']), and without detections every AP is 0 "
       "whatever the counts" for n in (54, 56, 59)},
    "icm.metrics.bootstrap.xǁImageMatchesǁap50__mutmut_22": "found is empty only when there are no detections at all "
                                                           "(pycocotools makes an entry for every image and class with "
                                                           "ground truth); then every AP is 0 and stopping at the first "
                                                           "gives the same mean, 0",
    "icm.metrics.bootstrap.xǁImageMatchesǁap50__mutmut_35": "numpy reads the sort kind case-insensitively",
    **{f"icm.metrics.bootstrap.xǁImageMatchesǁap50__mutmut_{n}": "astype(None) is astype(float64)" for n in (53, 58)},
    **{f"icm.metrics.bootstrap.xǁImageMatchesǁap50__mutmut_{n}": "the guard against 0/0 as -spacing(1) or spacing(2): "
       "a precision changes by < 1e-15 relative (and -0.0 == 0.0 where tp + fp = 0): float rounding, not a result"
       for n in (73, 76)},
    **{f"icm.metrics.bootstrap.xǁImageMatchesǁap50__mutmut_{n}": "searchsorted's side 'left' is its default, and numpy "
       "reads it case-insensitively" for n in (87, 89)},
    "icm.metrics.bootstrap.xǁImageMatchesǁap50__mutmut_103": "where is len − 1 only when the last detection raised "
       "recall, i.e. is a true positive, and a true positive never has a lower precision than the detection before it "
       "(tp/(n−1) ≤ (tp+1)/n): after the running maximum both entries are equal",
    **{f"icm.metrics.bootstrap.x_interval__mutmut_{n}": "an int or float array: np.percentile returns the same "
       "float64 values" for n in (4, 6)},
    **{f"icm.metrics.bootstrap.x_bd_rate_against_anchor__mutmut_{n}": ALL_IMAGES for n in (22, 25)},
    **{f"icm.metrics.bootstrap.x_bd_rate_against_anchor__mutmut_{n}": AS_FLOAT for n in (45, 47)},
    **{f"icm.metrics.bootstrap.x_paired_point_deltas__mutmut_{n}": ALL_IMAGES for n in (36, 39)},
    "icm.metrics.bootstrap.x_paired_curve_comparison__mutmut_66": ALL_IMAGES,
    **{f"icm.metrics.bootstrap.x_paired_curve_comparison__mutmut_{n}": "np.nanmean of values that are all NaN is NaN "
       "as well (with a RuntimeWarning): the guard only avoids the warning" for n in (72, 80)},
    **{f"icm.metrics.bootstrap.x_paired_curve_comparison__mutmut_{n}": AS_FLOAT for n in (105, 107)},
    **{f"icm.jrd.labelling.x_match_objects__mutmut_{n}": ANY_NEGATIVE for n in (36, 44, 52)},
    **{f"icm.jrd.labelling.x_match_objects__mutmut_{n}": LABEL_DTYPE for n in (32, 34, 40, 42)},
    **{f"icm.jrd.labelling.x_match_objects__mutmut_{n}": BELOW_THRESHOLD for n in (85, 101)},
    "icm.jrd.labelling.x_match_objects__mutmut_92": "numpy reads the sort kind case-insensitively: 'STABLE' is the "
                                                    "same stable sort",
    **{f"icm.jrd.labelling.x_error_tolerant_jrd__mutmut_{n}": "labels kept in their own dtype: np.diff compares bool "
       "labels with not_equal, sums count them, and == 0 compares by value, so 0/1 labels as int, float or bool give "
       "the same JRD (boolean labels are tested)" for n in (5, 7)},
    **{f"icm.metrics.rd.x_bd_metrics__mutmut_{n}": "log10 of an empty curve's rates is an empty array, the same as "
       "the array itself (and such a curve already carries its reason)" for n in (34, 37)},
    "icm.metrics.rd.x_bd_metrics__mutmut_87": "bjontegaard tests require_matching_points for truth only: None is False",
    **{f"icm.metrics.rd.x_bd_metrics__mutmut_{n}": "bjontegaard's min_overlap (default 0.75, or 1) only decides "
       "whether it warns, and the warnings are silenced; the overlap is checked here before the call" for n in (95, 97)},
    "icm.data.units.x_output_relpath__mutmut_17": "the `or \"_\"` fallback is unreachable: parts are non-empty "
                                                  "(empty ones are dropped) and the substitution replaces unsafe runs "
                                                  "by \"_\", never deletes, so it is never empty",
    "icm.data.units.xǁUnitStageǁ__init____mutmut_28": "_writes starts as None instead of []: _run_unit sets it to [] "
                                                      "before each process_unit, the only caller of write_later",
    **{f"icm.data.units.xǁUnitStageǁ_run_unit__mutmut_{n}": UNREAD_FAILURE for n in (1, 2)},
    "icm.maa.canvas.x_letterbox__mutmut_14": "always the downscaling branch: at scale 1.0 it rounds to (h, w) "
                                             "again, and an image of its own size is not resampled",
    "icm.maa.canvas.x_letterbox__mutmut_17": "scale is min(1, ·) and never 2.0: the branch taken computes "
                                             "round(h·1.0), round(w·1.0) = (h, w), the same placement",
    "icm.maa.canvas.x_letterbox__mutmut_33": "resamples an image to its own size, the identity (each output "
                                             "pixel's kernel falls on its own pixel only; the test's torch.equal "
                                             "on unresized images holds with it): a cost, not a behaviour",
    "icm.maa.canvas.x_letterbox__mutmut_36": "the lower clamp after antialiased bilinear downscaling: its kernel's "
                                             "weights are non-negative, so values ≥ 0 stay ≥ 0 (only the upper "
                                             "bound can be crossed, by rounding: tested on a white image)",
    **{f"icm.maa.canvas.x_letterbox__mutmut_{n}": ALIGN_DEFAULT for n in (44, 49)},
    **{f"icm.maa.canvas.x_paste_back__mutmut_{n}": ALIGN_DEFAULT for n in (11, 15)},
    "icm.metrics.detection.x_coco_map__mutmut_1": "redirect_stdout(None) silences pycocotools' prints as the "
                                                  "StringIO does (print() writes nothing when sys.stdout is None)",
    **{f"icm.metrics.detection.x_coco_map__mutmut_{n}": COCO_INFO for n in (4, 5, 6, 7, 9, 10, 11)},
    **{f"icm.data.manifest.x_comparable__mutmut_{n}": SORT_KIND for n in (10, 12, 15, 16)},
    **{f"icm.data.manifest.xǁManifestStoreǁdone_source_ids__mutmut_{n}": "reads every column instead of "
       "source_id only: the same set of ids (a cost, not a behaviour)" for n in (2, 4)},
}


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout.split("\n")
    return [f for f in out if f and (REPO / f).is_file()]


def prepare(module: str, work: Path) -> None:
    if work.exists():
        shutil.rmtree(work)
    for rel in tracked_files():
        if rel.startswith(("icm/", "tests/", "pipelines/")) or rel == "pyproject.toml":
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, work / rel)
    selection = json.dumps(MODULES[module])
    with open(work / "tests" / "conftest.py", "a") as f:   # the copy's: loaded when the fork server collects
        f.write("\n# bench/mutation.py: lazy imports done once, in mutmut's fork server\n"
                + "".join(f"import {name}  # noqa: E402,F401\n" for name in PRELOAD))
    with open(work / "pyproject.toml", "a") as f:
        f.write(f"""
[tool.mutmut]
source_paths = ["icm"]
only_mutate = ["{module}"]
pytest_add_cli_args_test_selection = {selection}
pytest_add_cli_args = ["-p", "no:cacheprovider", "-q"]
process_isolation = "forkserver"
use_git_change_detection = false
""")


def mutmut(work: Path, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("mutmut")
    env = {**os.environ, "PYTHONPATH": f"{work}:{work / 'pipelines'}"}
    return subprocess.run([str(exe), *args], cwd=work, env=env, capture_output=True, text=True, timeout=timeout)


def run_module(module: str, work: Path, max_children: int) -> dict:
    prepare(module, work)
    start = time.time()
    run = mutmut(work, "run", "--max-children", str(max_children))
    elapsed = time.time() - start
    if run.returncode != 0:
        print(run.stdout[-3000:], run.stderr[-3000:], sep="\n")
    mutmut(work, "export-cicd-stats")
    stats_file = work / "mutants" / "mutmut-cicd-stats.json"
    stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
    listing = mutmut(work, "results", "--all", "true").stdout
    verdicts = dict(re.findall(r"^\s*(\S+): (.+)$", listing, flags=re.M))
    survivors = sorted(m for m, v in verdicts.items() if v.strip() not in ("killed", "timeout"))
    diffs = {m: "\n".join(line for line in mutmut(work, "show", m).stdout.splitlines()
                          if line[:1] in "+-" and not line.startswith(("+++", "---")))
             for m in survivors}
    equivalent = [m for m in survivors if m in EQUIVALENT]
    total = int(stats.get("total", len(verdicts)))
    killed = int(stats.get("killed", 0)) + int(stats.get("timeout", 0))
    scored = total - len(equivalent)
    return {"module": module, "tests": MODULES[module], "mutants": total, "killed": killed,
            "survived": len(survivors), "equivalent": len(equivalent),
            "score": round(killed / scored, 4) if scored else None, "seconds": round(elapsed, 1),
            "survivors": {m: {"verdict": verdicts[m], "diff": diffs[m], "equivalent": EQUIVALENT.get(m)}
                          for m in survivors}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("modules", nargs="*", default=list(MODULES), help="modules (default: all)")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "icm-mutation"))
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--threshold", type=float, default=0.9)
    args = parser.parse_args()
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        raise SystemExit(f"not in MODULES: {unknown}; known: {sorted(MODULES)}")
    work = Path(args.work)
    results = []
    for module in args.modules:
        print(f"[mutation] {module} against {' '.join(MODULES[module])}", flush=True)
        result = run_module(module, work / module.replace("/", "_").removesuffix(".py"), args.max_children)
        results.append(result)
        (work / "summary.json").write_text(json.dumps(results, indent=2))
        for name, s in result["survivors"].items():
            print(f"  {name} ({s['verdict']}{'; equivalent: ' + s['equivalent'] if s['equivalent'] else ''})\n"
                  + "\n".join("    " + line for line in s["diff"].splitlines()), flush=True)
    print(f"\n{'module':<28}{'mutants':>8}{'killed':>8}{'equiv.':>8}{'score':>8}{'s':>8}")
    for r in results:
        score = "n/a" if r["score"] is None else f"{100 * r['score']:.1f}%"
        print(f"{r['module']:<28}{r['mutants']:>8}{r['killed']:>8}{r['equivalent']:>8}{score:>8}{r['seconds']:>8.0f}")
    below = [r["module"] for r in results if r["score"] is not None and r["score"] < args.threshold]
    if below:
        raise SystemExit(f"below {args.threshold:.0%}: {below}")


if __name__ == "__main__":
    main()
