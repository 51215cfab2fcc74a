"""The cluster route: launcher YAMLs pass Ray's own validation, KubeRay manifests carry the fields
KubeRay needs, and a real two-node cluster on loopback runs a submitted MAA job — also when the
worker node's raylet is killed mid-job — and `down` leaves no process behind."""

import copy
import json
import os
import re
import signal
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from icm.data import comparable

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_yamls_pass_ray_validation(name):
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((CLUSTER / name).read_text())
    validate_config(prepare_config(copy.deepcopy(cfg)))
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    assert any(t.get("max_workers", 0) > 0 for k, t in types.items() if k != cfg["head_node_type"])
    broken = copy.deepcopy(cfg)
    broken["available_node_types"]["gpu_worker"]["bogus"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_dockerfile_uses_the_pinned_ray_gpu_image():
    import ray

    first = next(line for line in (CLUSTER / "Dockerfile").read_text().splitlines() if line.startswith("FROM"))
    assert first.startswith(f"FROM rayproject/ray:{ray.__version__}-") and first.endswith("-gpu")


def _containers(pod_template):
    containers = pod_template["spec"]["containers"]
    assert containers and all(c.get("name") and c.get("image") for c in containers)
    return containers


def _check_cluster_spec(spec):
    import ray

    assert spec["rayVersion"] == ray.__version__
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    _containers(head["template"])
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        gpu = [c for c in _containers(group["template"]) if "nvidia.com/gpu" in c["resources"]["limits"]]
        assert gpu


def test_kuberay_manifests_have_the_required_fields():
    cluster = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster" and cluster["metadata"]["name"]
    _check_cluster_spec(cluster["spec"])
    job = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert "pipelines/maa_augment.py" in spec["entrypoint"] and spec["shutdownAfterJobFinishes"] is True
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    _check_cluster_spec(spec["rayClusterSpec"])


def test_runtime_env_leaves_data_outputs_and_venv_behind():
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    for path in (".venv/", "outputs/", ".git/", "data/"):
        assert path in env["excludes"]
    assert set(env) <= {"excludes", "env_vars", "pip", "py_modules", "working_dir", "config"}


# --- the real two-node cluster -------------------------------------------------------------

HEAD_IP, WORKER_IP, GCS_PORT, DASHBOARD_PORT = "127.0.0.2", "127.0.0.3", 6391, 8276
N_IMAGES = 16


def _env(state):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(ICM_LOCAL_CLUSTER_DIR=str(state), ICM_GCS_PORT=str(GCS_PORT), ICM_DASHBOARD_PORT=str(DASHBOARD_PORT),
               ICM_HEAD_CPUS="1", ICM_WORKER_CPUS="1", RAY_AUTH_MODE="token",
               PATH=f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}")
    return env


def _local(action, state):
    return subprocess.run([str(CLUSTER / "local.sh"), action], env=_env(state), capture_output=True, text=True,
                          timeout=180)


def _submit(state, config, wait=True):
    cmd = ["ray", "job", "submit", "--address", f"http://{HEAD_IP}:{DASHBOARD_PORT}", "--working-dir", str(REPO),
           "--runtime-env", str(CLUSTER / "runtime_env.yaml")]
    cmd += [] if wait else ["--no-wait"]
    cmd += ["--", "python", "pipelines/maa_augment.py", "--config", str(config)]
    return subprocess.run(cmd, env=_env(state), capture_output=True, text=True, timeout=300, cwd=REPO)


def _job_id(submitted):
    return re.search(r"raysubmit_\w+", submitted.stdout + submitted.stderr).group(0)


def _job_status(state, job_id):
    out = subprocess.run(["ray", "job", "status", "--address", f"http://{HEAD_IP}:{DASHBOARD_PORT}", job_id],
                         env=_env(state), capture_output=True, text=True, timeout=60)
    text = (out.stdout + out.stderr).lower()
    return next((s for s in ("succeeded", "failed", "stopped") if f"' {s}" in text), "running")


def _maa_config(path, out_dir, images):
    cfg = {"method": "aafg", "dataset": {"type": "folder", "root": str(images), "name": "img"}, "out_dir": str(out_dir),
           "canvas": 64, "steps": 6, "alpha": "2/255", "bound": {"type": "linf", "eps": "8/255"}, "batch_size": 1,
           "seed": 0, "device": "cpu", "figure_images": 0,
           "detectors": [{"label": "y", "name": "yolov8n", "weights": "random:1", "classes": ["a", "b"]}],
           "workers": {"actors": 2, "num_cpus": 1}}
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory):
    import numpy as np
    from PIL import Image

    state = Path(tempfile.mkdtemp(prefix="icm-c", dir="/tmp"))   # Ray's socket paths must stay < 108 bytes
    images = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):   # enough units that both actors get some, however fast one starts
        Image.fromarray(rng.integers(0, 256, (56, 64, 3), dtype=np.uint8)).save(images / f"im{i}.png")
    up = _local("up", state)
    assert up.returncode == 0, up.stdout + up.stderr
    yield state, images
    down = _local("down", state)
    assert down.returncode == 0, down.stdout + down.stderr
    left = subprocess.run(["pgrep", "-f", str(state)], capture_output=True, text=True).stdout.split()
    assert left == [], f"Ray processes left behind: {left}"
    shutil.rmtree(state, ignore_errors=True)


