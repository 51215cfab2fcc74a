"""Where a job's inputs and outputs live: a local directory, or any filesystem pyarrow reaches by URI —
``s3://bucket/prefix`` (AWS or any S3-compatible server: set ``AWS_ENDPOINT_URL``), ``gs://``,
``hdfs://``. On a cluster every node writes its units' files straight to the shared location.

Writes are atomic: a local file is written to a temporary name and renamed; an object store PUT
is atomic by nature. So a unit whose manifest shard exists is complete, wherever it lives. Object
stores get no directory markers (pyarrow's ``create_dir`` writes one object per ancestor prefix,
which a prefix-scoped IAM policy refuses, and on GCS needs bucket metadata that
``roles/storage.objectAdmin`` lacks): a key is written with its own request(s) only.

A read the storage refuses or fails — a missing grant, throttling, a dropped connection — raises
``StorageUnavailable``: it is a fault of the storage, not of the file, and never becomes a row.
Only an answer that no such file exists (404, no such local file) reads as "not found".
"""

from __future__ import annotations

import io
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


IO_THREADS = int(os.environ.get("ICM_IO_THREADS", "32"))   # concurrent requests of one bulk read
T = TypeVar("T")
R = TypeVar("R")


class StorageUnavailable(OSError):
    """The storage refused or failed a request (a missing grant, 503 SlowDown, a reset
    connection): the file's state is unknown, so the work unit fails and is retried; it is never
    recorded as the file's error. S3 answers 403, not 404, for a missing key when the role lacks
    ``s3:ListBucket``: a 403 is a permission error, never evidence that a file is missing."""


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


@lru_cache(maxsize=32)
def _filesystem(bucket_uri: str, endpoint: str = "") -> pafs.FileSystem:
    """One filesystem object per bucket and process, so S3's bucket region is looked up once
    (a HEAD bucket request), not by every ``Storage``. On S3, small objects are written with a
    single PUT where pyarrow allows it (``allow_delayed_open``, pyarrow ≥ 21); pyarrow 20 rejects
    the option and uploads every object in 3 requests (create, part, complete). ``endpoint`` is
    ``$AWS_ENDPOINT_URL``, which pyarrow reads: another endpoint is another filesystem."""
    if bucket_uri.startswith("s3://"):
        try:
            return pafs.FileSystem.from_uri(f"{bucket_uri}?allow_delayed_open=true")[0]
        except pa.ArrowInvalid:   # pyarrow < 21: "Unexpected query parameter in S3 URI"
            pass
    return pafs.FileSystem.from_uri(bucket_uri)[0]


def map_threads(fn: Callable[[T], R], items: Iterable[T], threads: int | None = None) -> list[R]:
    """``[fn(x) for x in items]`` with up to ``threads`` (default ``IO_THREADS``) calls in flight,
    in order: for many small reads from object storage, where each request waits on the network
    (pyarrow releases the GIL), not on this CPU."""
    items = list(items)
    threads = IO_THREADS if threads is None else threads
    if len(items) <= 1 or threads <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(threads, len(items))) as pool:
        return list(pool.map(fn, items))


