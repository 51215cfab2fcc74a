"""Weights specs: ``random[:seed]``, a local path, a URL, or a hub name resolved to a URL.

* ``random`` / ``random:<seed>`` — initialise from a seeded RNG; provenance ``random:<seed>``.
* a local file (or ``file://...``) — loaded with ``torch.load(..., weights_only=True)``
  (ultralytics ``.pt`` through ultralytics' own safe loader); provenance is its sha256.
* ``http(s)://...`` — downloaded once into the weights cache (``$ICM_WEIGHTS_DIR``, default
  ``~/.cache/icm-ray/weights``).
* ``trained:<label>`` — weights produced by this project's own training jobs, looked up as
  ``$ICM_WEIGHTS_DIR/trained/<label>.{pt,pth}``.
* ``staged:<file name>`` — a file staged with ``python -m icm.zoo.stage``, looked up as
  ``$ICM_WEIGHTS_DIR/<file name>``.
* an object-store URI (``s3://bucket/weights/voc-frcnn.pth``, ``gs://…``) — copied once per node
  into the node cache; provenance is its sha256.
* a hub name such as ``torchvision:DEFAULT``, ``compressai:mse``, ``ultralytics:yolov8n.pt`` or
  ``open_clip:openai`` — each family's builder turns it into a URL, then as above.

On a cluster, set ``$ICM_WEIGHTS_DIR`` to shared storage (``s3://bucket/weights``, ``gs://…``, or a
shared filesystem) and stage each file there once (``python -m icm.zoo.stage <spec> --to <dir>``):
a worker then copies it from the shared store into its node-local cache (``$ICM_WEIGHTS_CACHE``,
default ``~/.cache/icm-ray/weights``) the first time it needs it — 64 workers never each download
it from the internet, and a worker never uploads anything. Staging writes ``<file>.sha256`` beside
each file; a node compares it with its cached copy every time it resolves the spec, so a file
staged again under the same name (a retrained ``trained:<label>``) reaches long-lived nodes too.

An unreachable download fails at once with ``WeightsUnavailable``, naming the spec and how to pass
a local file. Nothing ever falls back to random weights silently.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

DOWNLOAD_TIMEOUT_S = float(os.environ.get("ICM_DOWNLOAD_TIMEOUT", "20"))


class WeightsUnavailable(RuntimeError):
    """Weights named by a spec cannot be had (no network, no such file, bad hub name)."""


@dataclass(frozen=True)
class ResolvedWeights:
    spec: str                 # as the user wrote it
    path: Path | None         # local file, None for random
    seed: int | None          # for random
    sha256: str               # of the file, or "random:<seed>"

    @property
    def is_random(self) -> bool:
        return self.path is None


def shared_weights_uri() -> str | None:
    """``$ICM_WEIGHTS_DIR`` when it names object storage (``s3://``, ``gs://``, …)."""
    value = os.environ.get("ICM_WEIGHTS_DIR") or ""
    return value if "://" in value else None


def weights_dir() -> Path:
    """The local weights directory: ``$ICM_WEIGHTS_DIR`` (a local or shared filesystem path), or,
    when that is an object-store URI, this node's cache (``$ICM_WEIGHTS_CACHE``)."""
    if shared_weights_uri():
        return Path(os.environ.get("ICM_WEIGHTS_CACHE") or Path.home() / ".cache" / "icm-ray" / "weights")
    return Path(os.environ.get("ICM_WEIGHTS_DIR") or Path.home() / ".cache" / "icm-ray" / "weights")


def _node_copy(location: str, dest: Path) -> Path | None:
    """The file at ``location`` (object storage) in this node's cache at ``dest``: copied the
    first time, and again whenever it was staged anew — the store's ``<file>.sha256`` differs from
    the cached copy's sha256 (a file staged without one: its size or modification time differs from
    those recorded at the copy). None when no file is at ``location``."""
    import pyarrow.fs as pafs

    from icm.data.storage import location_info, read_file

    try:
        info = location_info(location)
        if info.type != pafs.FileType.File:
            return None
        digest = (read_file(f"{location}.sha256") or b"").decode().strip()
        stamp = {"size": info.size, "mtime_ns": info.mtime_ns}
        record = dest.with_name(f"{dest.name}.source.json")
        if dest.is_file():
            if digest and sha256_file(dest) == digest:
                return dest
            if not digest and record.is_file() and json.loads(record.read_text()) == stamp:
                return dest
        data = read_file(location)
    except OSError as exc:
        raise WeightsUnavailable(f"cannot read weights {location}: {exc}; check the URI and the node's "
                                 "credentials") from exc
    if data is None or (digest and hashlib.sha256(data).hexdigest() != digest):
        raise WeightsUnavailable(f"weights {location} changed while being read, or do not match their .sha256 "
                                 "(being staged again?); rerun, or stage them again with python -m icm.zoo.stage")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=dest.parent, delete=False) as tmp:
        tmp.write(data)
    os.replace(tmp.name, dest)
    record.write_text(json.dumps(stamp))
    return dest


