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
os.environ.setdefault("ICM_RAY_DASHBOARD", "0")   # drivers the tests start keep Ray's dashboard off

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


def registered_checkpoint(run_dir) -> dict | None:
    """The metrics of the latest checkpoint Ray Train has registered for the run stored at
    ``run_dir`` (its checkpoint manager's snapshot), None before the first."""
    import json

    snapshot = Path(run_dir) / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    except (FileNotFoundError, ValueError):   # not yet written, or caught mid-write
        return None
    return latest["metrics"] if latest else None


@pytest.fixture
def preempted(ray_cluster, tmp_path):
    """``preempted(script, config, run_dir)``: run a pipeline driver in a process of its own,
    attached to the test cluster, and SIGKILL it once its Ray Train run (stored at ``run_dir``)
    has registered a checkpoint — a preempted job. Waits until the job's train workers are gone
    and returns that checkpoint's metrics."""
    import signal
    import subprocess
    import time

    import psutil
    import yaml

    address = ray_cluster.get_runtime_context().gcs_address

    def train_processes():
        found = []
        for p in psutil.Process().children(recursive=True):
            try:
                if p.status() != psutil.STATUS_ZOMBIE and any(n in " ".join(p.cmdline())
                                                              for n in ("RayTrainWorker", "TrainController")):
                    found.append(p.pid)
            except psutil.Error:   # gone meanwhile
                pass
        return found

    def run(script: str, config: dict, run_dir, timeout: float = 900) -> dict:
        before = set(train_processes())
        path = tmp_path / f"preempted-{Path(script).stem}.yaml"
        path.write_text(yaml.safe_dump(config))
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        proc = subprocess.Popen([sys.executable, script, "--config", str(path), "--address", address], cwd=REPO,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        deadline = time.time() + timeout
        checkpoint = None
        while time.time() < deadline and proc.poll() is None and checkpoint is None:
            checkpoint = registered_checkpoint(run_dir)
            time.sleep(0.2)
        finished = proc.poll() is not None
        os.killpg(proc.pid, signal.SIGKILL)
        log = proc.communicate(timeout=60)[0]
        assert checkpoint is not None and not finished, f"{script} ended before its first checkpoint:\n{log[-4000:]}"
        deadline = time.time() + 120      # Ray ends a dead driver's actors: none may write to the run any more
        while time.time() < deadline and set(train_processes()) - before:
            time.sleep(0.5)
        return registered_checkpoint(run_dir)      # the latest the run registered

    return run
