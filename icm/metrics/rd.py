"""BD-rate / BD-quality through the ``bjontegaard`` package (``bd_rate``, ``bd_psnr``).

For machine tasks the "quality" axis is mAP or top-1 instead of PSNR. Curves may have different
point counts. The package integrates over the overlap of the two curves and, when they do not
overlap, returns NaN with a warning (and only warns when they overlap little): here such cases
are "n/a" with the reason and the overlap share, never a number nobody should read and never NaN.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np

MIN_OVERLAP = 0.75     # the package's own default threshold for a trustworthy BD figure
SPANS = ("union", "test")


def _bracket(axis_a: np.ndarray, lo: float, hi: float) -> slice:
    """The anchor's points (in rate order) from the last at or below ``lo`` to the first after it
    at or above ``hi``: the stretch of the anchor that brackets the range [lo, hi]."""
    below, above = np.nonzero(axis_a <= lo)[0], np.nonzero(axis_a >= hi)[0]
    start = int(below.max()) if len(below) else 0
    after = above[above >= start]
    return slice(start, int(after.min()) + 1 if len(after) else len(axis_a))


def _overlap(a: np.ndarray, b: np.ndarray, span: str = "union") -> float:
    """Share of the union of two ranges (``span="test"``: of ``b``'s range) that both cover."""
    lo, hi = max(a.min(), b.min()), min(a.max(), b.max())
    total = b.max() - b.min() if span == "test" else max(a.max(), b.max()) - min(a.min(), b.min())
    return float(max(hi - lo, 0.0) / total) if total > 0 else 0.0


def span_note(span: str, anchor: str) -> str:
    """What a BD table's heading says of ``span``."""
    return f"over each curve's whole quality range ({anchor} sampled past both its ends)" if span == "test" else ""


def _curve(rate: Sequence[float], quality: Sequence[float], name: str) -> tuple[np.ndarray, np.ndarray, str]:
    r, q = np.asarray(rate, float), np.asarray(quality, float)
    if r.shape != q.shape:
        return r, q, f"the {name} curve has {len(r)} rates but {len(q)} quality values"
    keep = np.isfinite(r) & np.isfinite(q) & (r > 0)
    r, q = r[keep], q[keep]
    order = np.argsort(r)
    r, q = r[order], q[order]
    if len(r) < 2:
        return r, q, f"the {name} curve has {len(r)} usable point(s); BD needs at least 2"
    return r, q, ""


def bd_metrics(rate_anchor: Sequence[float], quality_anchor: Sequence[float],
               rate_test: Sequence[float], quality_test: Sequence[float],
               method: str = "akima", min_overlap: float = MIN_OVERLAP, span: str = "union") -> dict:
    """BD-rate (% rate change at equal quality; negative = the test codec saves bits) and
    BD-quality (mean quality change at equal rate), each with the overlap share of the axis it
    integrates over; "n/a" plus ``*_reason`` where it cannot be trusted.

    ``span``: what that share is of. ``union`` (the package's rule): both curves' range — two
    codecs whose quality moves differently with rate (a learned codec's mAP stays high where
    JPEG's falls) rarely overlap on most of it. ``test``: the test curve's range, for an anchor
    sampled past both of its ends (a JPEG ladder is cheap to extend): the figure then averages
    over all of the test curve, and the anchor enters with the stretch of its points that
    brackets that range (``_bracket``), so its rise is checked only there."""
    import bjontegaard as bd

    if span not in SPANS:
        raise ValueError(f"span must be one of {SPANS}, got {span!r}")

    ra, qa, bad_a = _curve(rate_anchor, quality_anchor, "anchor")
    rt, qt, bad_t = _curve(rate_test, quality_test, "test")
    result: dict = {"method": method, "points": [len(ra), len(rt)]}
    checks = (("bd_rate_percent", bd.bd_rate, qa, qt, "quality"),
              ("bd_quality", bd.bd_psnr, np.log10(ra) if len(ra) else ra, np.log10(rt) if len(rt) else rt, "log-rate"))
    for key, fn, axis_a, axis_t, axis in checks:
        reason = bad_a or bad_t
        cut = slice(None)
        if not reason:
            if span == "test":
                cut = _bracket(axis_a, axis_t.min(), axis_t.max())
            share = _overlap(axis_a, axis_t, span)
            result[f"{key}_overlap"] = round(share, 3)
            of = "the test curve's" if span == "test" else "the"
            if share == 0:
                reason = f"the curves do not overlap on the {axis} axis"
            elif share < min_overlap:
                reason = f"the curves overlap on {share:.0%} of {of} {axis} range, below {min_overlap:.0%}"
            elif key == "bd_rate_percent" and (np.any(np.diff(qa[cut]) <= 0) or np.any(np.diff(qt) <= 0)):
                reason = "quality does not rise strictly with rate on both curves (rate cannot be read off quality)"
        if not reason:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    value = float(fn(ra[cut], qa[cut], rt, qt, method=method, require_matching_points=False,
                                     min_overlap=0))
                if not math.isfinite(value):
                    reason = f"the interpolation gave {value}"
                else:
                    result[key] = value
                    continue
            except Exception as exc:  # noqa: BLE001 - the package raises several types; report why
                reason = f"{type(exc).__name__}: {exc}"
        result[key] = "n/a"
        result[f"{key}_reason"] = reason
    return result
