"""The cluster route as a user's cluster runs it: launcher YAMLs pass Ray's own validation and
declare their resources, KubeRay manifests validate against the pinned ray.io/v1 CRD schemas, the
upload set is computed with Ray's own matcher, the image builds where a Docker daemon exists, and
a real two-node cluster on loopback runs submitted MAA jobs — from code the job itself checks came
from the upload, on data, weights and outputs in S3, and when the worker node's raylet is killed
mid-job — and `down` leaves no process and no changed ~/.ray/auth_token behind."""

import copy
import hashlib
import io
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
def test_launcher_yamls_pass_ray_validation_and_declare_resources(name):
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((CLUSTER / name).read_text())
    validate_config(prepare_config(copy.deepcopy(cfg)))
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    workers = {k: t for k, t in types.items() if k != cfg["head_node_type"]}
    assert sum(t["max_workers"] for t in workers.values()) <= cfg["max_workers"]
    for key, t in workers.items():   # GCP's provider detects nothing: every type says what it has
        node = t["node_config"]
        gpus = (node.get("guestAccelerators") or [{}])[0].get("acceleratorCount") or (
            1 if node.get("InstanceType", "").startswith(("g5.", "g6.")) else 0)
        assert gpus and t["resources"].get("GPU") == gpus and t["resources"].get("CPU", 0) > 0, key
        # workers write to the bucket: each has its own cloud identity
        assert node.get("IamInstanceProfile") or node.get("serviceAccounts"), key
        assert "latest_dlami" not in str(node)          # Ray's latest_dlami ships a driver too old for CUDA 12.8
    assert any("InstanceMarketOptions" in t["node_config"] or t["node_config"].get("scheduling", {}).get(
        "preemptible") for t in workers.values())
    assert any(not ("InstanceMarketOptions" in t["node_config"] or t["node_config"].get("scheduling", {}).get(
        "preemptible")) for t in workers.values()), "no on-demand group to fall back on"
    assert not cfg["docker"]["image"].endswith(":latest")
    assert any("docker login" in c or "configure-docker" in c for c in cfg["initialization_commands"])
    # token auth in the container's environment, so `ray exec <yaml> 'ray status'` authenticates too
    assert "--env RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    assert cfg["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    broken = copy.deepcopy(cfg)
    broken["available_node_types"][next(iter(workers))]["bogus"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_dockerfile_builds_a_cuda_matched_image():
    import ray

    text = (CLUSTER / "Dockerfile").read_text()
    assert f"ARG RAY_VERSION={ray.__version__}" in text and "FROM rayproject/ray:${RAY_VERSION}-py311-${CUDA}" in text
    assert "libgl1" in text and "libglib2.0-0" in text              # import ultralytics needs them
    assert "download.pytorch.org/whl/${CUDA}" in text                # torch built for the base image's CUDA
    assert text.index("COPY --chown=ray:users pyproject.toml") < text.index("COPY --chown=ray:users icm")
    # the project dir is ray's whichever builder runs (the classic one makes a WORKDIR root's)
    assert text.index("chown ray:users /home/ray/icm-ray") < text.index("\nUSER ray") < text.index("\nWORKDIR ")
    ignore = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert ignore[0] == "**" and ".venv" not in " ".join(ignore[1:])
    for code in ("icm", "pipelines", "tuning"):                      # image-only RayJobs run pipelines and sweeps
        assert f"!{code}/" in ignore and f"COPY --chown=ray:users {code} ./{code}" in text
    if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True).returncode:
        pytest.skip("no Docker daemon on this machine: the image build itself is not exercised here")
    built = subprocess.run(["docker", "build", "-f", str(CLUSTER / "Dockerfile"), "-t", "icm-ray:test", str(REPO)],
                           capture_output=True, text=True, timeout=3600)
    assert built.returncode == 0, built.stderr[-3000:]
    ran = subprocess.run(["docker", "run", "--rm", "icm-ray:test", "python", "-c",
                          "import icm.data, icm.jrd, ultralytics, compressai; print('ok')"], capture_output=True, text=True)
    assert ran.stdout.strip().endswith("ok"), ran.stderr[-3000:]


