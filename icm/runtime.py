"""Where and how a stage computes: deterministic algorithms on or off, the numeric precision, and
the provenance a manifest row records about them (device, torch/CUDA versions, the settings).

Sign-gradient descent amplifies CUDA's non-deterministic reductions: two identical MAA runs on an
H200 wrote 0 of 8 images byte-identical; with deterministic algorithms, cuDNN autotuning off and a
fixed cuBLAS workspace they wrote 8 of 8 (TRAPS.md). Data generation therefore runs deterministic
by default; ``deterministic: false`` trades that for speed (README: "Reproducible on GPU").
Deterministic means it: an op with no deterministic kernel raises (``warn_only=False``), and the
stage runs one step of each detector at start (``fail_fast_on_nondeterminism``) so such an op
fails the job there, by name, instead of a row claiming ``deterministic: true`` over it.

Precision (``Precision``, a job setting, recorded in each row and in the resume guard). Every
setting changes the numbers, so an output folder never mixes two; each is a fixed choice of
kernels, so under ``deterministic: true`` each is expected to reproduce across processes on the
same GPU model and software stack (none introduces a non-deterministic op; the preflight would
name one) — never across GPU models or library versions:

* ``tf32``: TF32 tensor-core math for float32 matmuls and cuDNN convolutions (Ampere and later).
  Off by default: full float32 everywhere. (torch itself allows TF32 in cuDNN convolutions by
  default; off means off.)
* ``autocast: bfloat16``: the detectors' networks run under bf16 autocast; their losses are
  computed in float32 from float32 copies of the network outputs.
* ``channels_last``: detector weights and inputs in NHWC memory layout (faster convolutions on
  tensor cores).
* ``fold_bn``: each frozen detector's conv–BatchNorm pairs folded into one conv (exact up to float
  rounding: eval-mode BN is an affine map per channel).
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16}
_NO_DETERMINISTIC_KERNEL = re.compile(r"(\S+) does not have a deterministic implementation")


@dataclass(frozen=True)
class Precision:
    """How a stage's detectors compute (see the module docstring). Defaults: float32, no TF32,
    no autocast, NCHW, BatchNorm kept."""

    tf32: bool = False
    autocast: str | None = None     # None or a key of AUTOCAST_DTYPES
    channels_last: bool = False
    fold_bn: bool = False

    @classmethod
    def from_config(cls, value: dict | None) -> "Precision":
        """A job's ``precision:`` mapping (absent keys take the defaults); unknown keys and
        values fail with the accepted ones."""
        value = dict(value or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"precision: unknown key(s) {unknown}; known: {sorted(known)}")
        autocast = value.get("autocast")
        if autocast in (False, "off", "none", "float32"):
            autocast = None
        if autocast is not None and autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"precision.autocast: {autocast!r} is not one of {['off', *AUTOCAST_DTYPES]}")
        flags = {}
        for key in ("tf32", "channels_last", "fold_bn"):
            flag = value.get(key, False)
            if not isinstance(flag, bool):
                raise ValueError(f"precision.{key}: {flag!r} is not true or false")
            flags[key] = flag
        return cls(autocast=autocast, **flags)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return AUTOCAST_DTYPES[self.autocast] if self.autocast else None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def configure(deterministic: bool, precision: Precision | None = None) -> None:
    """Set this process's algorithms and float32 math. Call before the first CUDA work: cuBLAS
    reads its workspace setting when it creates its handle."""
    precision = precision or Precision()
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)   # an op without a deterministic kernel raises
        # Deterministic mode would also fill each new torch.empty with NaN: a full extra write per
        # allocation, which only makes a difference to code reading memory it never wrote.
        torch.utils.deterministic.fill_uninitialized_memory = False
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True
    # The legacy flags set matmul, cuDNN conv and cuDNN RNN consistently (mixing them with the
    # new per-backend fp32_precision API makes torch refuse to read either).
    torch.backends.cuda.matmul.allow_tf32 = precision.tf32
    torch.backends.cudnn.allow_tf32 = precision.tf32


def fail_fast_on_nondeterminism(label: str, step: Callable[[], Any]) -> None:
    """Run ``step`` (one loss + input gradient of detector ``label`` on a small input) under the
    configured algorithms; an op with no deterministic kernel fails here, in one line naming the
    detector, the op and the fix, rather than partway through a job."""
    try:
        step()
    except RuntimeError as exc:
        match = _NO_DETERMINISTIC_KERNEL.search(str(exc))
        if match is None:
            raise
        raise NondeterministicOpError(
            f"detector {label!r}: {match[1]} has no deterministic kernel on this device, so "
            "'deterministic: true' cannot hold; set deterministic: false (rows then record it), or use a "
            "detector that avoids this op") from None


class NondeterministicOpError(RuntimeError):
    """A detector needs an op that has no deterministic kernel while ``deterministic: true``."""


def describe(device: torch.device, deterministic: bool, precision: Precision | None = None, **extra) -> dict:
    """What a manifest row records about where and how it was computed."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {"device": str(device), "device_name": name, "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
            "deterministic": bool(deterministic), "precision": (precision or Precision()).as_dict(), **extra}


def configure_inference(deterministic: bool) -> None:
    """Algorithms for a stage that only runs detectors forward (OW-JRD's labelling): no
    deterministic-algorithm checks — they guard backward kernels and atomics a forward pass does
    not use — only cuDNN's flags (fixed convolution algorithms, no autotuning), which make its
    forward pass repeat bit for bit."""
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic = bool(deterministic)
    torch.backends.cudnn.benchmark = not deterministic