def from_shared(rel: str) -> Path | None:
    """``<$ICM_WEIGHTS_DIR>/<rel>`` from object storage in the node cache (copied once, and again
    when staged anew); None when there is no shared store or the file is not staged there."""
    uri = shared_weights_uri()
    if uri is None:
        return None
    from icm.data.storage import join_location

    return _node_copy(join_location(uri, rel), weights_dir() / rel)


def from_uri(uri: str) -> Path:
    """A weights file in object storage, in the node cache (copied once, and again when staged anew)."""
    dest = weights_dir() / "uri" / hashlib.sha1(uri.encode()).hexdigest()[:16] / uri.rstrip("/").rsplit("/", 1)[-1]
    path = _node_copy(uri, dest)
    if path is None:
        raise WeightsUnavailable(f"cannot read weights {uri}: no such file; check the URI")
    return path


def stage_digest(store, rel: str, data: bytes) -> None:
    """Write ``rel`` and then ``rel.sha256`` (which nodes compare their cached copy with) to ``store``."""
    store.write_bytes(rel, data)
    store.write_text(f"{rel}.sha256", hashlib.sha256(data).hexdigest())


def trained_dir() -> Path:
    return weights_dir() / "trained"


def publish_trained(label: str, data: bytes, suffix: str, info: dict) -> Path:
    """Put weights this project trained where ``trained:<label>`` finds them: this node's weights
    dir, and — when ``$ICM_WEIGHTS_DIR`` is object storage — the shared store too, so they outlive
    the node (an autoscaled worker, or a head that ``ray down`` deletes)."""
    import json

    dest = trained_dir() / f"{label}{suffix}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data)
    record = json.dumps(info, indent=2, default=str)
    dest.with_suffix(".json").write_text(record)
    uri = shared_weights_uri()
    if uri:
        from icm.data.storage import Storage

        store = Storage(uri)
        stage_digest(store, f"trained/{label}{suffix}", data)
        store.write_text(f"trained/{label}.json", record)
    return dest


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, spec: str, dest_dir: Path | None = None) -> Path:
    """Download ``url`` into the weights cache (once); fail fast with a helpful message."""
    dest_dir = dest_dir or weights_dir()
    dest = dest_dir / Path(urllib.request.urlparse(url).path).name
    if dest.is_file():
        return dest
    staged = from_shared(dest.name) if dest_dir == weights_dir() else None
    if staged is not None:
        return staged
    dest_dir.mkdir(parents=True, exist_ok=True)
    partial = None
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, \
                tempfile.NamedTemporaryFile(dir=dest_dir, delete=False) as tmp:
            partial = Path(tmp.name)
            shutil.copyfileobj(response, tmp)
            # http.client ends a body cut short by the server without an error
            size = response.headers.get("Content-Length")
            if size is not None and tmp.tell() != int(size):
                raise OSError(f"the connection closed after {tmp.tell()} of {size} bytes")
        os.replace(partial, dest)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        if partial is not None:
            partial.unlink(missing_ok=True)
        raise WeightsUnavailable(
            f"cannot download weights {spec!r} from {url}: {exc}. Without a network, download the "
            f"file elsewhere and pass its local path as the weights spec (or place it at {dest})."
        ) from exc
    return dest


def resolve(spec: str | None, hub: Callable[[str], str] | None = None, family: str = "") -> ResolvedWeights:
    """Turn a weights spec into a local file (downloading if needed) or a random seed."""
    spec = "random" if spec is None else str(spec)
    if spec == "random" or spec.startswith("random:"):
        seed_text = spec.partition(":")[2] or "0"
        try:
            seed = int(seed_text)
        except ValueError as exc:
            raise WeightsUnavailable(f"weights spec {spec!r}: seed {seed_text!r} is not an integer") from exc
        return ResolvedWeights(spec, None, seed, f"random:{seed}")
    local = Path(spec[len("file://"):] if spec.startswith("file://") else spec).expanduser()
    if local.is_file():
        return ResolvedWeights(spec, local, None, sha256_file(local))
    if spec.startswith("trained:"):
        label = spec.partition(":")[2]
        for suffix in (".pt", ".pth"):   # the shared store first: a copy cached here may be stale
            path = from_shared(f"trained/{label}{suffix}")
            if path is not None or (path := trained_dir() / f"{label}{suffix}").is_file():
                return ResolvedWeights(spec, path, None, sha256_file(path))
        where = f"{trained_dir()} or {shared_weights_uri()}/trained" if shared_weights_uri() else str(trained_dir())
        raise WeightsUnavailable(
            f"weights {spec!r}: no {label}.pt/.pth under {where}; train it first "
            "(python pipelines/train_detectors.py), stage it (python -m icm.zoo.stage), or pass a local file")
    if spec.startswith("staged:"):
        rel = spec.partition(":")[2]
        path = from_shared(rel)
        if path is not None or (path := weights_dir() / rel).is_file():
            return ResolvedWeights(spec, path, None, sha256_file(path))
        raise WeightsUnavailable(f"weights {spec!r}: {rel} is not under {shared_weights_uri() or weights_dir()}; "
                                 "stage it there with python -m icm.zoo.stage <file> --to <ICM_WEIGHTS_DIR>")
    if spec.startswith(("http://", "https://")):
        path = download(spec, spec)
        return ResolvedWeights(spec, path, None, sha256_file(path))
    if "://" in spec:
        path = from_uri(spec)
        return ResolvedWeights(spec, path, None, sha256_file(path))
    if ":" in spec and hub is not None and not spec.startswith(("/", ".")):
        url = hub(spec)
        path = download(url, spec)
        return ResolvedWeights(spec, path, None, sha256_file(path))
    raise WeightsUnavailable(
        f"weights spec {spec!r} for {family or 'this model'} is neither 'random[:seed]', an existing "
        f"file, a URL, nor a known hub name; check the path (relative paths are taken from {os.getcwd()})")