def test_every_package_is_installed_by_a_regular_install():
    """A non-editable install (the image's) ships only what setuptools finds: a folder of icm
    without __init__.py would be missing on every node."""
    from setuptools import find_packages

    found = set(find_packages(str(REPO), include=["icm*"]))
    folders = {p.parent.relative_to(REPO).as_posix().replace("/", ".") for p in (REPO / "icm").rglob("*.py")}
    assert folders <= found, folders - found


def test_an_actor_given_gpus_that_cannot_use_cuda_fails_at_start(monkeypatch):
    import torch

    import icm.data.ray_io
    from icm.maa.stage import resolve_device

    monkeypatch.setattr(icm.data.ray_io, "assigned_gpu_ids", lambda: ["0"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="holds GPU.*driver"):
        resolve_device("auto")
    monkeypatch.setattr(icm.data.ray_io, "assigned_gpu_ids", lambda: [])
    assert resolve_device("auto").type == "cpu"


def _crd_schemas():
    """The ray.io/v1 openAPIV3Schemas of KubeRay v1.7.0's RayCluster and RayJob CRDs (vendored in
    tests/kuberay/; regenerate from ray-operator/config/crd/bases/ray.io_{rayclusters,rayjobs}.yaml
    keeping the v1 schema without descriptions). Unknown fields are made errors, as kubectl's
    strict field validation makes them."""
    import gzip

    def strict(node):
        if isinstance(node, dict):
            node = {k: strict(v) for k, v in node.items()}
            if "properties" in node and "additionalProperties" not in node and \
                    not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
        elif isinstance(node, list):
            node = [strict(v) for v in node]
        return node
    schemas = json.loads(gzip.decompress((REPO / "tests/kuberay/crd-schemas-v1.7.0.json.gz").read_bytes()))
    return {kind: strict(schema) for kind, schema in schemas.items() if kind != "source"}


def _pod_specs(cluster_spec):
    yield "head", cluster_spec["headGroupSpec"]["template"]["spec"]
    for group in cluster_spec["workerGroupSpecs"]:
        yield group["groupName"], group["template"]["spec"]


def test_kuberay_manifests_validate_against_the_crds():
    import jsonschema
    import ray

    schemas = _crd_schemas()
    cluster = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    job = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    for manifest in (cluster, job):
        jsonschema.validate(manifest, schemas[manifest["kind"]])
    broken = copy.deepcopy(cluster)
    broken["spec"]["workerGroupSpecs"][0]["replica"] = 3            # a typo kubectl would reject
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schemas["RayCluster"])

    spec = job["spec"]
    assert "pipelines/maa_augment.py" in spec["entrypoint"] and "out_dir=s3://" in spec["entrypoint"]
    assert "dataset.root=s3://" in spec["entrypoint"] and spec["shutdownAfterJobFinishes"] is True
    assert spec["backoffLimit"] == 0             # a config error must not boot a second GPU cluster
    assert spec["ttlSecondsAfterFinished"] <= 60  # the finished job's GPU pods go within a minute
    for cluster_spec in (cluster["spec"], spec["rayClusterSpec"]):
        assert cluster_spec["rayVersion"] == ray.__version__
        # KubeRay gives the token to the autoscaler, the submitter and its own client only through
        # authOptions; a hand-written RAY_AUTH_* entry would even stop it injecting its own
        assert cluster_spec["authOptions"] == {"mode": "token", "secretName": "icm-ray-token"}
        for name, pod in _pod_specs(cluster_spec):
            assert pod["serviceAccountName"], name                    # pods reach the bucket and registry
            mounts = {m["mountPath"]: m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
            shm = next(v["emptyDir"] for v in pod["volumes"] if v["name"] == mounts["/dev/shm"])
            memory = int(pod["containers"][0]["resources"]["limits"]["memory"].rstrip("Gi"))
            # Ray's object store defaults to 30 % of the memory, in /dev/shm
            assert shm["medium"] == "Memory" and int(shm["sizeLimit"].rstrip("Gi")) >= max(6, 0.3 * memory), name
            for c in pod["containers"]:
                assert not c["image"].endswith(":latest")
                assert not [e for e in c.get("env", []) if e["name"].startswith("RAY_AUTH")], (name, c["env"])
            if name != "head":
                res = pod["containers"][0]["resources"]
                assert res["limits"]["nvidia.com/gpu"] == "1"
                # fits the 8-vCPU / 32 GiB GPU nodes the docs name, after the kubelet's share
                assert int(res["requests"]["cpu"]) < 8 and int(res["requests"]["memory"].rstrip("Gi")) < 32
                assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])


