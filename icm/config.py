"""Job configuration: one YAML per job, named profiles, dotted command-line overrides.

A job YAML is a mapping; an optional ``profiles:`` mapping holds named partial configs (e.g.
``demo``) that are deep-merged over the base when selected. Overrides are ``key.sub=value``
strings whose value is parsed as YAML (so ``steps=3`` is an int and ``models=[a,b]`` a list).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Iterable

import yaml


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file and the key."""


def deep_merge(base: dict, update: dict) -> dict:
    """Merge ``update`` into ``base``; a mapping whose ``type`` changes (a dataset, a loss) is
    replaced, not merged, so keys of the old type do not leak into the new one."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        old = out.get(key)
        if isinstance(value, dict) and isinstance(old, dict) and value.get("type", old.get("type")) == old.get("type"):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_override(cfg: dict, override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key.sub=value")
    dotted, raw = override.split("=", 1)
    keys = [k for k in dotted.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"override {override!r} names no key")
    node = cfg
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {key!r} is a {type(child).__name__}, not a mapping")
        node = child
    node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else None


def load_config(path: str | Path | None, profile: str | None = None,
                overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Load a job config, merge the named profile, then apply ``key=value`` overrides."""
    cfg: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at top level")
        cfg = loaded
    profiles = cfg.pop("profiles", {}) or {}
    if profile:
        if profile not in profiles:
            raise ConfigError(f"profile {profile!r} is not in {path} (has: {sorted(profiles)})")
        cfg = deep_merge(cfg, profiles[profile])
    for override in overrides:
        apply_override(cfg, override)
    return cfg


def load_section(section: dict, root: str | Path = ".") -> dict[str, Any]:
    """A config section that names another job's config: ``{from: <YAML under root>, profile:
    <name>, ...overrides}`` → that YAML with the profile merged, then the overrides (its own
    ``profiles`` dropped); a section without ``from`` is returned as it is."""
    section = copy.deepcopy(section)
    if "from" not in section:
        return section
    base = load_config(Path(root) / section.pop("from"), profile=section.pop("profile", None))
    return deep_merge(base, section)


def write_resolved(cfg: dict, out_dir: str | Path, name: str = "config.resolved.yaml") -> str:
    """Write the resolved config beside a job's outputs (provenance); ``out_dir`` may be a URI."""
    from icm.data.storage import Storage

    storage = Storage(out_dir)
    storage.write_text(name, yaml.safe_dump(cfg, sort_keys=True))
    return storage.display(name)


def canonical_json(obj: Any) -> str:
    """Stable JSON used for the manifest's ``params`` and ``models`` columns."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
