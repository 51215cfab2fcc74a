import pytest

from icm.config import ConfigError, load_config, write_resolved


def test_profile_and_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("a: {b: 1, c: [1, 2]}\nsteps: 10\nprofiles:\n  demo: {steps: 3, a: {b: 2}}\n")
    cfg = load_config(path, profile="demo", overrides=["a.c=[5]", "new.key=0.5", "name=x"])
    assert cfg == {"a": {"b": 2, "c": [5]}, "steps": 3, "new": {"key": 0.5}, "name": "x"}
    out = write_resolved(cfg, tmp_path / "out")
    assert load_config(out) == cfg


def test_profile_replaces_a_mapping_of_another_type(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("dataset: {type: coco, annotation_file: a.json, image_root: im}\nloss: {type: rd, lmbda: 1}\n"
                    "profiles:\n  demo: {dataset: {type: shapes, split: val}, loss: {lmbda: 2}}\n")
    cfg = load_config(path, profile="demo")
    assert cfg["dataset"] == {"type": "shapes", "split": "val"}
    assert cfg["loss"] == {"type": "rd", "lmbda": 2}


def test_config_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    path = tmp_path / "job.yaml"
    path.write_text("a: 1\n")
    with pytest.raises(ConfigError, match="profile 'demo'"):
        load_config(path, profile="demo")
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(path, overrides=["novalue"])
    with pytest.raises(ConfigError, match="not a mapping"):
        load_config(path, overrides=["a.b=2"])


def _detector_specs(node):
    """Every spec listed under a ``detectors`` key anywhere in a resolved config."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "detectors" and isinstance(value, list):
                yield from (spec for spec in value if isinstance(spec, dict))
            else:
                yield from _detector_specs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _detector_specs(value)


def test_shipped_configs_resolve_and_name_registered_models():
    """Every YAML the README points at loads under each of its profiles, and every detector it
    names is registered (a renamed builder — e.g. centernet_resnet18 → _skip — breaks here, not in
    the middle of `make demo`)."""
    from pathlib import Path

    import yaml

    from icm.zoo.registry import lookup

    repo = Path(__file__).resolve().parents[1]
    paths = sorted([*repo.glob("pipelines/configs/*.yaml"), *repo.glob("pipelines/experiments/*.yaml"),
                    *repo.glob("tuning/configs/*.yaml")])
    assert len(paths) >= 14
    names = set()
    for path in paths:
        for profile in [None, *(yaml.safe_load(path.read_text()).get("profiles") or {})]:
            for spec in _detector_specs(load_config(path, profile=profile)):
                try:
                    lookup("detector", spec["name"])
                except KeyError as exc:
                    raise AssertionError(f"{path.name} (profile {profile}): {exc}") from None
                names.add(spec["name"])
    assert {"centernet_resnet18_skip", "yolov8n", "fasterrcnn_resnet18_fpn", "fcos_resnet18_fpn"} <= names