def _upload_set(root: Path, excludes: list[str]) -> set[str]:
    """The files ``ray job submit --working-dir`` uploads, computed with Ray's own matcher."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    files = set()
    _dir_travel(root, [_get_excludes(root, excludes)],
                lambda p: files.add(p.relative_to(root).as_posix()) if p.is_file() else None, include_gitignore=True)
    return files


def test_runtime_env_uploads_the_code_and_leaves_data_outputs_and_venv_behind(tmp_path):
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert set(env) <= {"excludes", "env_vars", "pip", "py_modules", "working_dir", "config"}
    tree = tmp_path / "checkout"
    shutil.copytree(REPO, tree, ignore=shutil.ignore_patterns(".venv", ".git", "outputs"))
    for junk in (".venv/lib/x.py", "outputs/demo/a.png", "data/coco/x.jpg", "weights/w.pth", ".git/HEAD",
                 "icm/data/__pycache__/readers.cpython-311.pyc", "runs/detect/train/weights/last.pt",
                 "w.ckpt", "w.safetensors", "yolo.onnx", "pipelines/cache.npz"):
        (tree / junk).parent.mkdir(parents=True, exist_ok=True)
        (tree / junk).write_text("x")
    uploaded = _upload_set(tree, env["excludes"])
    sources = {p.relative_to(tree).as_posix() for d in ("icm", "pipelines") for p in (tree / d).rglob("*")
               if p.is_file() and p.suffix in (".py", ".yaml")}
    assert sources and sources <= uploaded, sorted(sources - uploaded)[:10]
    assert any(p.startswith("icm/data/") for p in uploaded)
    left = {".venv/", "outputs/", "data/", "weights/", ".git/", "tests/", "bench/", "runs/"}
    assert not [p for p in uploaded if any(p.startswith(d) for d in left) or "__pycache__" in p
                or p.endswith((".ckpt", ".safetensors", ".onnx", ".npz"))]
    assert not _upload_set(tree, ["data/"]) >= sources, "an unanchored data/ should have dropped icm/data"


def test_a_node_cache_follows_weights_staged_again_under_the_same_name(tmp_path, monkeypatch):
    """A long-lived node keeps its cached copy only while it matches the shared store: staging a
    file again (a retrained trained:<label>, a replaced staged:<file>) reaches it by sha256, and a
    file staged without a .sha256 (by hand) by its size and modification time."""
    from icm.data.storage import Storage
    from icm.zoo.stage import stage
    from icm.zoo.weights import WeightsUnavailable, resolve

    shared = f"file://{tmp_path / 'shared'}"
    monkeypatch.setenv("ICM_WEIGHTS_DIR", shared)
    monkeypatch.setenv("ICM_WEIGHTS_CACHE", str(tmp_path / "node"))
    local = tmp_path / "w.pth"
    seen = []
    for content in (b"first weights", b"other weights"):      # the same size: only the digest tells
        local.write_bytes(content)
        _, digest = stage(str(local), shared)
        resolved = resolve("staged:w.pth")
        assert resolved.sha256 == digest and resolved.path.read_bytes() == content
        assert resolved.path.is_relative_to(tmp_path / "node")
        seen.append(digest)
    assert seen[0] != seen[1]
    store = Storage(shared)
    for content in (b"retrained v1", b"retrained v2"):        # published by a training job elsewhere
        store.write_bytes("trained/lbl.pth", content)
        store.write_text("trained/lbl.pth.sha256", hashlib.sha256(content).hexdigest())
        assert resolve("trained:lbl").path.read_bytes() == content
    for content in (b"by hand 1", b"by hand 2"):              # no .sha256 beside it
        store.write_bytes("hand.pth", content)
        time.sleep(0.01)
        assert resolve("staged:hand.pth").path.read_bytes() == content
    store.write_text("w.pth.sha256", "0" * 64)                  # a digest the file does not have
    with pytest.raises(WeightsUnavailable, match="do not match their .sha256"):
        resolve("staged:w.pth")


# --- the real two-node cluster -------------------------------------------------------------

HEAD_IP, WORKER_IP, GCS_PORT, DASHBOARD_PORT = "127.0.0.2", "127.0.0.3", 6391, 8276
N_IMAGES = 16
JOB_TIMEOUT_S = 900   # a deadline, not a speed check: a job takes ~1 min here, many on a loaded 2-core machine


def _env(state):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(ICM_LOCAL_CLUSTER_DIR=str(state), ICM_GCS_PORT=str(GCS_PORT), ICM_DASHBOARD_PORT=str(DASHBOARD_PORT),
               ICM_HEAD_AGENT_PORT="52376", ICM_WORKER_AGENT_PORT="52386",
               ICM_HEAD_CPUS="1", ICM_WORKER_CPUS="1", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN_PATH=str(state / "auth_token"),
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
    return subprocess.run(cmd, env=_env(state), capture_output=True, text=True, timeout=JOB_TIMEOUT_S, cwd=REPO)


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
    user_token = Path.home() / ".ray" / "auth_token"
    token_before = user_token.read_bytes() if user_token.exists() else None
    up = _local("up", state)
    assert up.returncode == 0, up.stdout + up.stderr
    yield state, images
    down = _local("down", state)
    assert down.returncode == 0, down.stdout + down.stderr
    left = subprocess.run(["pgrep", "-f", str(state)], capture_output=True, text=True).stdout.split()
    assert left == [], f"Ray processes left behind: {left}"
    assert (user_token.read_bytes() if user_token.exists() else None) == token_before, "~/.ray/auth_token changed"
    shutil.rmtree(state, ignore_errors=True)


def _node_ids(state):
    code = ("import json, ray; ray.init(address='%s:%d', logging_level='ERROR', log_to_driver=False); "
            "print(json.dumps({n['NodeManagerAddress']: n['NodeID'] for n in ray.nodes()}))" % (HEAD_IP, GCS_PORT))
    out = subprocess.run([sys.executable, "-c", code], env=_env(state), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on loopback behind tests/s3_fake.py's proxy (request log, faults), with a bucket."""
    from s3_fake import FakeS3

    with FakeS3() as s3:
        yield s3


