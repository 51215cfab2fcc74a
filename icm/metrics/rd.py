"""BD-rate / BD-PSNR through the ``bjontegaard`` package.

For machine tasks the "quality" axis is mAP or top-1 instead of PSNR. When the package cannot
compute (too few points, too little overlap) the result says "n/a" with the reason, not a number.
"""

from __future__ import annotations

from typing import Sequence


def bd_metrics(rate_anchor: Sequence[float], quality_anchor: Sequence[float],
               rate_test: Sequence[float], quality_test: Sequence[float],
               method: str = "akima") -> dict:
    import bjontegaard as bd

    result: dict = {"method": method}
    for key, fn in (("bd_rate_percent", bd.bd_rate), ("bd_quality", bd.bd_psnr)):
        try:
            result[key] = float(fn(list(rate_anchor), list(quality_anchor), list(rate_test),
                                   list(quality_test), method=method))
        except Exception as exc:  # noqa: BLE001 - the package raises several types; report why
            result[key] = "n/a"
            result[f"{key}_reason"] = f"{type(exc).__name__}: {exc}"
    return result
