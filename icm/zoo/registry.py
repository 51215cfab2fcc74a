"""Name → builder registries (in the spirit of CompressAI's ``register_model``)."""

from __future__ import annotations

import importlib
from typing import Callable

REGISTRIES: dict[str, dict[str, Callable]] = {"codec": {}, "detector": {}, "classifier": {}, "clip": {}}
# Kinds whose builders register when their module is imported, on the first lookup of the kind: a
# job that builds only a detector never imports CompressAI (with SciPy and torch_geometric) in its
# actors, nor a codec job every detector family.
PROVIDERS = {"codec": "icm.zoo.codecs", "detector": "icm.detectors"}


def register(kind: str, *names: str):
    def wrap(fn: Callable) -> Callable:
        for name in names:
            REGISTRIES[kind][name] = fn
        return fn
    return wrap


def lookup(kind: str, name: str) -> Callable:
    if kind in PROVIDERS:
        importlib.import_module(PROVIDERS[kind])
    table = REGISTRIES[kind]
    if name in table:
        return table[name]
    for prefix, fn in table.items():  # prefix entries such as "detectron2:" take a suffix
        if prefix.endswith(":") and name.startswith(prefix):
            return fn
    raise KeyError(f"unknown {kind} {name!r}; known: {sorted(table)}")


def attach_provenance(model, name: str, family: str, weights) -> None:
    """Record what a built model is, for the manifest's ``models`` column."""
    from icm.data.manifest import model_provenance

    model.icm_provenance = model_provenance(name, family, weights.spec, weights.sha256)