@pytest.mark.slow
def test_dataset_weights_and_outputs_on_s3(local_cluster, s3_server, tmp_path, monkeypatch):
    import torch

    from icm.data.storage import Storage
    from icm.zoo import build_detector
    from icm.zoo.weights import sha256_file

    state, images = local_cluster
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    # the dataset goes to the bucket as cluster/README.md says (an export job), and lives nowhere else
    exported = subprocess.run([sys.executable, "pipelines/export_dataset.py", "--config", "pipelines/configs/export.yaml",
                               f"dataset={{type: folder, root: {images}, name: img}}", "out_dir=s3://icm/datasets/img",
                               "workers.actors=1", "ray.num_cpus=1"],
                              capture_output=True, text=True, timeout=JOB_TIMEOUT_S, cwd=REPO,
                              env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert exported.returncode == 0, exported.stdout[-2000:] + exported.stderr[-2000:]
    det = build_detector("centernet_resnet18", ["a", "b"], weights="random:4")
    torch.save(det.state_dict(), tmp_path / "s3-cn.pth")
    staged = subprocess.run([sys.executable, "-m", "icm.zoo.stage", str(tmp_path / "s3-cn.pth"), "--to",
                             "s3://icm/weights"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert staged.returncode == 0 and "weights: staged:s3-cn.pth" in staged.stdout, staged.stderr
    cache = tmp_path / "node-cache"
    env_file = tmp_path / "runtime_env.yaml"
    runtime_env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    runtime_env["env_vars"].update(s3_server.env, ICM_WEIGHTS_DIR="s3://icm/weights", ICM_WEIGHTS_CACHE=str(cache))
    env_file.write_text(yaml.safe_dump(runtime_env))
    config = _maa_config(tmp_path / "s3.yaml", "s3://icm/outputs/maa", images)
    cfg = yaml.safe_load(config.read_text())
    cfg["dataset"] = {"type": "manifest", "manifest": "s3://icm/datasets/img/manifest.parquet", "classes": ["a", "b"]}
    cfg["detectors"] = [{"label": "cn", "name": "centernet_resnet18", "weights": "staged:s3-cn.pth", "classes": ["a", "b"]}]
    config.write_text(yaml.safe_dump(cfg))
    for attempt in ("first", "rerun"):
        done = subprocess.run(
            ["ray", "job", "submit", "--address", f"http://{HEAD_IP}:{DASHBOARD_PORT}", "--working-dir", str(REPO),
             "--runtime-env", str(env_file), "--", "python", "pipelines/maa_augment.py", "--config", str(config)],
            env=_env(state), capture_output=True, text=True, timeout=JOB_TIMEOUT_S, cwd=REPO)
        assert done.returncode == 0 and _job_status(state, _job_id(done)) == "succeeded", done.stdout[-2000:]
    out = Storage("s3://icm/outputs/maa")
    manifest = out.read_table("manifest.parquet").to_pylist()
    assert len(manifest) == N_IMAGES and all(r["status"] == "ok" for r in manifest)
    assert sorted(r["source_path"] for r in manifest) == sorted(f"s3://icm/datasets/img/images/img/{p.name}.png"
                                                                 for p in images.glob("*.png"))
    assert all(out.exists(r["output_path"]) for r in manifest)
    assert json.loads(manifest[0]["models"])[0]["sha256"] == sha256_file(tmp_path / "s3-cn.pth")
    assert (cache / "s3-cn.pth").is_file()                     # copied from the shared store, not downloaded
    assert f"{N_IMAGES} already done, 0 unit(s) to run" in done.stdout + done.stderr   # the rerun found all done on s3
    assert json.loads(out.read_text("summary.json"))["images"]["skipped"] == N_IMAGES
    assert not [k for k in s3_server.keys() if k.endswith("/")]   # no directory markers: a scoped role may write


def _maa_on_s3(config, env, out_dir):
    cfg = yaml.safe_load(config.read_text())
    cfg.update(out_dir=out_dir, workers={"actors": 1, "num_cpus": 1}, ray={"num_cpus": 2}, steps=2)
    config.write_text(yaml.safe_dump(cfg))
    return subprocess.run([sys.executable, "pipelines/maa_augment.py", "--config", str(config)], cwd=REPO,
                          env={**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **env},
                          capture_output=True, text=True, timeout=JOB_TIMEOUT_S)


@pytest.mark.slow
def test_storage_faults_fail_units_and_a_rerun_processes_exactly_those_images(s3_server, tmp_path, monkeypatch):
    """403 (a missing grant) and 503 (SlowDown, lasting) on reads of two images: the MAA job exits
    non-zero, its manifest holds no row for them (not an error row: a rerun would skip them), a
    brief 503 on a third is absorbed by the client's retries; with the faults gone, the rerun
    processes exactly those two, and everything is byte-identical to a run that saw no fault."""
    import numpy as np
    from PIL import Image

    from icm.data.storage import Storage

    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    data = Storage("s3://icm/faults/images")
    rng = np.random.default_rng(3)
    for i in range(6):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (56, 64, 3), dtype=np.uint8)).save(buf, "PNG")
        data.write_bytes(f"im{i}.png", buf.getvalue())
    config = _maa_config(tmp_path / "maa.yaml", "", "s3://icm/faults/images")
    clean = _maa_on_s3(config, s3_server.env, "s3://icm/faults/clean")
    assert clean.returncode == 0, clean.stdout[-3000:] + clean.stderr[-3000:]

    s3_server.faults([{"path": r"/faults/images/im1\.png$", "status": 403},
                      {"path": r"/faults/images/im3\.png$", "status": 503},
                      {"path": r"/faults/images/im4\.png$", "status": 503, "times": 2}])
    faulted = _maa_on_s3(config, s3_server.env, "s3://icm/faults/run")
    s3_server.faults([])
    assert faulted.returncode != 0 and "2 unit(s) failed as a whole" in faulted.stderr, faulted.stderr[-3000:]
    out = Storage("s3://icm/faults/run")
    summary = json.loads(out.read_text("summary.json"))
    assert summary["images"] == {"done": 4, "failed": 0, "skipped": 0, "not_run": 2}
    assert all("StorageUnavailable" in u["reason"] for u in summary["failed_units"])
    rows = out.read_table("manifest.parquet").to_pylist()
    assert sorted(r["source_id"] for r in rows) == [f"img/im{i}.png" for i in (0, 2, 4, 5)]
    assert all(r["status"] == "ok" for r in rows)

    rerun = _maa_on_s3(config, s3_server.env, "s3://icm/faults/run")
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert json.loads(out.read_text("summary.json"))["images"] == {"done": 2, "failed": 0, "skipped": 4, "not_run": 0}
    ref = Storage("s3://icm/faults/clean")
    assert comparable(out.read_table("manifest.parquet")).equals(comparable(ref.read_table("manifest.parquet")))
    for r in ref.read_table("manifest.parquet").to_pylist():
        assert out.read_bytes(r["output_path"]) == ref.read_bytes(r["output_path"]), r["source_id"]
    assert not [k for k in s3_server.keys() if k.endswith("/")]


# Last in the module: it kills the shared cluster's worker node.
@pytest.mark.slow
def test_job_submission_runs_on_both_nodes_and_survives_a_dead_worker_node(local_cluster, tmp_path):
    state, images = local_cluster
    nodes = _node_ids(state)
    ref_out = tmp_path / "ref"
    done = _submit(state, _maa_config(tmp_path / "ref.yaml", ref_out, images))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert _job_status(state, _job_id(done)) == "succeeded"
    # the job itself checked that the driver and both nodes run the uploaded code, not this checkout
    assert "imported from the uploaded working dir by the driver and on 2 node(s)" in done.stdout + done.stderr
    manifest = pq.read_table(ref_out / "manifest.parquet").to_pylist()
    assert len(manifest) == N_IMAGES and all(r["status"] == "ok" for r in manifest)
    assert all((ref_out / r["output_path"]).is_file() for r in manifest)
    assert {r["node_id"] for r in manifest} == {nodes[HEAD_IP], nodes[WORKER_IP]}   # work ran on both nodes

    out = tmp_path / "killed"
    started = _submit(state, _maa_config(tmp_path / "killed.yaml", out, images), wait=False)
    assert started.returncode == 0, started.stderr
    job_id = _job_id(started)
    raylet = int((state / "worker.raylet.pid").read_text())
    deadline = time.time() + JOB_TIMEOUT_S
    while time.time() < deadline:   # kill the worker node once it has finished a unit, mid-job
        shards = [pq.read_table(p).to_pylist()[0] for p in (out / "manifest").glob("unit-*.parquet")] \
            if (out / "manifest").is_dir() else []
        if any(s["node_id"] == nodes[WORKER_IP] for s in shards) and len(shards) < N_IMAGES:
            break
        time.sleep(0.5)
    assert any(s["node_id"] == nodes[WORKER_IP] for s in shards) and len(shards) < N_IMAGES, "no mid-job moment"
    os.kill(raylet, signal.SIGKILL)
    deadline = time.time() + JOB_TIMEOUT_S
    while time.time() < deadline and _job_status(state, job_id) == "running":
        time.sleep(2)
    assert _job_status(state, job_id) == "succeeded"
    assert comparable(out / "manifest.parquet").equals(comparable(ref_out / "manifest.parquet"))
    for r in manifest:
        assert (out / r["output_path"]).read_bytes() == (ref_out / r["output_path"]).read_bytes()
