"""Where a job's inputs and outputs live: a local directory, or any filesystem pyarrow reaches by URI —
``s3://bucket/prefix`` (AWS or any S3-compatible server: set ``AWS_ENDPOINT_URL``), ``gs://``,
``hdfs://``. On a cluster every node writes its units' files straight to the shared location.

Writes are atomic: a local file is written to a temporary name and renamed; an object store PUT
is atomic by nature. So a unit whose manifest shard exists is complete, wherever it lives.
"""

from __future__ import annotations

import io
import os
import posixpath
from functools import lru_cache
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


@lru_cache(maxsize=32)
def _filesystem(bucket_uri: str) -> pafs.FileSystem:
    return pafs.FileSystem.from_uri(bucket_uri)[0]


def resolve_location(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) of a local path or a URI; one filesystem object per bucket and process."""
    location = str(location)
    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())
    scheme, rest = location.split("://", 1)
    if scheme == "file":
        return pafs.LocalFileSystem(), rest
    bucket = rest.split("/", 1)[0]
    return _filesystem(f"{scheme}://{bucket}"), rest.rstrip("/")


def join_location(root: str | Path, rel: str) -> str:
    """``rel`` under ``root``, for local paths and URIs alike (no ``Path``: it would fold ``s3://``)."""
    root = str(root)
    return f"{root.rstrip('/')}/{rel.lstrip('/')}" if is_uri(root) else str(Path(root) / rel)


def parent_location(location: str | Path) -> str:
    location = str(location)
    return location.rstrip("/").rsplit("/", 1)[0] if is_uri(location) else str(Path(location).parent)


def read_location(location: str | Path) -> bytes:
    """The bytes of a file at a local path or a URI (``s3://``, ``gs://``, …)."""
    fs, path = resolve_location(location)
    with fs.open_input_stream(path) as f:
        return f.read()


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
        if is_uri(root):
            self.fs, self.base = pafs.FileSystem.from_uri(self.uri)
            self.local = False
        else:
            self.fs, self.base = pafs.LocalFileSystem(), str(Path(root).resolve())
            self.local = True

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
        if self.local:
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
            self.fs.create_dir(posixpath.dirname(path), recursive=True)
            with self.fs.open_output_stream(path) as f:
                f.write(data)
        return path

    def write_text(self, rel: str, text: str) -> str:
        return self.write_bytes(rel, text.encode())

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

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

    def read_tables(self, rel_dir: str, columns: list[str] | None = None) -> list[pa.Table]:
        return [self.read_table(f"{rel_dir}/{name}", columns) for name in self.list(rel_dir, ".parquet")]