def _node_ids(state):
    code = ("import json, ray; ray.init(address='%s:%d', logging_level='ERROR', log_to_driver=False); "
            "print(json.dumps({n['NodeManagerAddress']: n['NodeID'] for n in ray.nodes()}))" % (HEAD_IP, GCS_PORT))
    out = subprocess.run([sys.executable, "-c", code], env=_env(state), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3-compatible server on loopback, with a bucket."""
    import socket

    import pyarrow.fs as pafs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            break
        except OSError:
            assert time.time() < deadline, "moto server did not start"
            time.sleep(0.2)
    pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], access_key="test", secret_key="test",
                      region="us-east-1", allow_bucket_creation=True).create_dir("icm")
    yield env
    proc.terminate()
    proc.wait(10)


@pytest.mark.slow
def test_outputs_and_staged_weights_on_s3(local_cluster, s3_server, tmp_path, monkeypatch):
    import torch

    from icm.data.storage import Storage
    from icm.zoo import build_detector
    from icm.zoo.weights import sha256_file

    state, images = local_cluster
    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    local_weights = tmp_path / "weights"
    (local_weights / "trained").mkdir(parents=True)
    det = build_detector("centernet_resnet18", ["a", "b"], weights="random:4")
    torch.save(det.state_dict(), local_weights / "trained" / "s3-cn.pth")
    staged = subprocess.run([sys.executable, "-m", "icm.zoo.stage", "trained:s3-cn", "--to", "s3://icm/weights"],
                            env={**os.environ, "ICM_WEIGHTS_DIR": str(local_weights)}, capture_output=True,
                            text=True, timeout=120, cwd=REPO)
    assert staged.returncode == 0, staged.stderr
    cache = tmp_path / "node-cache"
    env_file = tmp_path / "runtime_env.yaml"
    runtime_env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    runtime_env["env_vars"].update(s3_server, ICM_WEIGHTS_DIR="s3://icm/weights", ICM_WEIGHTS_CACHE=str(cache))
    env_file.write_text(yaml.safe_dump(runtime_env))
    config = _maa_config(tmp_path / "s3.yaml", "s3://icm/outputs/maa", images)
    cfg = yaml.safe_load(config.read_text())
    cfg["detectors"] = [{"label": "cn", "name": "centernet_resnet18", "weights": "trained:s3-cn", "classes": ["a", "b"]}]
    config.write_text(yaml.safe_dump(cfg))
    for attempt in ("first", "rerun"):
        done = subprocess.run(
            ["ray", "job", "submit", "--address", f"http://{HEAD_IP}:{DASHBOARD_PORT}", "--working-dir", str(REPO),
             "--runtime-env", str(env_file), "--", "python", "pipelines/maa_augment.py", "--config", str(config)],
            env=_env(state), capture_output=True, text=True, timeout=300, cwd=REPO)
        assert done.returncode == 0 and _job_status(state, _job_id(done)) == "succeeded", done.stdout[-2000:]
    out = Storage("s3://icm/outputs/maa")
    manifest = out.read_table("manifest.parquet").to_pylist()
    assert len(manifest) == N_IMAGES and all(r["status"] == "ok" for r in manifest)
    assert sorted(r["output_path"].rsplit("/", 1)[-1] for r in manifest) == \
        sorted(p.name for p in images.glob("*.png"))
    assert all(out.exists(r["output_path"]) for r in manifest)
    assert json.loads(manifest[0]["models"])[0]["sha256"] == sha256_file(local_weights / "trained" / "s3-cn.pth")
    assert (cache / "trained" / "s3-cn.pth").is_file()        # copied from the shared store, not downloaded
    assert "0 to run" in done.stdout + done.stderr             # the rerun found every unit done on s3
    assert json.loads(out.read_text("summary.json"))["images"]["skipped"] == N_IMAGES


# Last in the module: it kills the shared cluster's worker node.
@pytest.mark.slow
def test_job_submission_runs_on_both_nodes_and_survives_a_dead_worker_node(local_cluster, tmp_path):
    state, images = local_cluster
    nodes = _node_ids(state)
    ref_out = tmp_path / "ref"
    done = _submit(state, _maa_config(tmp_path / "ref.yaml", ref_out, images))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert _job_status(state, _job_id(done)) == "succeeded"
    manifest = pq.read_table(ref_out / "manifest.parquet").to_pylist()
    assert len(manifest) == N_IMAGES and all(r["status"] == "ok" for r in manifest)
    assert all((ref_out / r["output_path"]).is_file() for r in manifest)
    assert {r["node_id"] for r in manifest} == {nodes[HEAD_IP], nodes[WORKER_IP]}   # work ran on both nodes

    out = tmp_path / "killed"
    started = _submit(state, _maa_config(tmp_path / "killed.yaml", out, images), wait=False)
    assert started.returncode == 0, started.stderr
    job_id = _job_id(started)
    raylet = int((state / "worker.raylet.pid").read_text())
    deadline = time.time() + 120
    while time.time() < deadline:   # kill the worker node once it has finished a unit, mid-job
        shards = [pq.read_table(p).to_pylist()[0] for p in (out / "manifest").glob("unit-*.parquet")] \
            if (out / "manifest").is_dir() else []
        if any(s["node_id"] == nodes[WORKER_IP] for s in shards) and len(shards) < N_IMAGES:
            break
        time.sleep(0.5)
    assert any(s["node_id"] == nodes[WORKER_IP] for s in shards) and len(shards) < N_IMAGES, "no mid-job moment"
    os.kill(raylet, signal.SIGKILL)
    deadline = time.time() + 240
    while time.time() < deadline and _job_status(state, job_id) == "running":
        time.sleep(2)
    assert _job_status(state, job_id) == "succeeded"
    assert comparable(out / "manifest.parquet").equals(comparable(ref_out / "manifest.parquet"))
    for r in manifest:
        assert (out / r["output_path"]).read_bytes() == (ref_out / r["output_path"]).read_bytes()
