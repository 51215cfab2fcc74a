"""Where and how a stage computes: deterministic algorithms on or off, and the provenance a
manifest row records about it (device, torch/CUDA versions, the setting).

Sign-gradient descent amplifies CUDA's non-deterministic reductions: two identical MAA runs on an
H200 wrote 0 of 8 images byte-identical; with deterministic algorithms, cuDNN autotuning off and a
fixed cuBLAS workspace they wrote 8 of 8 (TRAPS.md). Data generation therefore runs deterministic
by default; ``deterministic: false`` trades that for speed (README: "Reproducible on GPU").
"""

from __future__ import annotations

import os
import platform

import torch


def configure(deterministic: bool) -> None:
    """Set this process's algorithms. Call before the first CUDA work: cuBLAS reads its workspace
    setting when it creates its handle."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: an op without a deterministic kernel warns (naming itself) instead of failing a job
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True


def describe(device: torch.device, deterministic: bool, **extra) -> dict:
    """What a manifest row records about where it was computed."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {"device": str(device), "device_name": name, "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
            "deterministic": bool(deterministic), **extra}


def configure_inference(deterministic: bool) -> None:
    """Algorithms for a stage that only runs detectors forward (OW-JRD's labelling): no
    deterministic-algorithm checks — they guard backward kernels and atomics a forward pass does
    not use — only cuDNN's flags (fixed convolution algorithms, no autotuning), which make its
    forward pass repeat bit for bit."""
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic = bool(deterministic)
    torch.backends.cudnn.benchmark = not deterministic
