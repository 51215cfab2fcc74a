"""Benchmarks time models, not their weights: a detector whose trained weights are not cached
runs with random weights, and the output says so."""

from __future__ import annotations

from icm.zoo import WeightsUnavailable, resolve


def available_or_random(spec: dict, notes: list[str]) -> dict:
    try:
        resolve(spec.get("weights", "random"))
        return spec
    except WeightsUnavailable:
        notes.append(f"{spec.get('label', spec['name'])}: weights {spec['weights']} not cached, using random:0")
        return {**spec, "weights": "random:0"}
