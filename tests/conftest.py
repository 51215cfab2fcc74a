"""One shared local Ray cluster per test session, bound to a loopback address (TRAPS.md), and
small sample data generated once per session. The test detector ``oracle``
(``tests/oracle_detectors.py``) is registered here and in every worker of the cluster."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "pipelines"))

import oracle_detectors  # noqa: E402,F401 - registers the "oracle" detector


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("icm-data")
    os.environ["ICM_DATA_DIR"] = str(root)  # Ray workers inherit it
    return root


@pytest.fixture(scope="session")
def small_shapes(data_root) -> Path:
    from icm.data.samples import shapes

    return shapes(data_root, n_train=24, n_val=12, seed=7)


@pytest.fixture(scope="session")
def ray_cluster(data_root):
    import ray
    from ray import cloudpickle

    import oracle_detectors

    cloudpickle.register_pickle_by_value(oracle_detectors)   # Ray workers cannot import tests/
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.2",
             runtime_env={"env_vars": {"ICM_DATA_DIR": str(data_root)},
                          "worker_process_setup_hook": oracle_detectors.worker_setup})   # the "oracle" detector
    yield ray
    ray.shutdown()