def resolve_location(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) of a local path or a URI; one filesystem object per bucket and process."""
    location = str(location)
    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())
    scheme, rest = location.split("://", 1)
    if scheme == "file":
        return pafs.LocalFileSystem(), rest
    bucket = rest.split("/", 1)[0]
    return _filesystem(f"{scheme}://{bucket}", os.environ.get("AWS_ENDPOINT_URL", "")), rest.rstrip("/")


def join_location(root: str | Path, rel: str) -> str:
    """``rel`` under ``root``, for local paths and URIs alike (no ``Path``: it would fold ``s3://``)."""
    root = str(root)
    return f"{root.rstrip('/')}/{rel.lstrip('/')}" if is_uri(root) else str(Path(root) / rel)


def parent_location(location: str | Path) -> str:
    location = str(location)
    return location.rstrip("/").rsplit("/", 1)[0] if is_uri(location) else str(Path(location).parent)


def _read_whole(fs: pafs.FileSystem, path: str) -> bytes:
    """A file's bytes in one read: on S3, a HEAD and one GET. (``open_input_stream`` would read
    in 256 KiB range GETs: ~1,500 sequential requests for COCO's 448 MB annotation file.)"""
    with fs.open_input_file(path) as f:
        return f.read()


def read_location(location: str | Path) -> bytes:
    """The bytes of a file at a local path or a URI (``s3://``, ``gs://``, …)."""
    return _read_whole(*resolve_location(location))


def read_file(location: str | Path) -> bytes | None:
    """The bytes of the file at ``location``; None when the storage answers that no file is
    there (404, no such local file, a directory). Any other failure raises ``StorageUnavailable``
    naming the file and what to check."""
    fs, path = resolve_location(location)
    try:
        return _read_whole(fs, path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if isinstance(fs, pafs.LocalFileSystem) and os.path.isdir(path):
            return None
        raise StorageUnavailable(
            f"cannot read {location}: {exc} — a storage fault, not a property of the file: check the "
            "node's credentials and grants (read; and list, so that a missing file reads as missing), "
            "then rerun the same command") from exc


def location_info(location: str | Path) -> pafs.FileInfo:
    fs, path = resolve_location(location)
    return fs.get_file_info(path)


def list_files(root: str | Path) -> list[str]:
    """Relative posix paths of every file under ``root`` (a directory or a URI prefix), sorted."""
    fs, base = resolve_location(root)
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    return sorted(posixpath.relpath(i.path, base) for i in infos if i.type == pafs.FileType.File)


class Storage:
    def __init__(self, root: str | Path):
        self.uri = str(root)
        self.local = not is_uri(root)
        self.fs, self.base = resolve_location(root)
        self.object_store = not isinstance(self.fs, pafs.LocalFileSystem)   # keys, no directories

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    def path(self, rel: str = "") -> str:
        """The filesystem path of ``rel`` (a relative posix path that may not leave the root)."""
        rel = posixpath.normpath(str(rel)) if rel else ""
        if rel.startswith("../") or rel == ".." or posixpath.isabs(rel):
            raise ValueError(f"{rel!r} leaves the output root {self.uri}")
        return self.base if rel in ("", ".") else f"{self.base.rstrip('/')}/{rel}"

    def display(self, rel: str = "") -> str:
        """What to print for ``rel``: a local path, or the URI."""
        return self.path(rel) if self.local else f"{self.uri.rstrip('/')}/{rel}" if rel else self.uri

    def local_path(self, rel: str = "") -> Path:
        if not self.local:
            raise ValueError(f"{self.uri} is not a local directory")
        return Path(self.path(rel))

    def write_bytes(self, rel: str, data: bytes) -> str:
        path = self.path(rel)
        if not self.object_store:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            with self.fs.open_output_stream(path) as f:
                f.write(data)
        return path

    def write_text(self, rel: str, text: str) -> str:
        return self.write_bytes(rel, text.encode())

    def read_bytes(self, rel: str) -> bytes:
        return _read_whole(self.fs, self.path(rel))

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def list(self, rel_dir: str, suffix: str = "") -> list[str]:
        """Names of the files directly under ``rel_dir`` ending in ``suffix``, sorted."""
        selector = pafs.FileSelector(self.path(rel_dir), allow_not_found=True)
        return sorted(posixpath.basename(i.path) for i in self.fs.get_file_info(selector)
                      if i.type == pafs.FileType.File and i.path.endswith(suffix) and not i.path.endswith(".tmp"))

    def upload_dir(self, local_dir: str | Path, rel: str) -> int:
        """Copy every file under ``local_dir`` to ``rel`` here (TensorBoard logs of a node that may
        go away); files whose size is unchanged are skipped. Returns how many were copied."""
        copied = 0
        for path in sorted(Path(local_dir).rglob("*")):
            if not path.is_file():
                continue
            target = f"{rel}/{path.relative_to(local_dir).as_posix()}"
            info = self.fs.get_file_info(self.path(target))
            if info.type == pafs.FileType.File and info.size == path.stat().st_size:
                continue
            self.write_bytes(target, path.read_bytes())
            copied += 1
        return copied

    def write_table(self, rel: str, table: pa.Table) -> str:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        return self.write_bytes(rel, buf.getvalue())

    def read_table(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self.path(rel), filesystem=self.fs, columns=columns)

    def read_tables(self, rel_dir: str, columns: list[str] | None = None,
                    names: list[str] | None = None) -> list[pa.Table]:
        """Every parquet file directly under ``rel_dir`` (or those ``names``), in name order, read
        in parallel, each whole in one GET (shards are small, and a column-projected read would
        issue several), with ``ParquetFile`` (``pq.read_table`` builds a dataset per file, at 2-6x
        the CPU: a 118 k-image job has 15 k shards)."""
        def read(name: str) -> pa.Table:
            with self.fs.open_input_file(self.path(f"{rel_dir}/{name}")) as f:
                data = f.read_buffer()   # an Arrow buffer: no copy into Python bytes
            return pq.ParquetFile(pa.BufferReader(data)).read(columns=columns)
        return map_threads(read, self.list(rel_dir, ".parquet") if names is None else names)