def weights_fingerprint(spec: str | None) -> str:
    """What a job records and compares to know which weights it used: the sha256 of the file a
    spec names (``random:<seed>`` for random weights). A hub name (``torchvision:DEFAULT``) is
    its own fingerprint: a published checkpoint does not change under its name."""
    spec = "random" if spec is None else str(spec)
    if is_hub_name(spec):
        return spec
    return resolve(spec).sha256


def is_hub_name(spec: str) -> bool:
    """A published checkpoint named by its hub (``torchvision:DEFAULT``, ``compressai:mse``, …)."""
    return (":" in spec and "://" not in spec and not spec.startswith(("/", ".", "~", "trained:", "staged:", "random"))
            and not Path(spec).is_file())


def names_a_file(spec: str | None) -> bool:
    """Weights a file holds: not ``random[:seed]``, not a hub name."""
    spec = "random" if spec is None else str(spec)
    return not (spec == "random" or spec.startswith("random:") or is_hub_name(spec))


SAFE_CHECKPOINT_FIX = ("use weights saved with torch.save(model.state_dict(), path) from a source you trust "
                       "(a training run's own export, a published checkpoint)")


def refusal_reason(path: str | Path, exc: Exception, allowed: tuple[str, ...] = ()) -> str:
    """Why a ``weights_only`` load refused ``path``, in one line (``allowed``: prefixes of the
    globals the loader accepts). torch's own message advises loading again with
    ``weights_only=False``, which would run whatever the file holds: never passed on."""
    try:   # a torch.save archive: list what its pickle would import, without running it
        unsafe = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
                  if not g.startswith(allowed or ("\0",))]
    except Exception:  # noqa: BLE001 - not a torch.save archive; read the unpickler's own words
        unsafe = []
    if unsafe:
        return (f"it holds objects a weights file never needs ({', '.join(unsafe[:4])}{', …' if len(unsafe) > 4 else ''})"
                " — a pickle that would build them, or run code, on loading; it was refused unread")
    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return (f"its pickle would import {found[1]} on loading (code, not weights); it was refused unread")
    found = re.search(r"Unsupported operand (\d+)", text)
    if found:
        return f"it is not a checkpoint torch.save wrote (a raw pickle: opcode {found[1]} refused); it was refused unread"
    lines = [line.strip() for line in text.splitlines() if line.strip() and "weights_only" not in line
             and "torch.load" not in line]
    return (lines[0] if lines else type(exc).__name__)[:300]


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint safely (``weights_only=True``: nothing in the file runs) and unwrap the
    usual containers."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise WeightsUnavailable(f"checkpoint {path} does not exist") from exc
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named and the reason in one line
        raise WeightsUnavailable(f"cannot load checkpoint {path} (read with weights_only=True): "
                                 f"{refusal_reason(path, exc)}; {SAFE_CHECKPOINT_FIX}") from None
    for key in ("state_dict", "model_state_dict", "model", "net"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise WeightsUnavailable(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def check_readable(path: str | Path) -> None:
    """Read a weights file as the zoo's builders read it, running nothing in it: an ultralytics
    ``.pt`` (a pickle of ultralytics' own module classes) through ultralytics' safe loader,
    anything else as a state dict with ``weights_only=True``. A file that holds code, or is no
    checkpoint at all, raises ``WeightsUnavailable`` with a one-line reason and the fix."""
    path = Path(path)
    if path.suffix == ".pt":
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # noqa: BLE001 - not a torch.save archive: load_state_dict says why
            unsafe = []
        if unsafe and any(name.startswith("ultralytics.") for name in unsafe):
            from icm.detectors.yolo import load_ultralytics

            load_ultralytics(path)
            return
    load_state_dict(path)


@contextmanager
def seeded(seed: int | None):
    """Run a model's random initialisation from ``seed``, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0 if seed is None else seed)
        yield
