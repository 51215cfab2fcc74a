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
