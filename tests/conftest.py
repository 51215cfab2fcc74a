"""One shared local Ray cluster per test session, bound to a loopback address (TRAPS.md), and
small sample data generated once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "pipelines"))
os.environ.setdefault("ICM_RAY_DASHBOARD", "0")   # drivers the tests start keep Ray's dashboard off


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

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.2",
             runtime_env={"env_vars": {"ICM_DATA_DIR": str(data_root)}})
    yield ray
    ray.shutdown()
