"""Resolve paths from list files and manifests strictly inside their dataset root."""

from __future__ import annotations

import os
import posixpath
from pathlib import Path


class PathEscapesRoot(ValueError):
    """A path in a list file or manifest points outside the dataset root."""


def resolve_location_under(root: str, relative: str) -> str:
    """``resolve_under`` for a dataset root that may be a URI (``s3://bucket/prefix``): the
    object's URI, refusing relative paths that leave the prefix."""
    if "://" not in str(root):
        return str(resolve_under(root, relative))
    rel = posixpath.normpath(str(relative))
    if rel == ".." or rel.startswith("../") or posixpath.isabs(rel) or "://" in rel:
        raise PathEscapesRoot(f"path {str(relative)!r} escapes the dataset root {root}")
    return f"{str(root).rstrip('/')}/{rel}"


def resolve_under(root: str | Path, relative: str | Path) -> Path:
    """Join ``relative`` to ``root`` and refuse any result outside ``root``.

    Absolute paths are accepted only when they already lie under the root. Symlinks are
    resolved before the check, so a link pointing out of the root is refused as well.
    """
    root_real = Path(os.path.realpath(root))
    candidate = Path(relative)
    if not candidate.is_absolute():
        candidate = root_real / candidate
    real = Path(os.path.realpath(candidate))
    if real != root_real and root_real not in real.parents:
        raise PathEscapesRoot(f"path {str(relative)!r} escapes the dataset root {root_real}")
    return real
