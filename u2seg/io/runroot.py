"""Run-root access over fsspec: one object for a local folder and an ``s3://`` prefix alike.

Writes are atomic so a reader never sees a partial file: locally a temporary file in the same folder
is renamed over the target; on S3 an object becomes visible only when its single PUT (or multipart
upload) completes, so the bytes are written once to the final, deterministic key.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import posixpath
import uuid
from collections.abc import Callable, Iterator
from typing import IO, Any, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from u2seg.errors import UserError
from u2seg.io.retry import retry_transient

log = logging.getLogger(__name__)
T = TypeVar("T")


def split_protocol(uri: str) -> tuple[str, str]:
    """``s3://b/p`` -> ("s3", "b/p"); ``/x`` or ``file:///x`` -> ("file", "/x")."""
    if "://" in uri:
        proto, rest = uri.split("://", 1)
        proto = proto.lower()
        if proto in ("file", "local"):
            return "file", os.path.abspath(rest)
        if proto in ("s3", "s3a"):
            return "s3", rest.rstrip("/")
        return proto, rest.rstrip("/")
    return "file", os.path.abspath(os.path.expanduser(uri))


def filesystem_for(uri: str, storage_options: dict[str, Any] | None = None) -> fsspec.AbstractFileSystem:
    """An fsspec filesystem for ``uri``; storage options apply only to remote protocols."""
    proto, _ = split_protocol(uri)
    if proto == "file":
        return fsspec.filesystem("file")
    return fsspec.filesystem(proto, **(storage_options or {}))


def pyarrow_filesystem(uri: str, storage_options: dict[str, Any] | None = None) -> pafs.FileSystem:
    """A pyarrow filesystem for ``uri`` (what Ray Data's readers and writers want)."""
    proto, _ = split_protocol(uri)
    if proto == "file":
        return pafs.LocalFileSystem()
    if proto == "s3":
        opts = storage_options or {}
        ck = opts.get("client_kwargs", {})
        endpoint = ck.get("endpoint_url")
        kwargs: dict[str, Any] = {}
        if opts.get("anon"):
            kwargs["anonymous"] = True
        if opts.get("key"):
            kwargs["access_key"] = opts["key"]
            kwargs["secret_key"] = opts.get("secret")
        if ck.get("region_name"):
            kwargs["region"] = ck["region_name"]
        elif endpoint:
            kwargs["region"] = "us-east-1"
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            kwargs["endpoint_override"] = host or scheme
            kwargs["scheme"] = scheme if host else "https"
        return pafs.S3FileSystem(**kwargs)
    return pafs.PyFileSystem(pafs.FSSpecHandler(filesystem_for(uri, storage_options)))


class RunRoot:
    """A run's root folder/prefix. Picklable: workers rebuild the filesystem from URI + options."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None, *, retry_s: float = 0.0):
        self.uri = uri.rstrip("/") if "://" in uri else os.path.abspath(os.path.expanduser(uri))
        self.storage_options = dict(storage_options or {})
        self.retry_s = float(retry_s)  # how long writes (and commit-critical reads) retry transient errors
        self.protocol, self.root = split_protocol(self.uri)
        self._fs: fsspec.AbstractFileSystem | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri, "storage_options": self.storage_options, "retry_s": self.retry_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["uri"], state["storage_options"],  # type: ignore[misc]
                      retry_s=state.get("retry_s", 0.0))

    def __repr__(self) -> str:  # never show credentials
        return f"RunRoot({self.uri!r})"

    @property
    def is_local(self) -> bool:
        return self.protocol == "file"

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self._fs is None:
            self._fs = filesystem_for(self.uri, self.storage_options)
        return self._fs

    def path(self, *parts: str) -> str:
        """Filesystem path (no protocol) of ``parts`` under the root."""
        return posixpath.join(self.root, *[p.strip("/") for p in parts if p])

    def join(self, *parts: str) -> str:
        """Full URI of ``parts`` under the root."""
        p = self.path(*parts)
        return p if self.is_local else f"{self.protocol}://{p}"

    def exists(self, *parts: str) -> bool:
        return bool(self.fs.exists(self.path(*parts)))

    def read_bytes(self, *parts: str) -> bytes:
        return self.fs.cat_file(self.path(*parts))

    def read_text(self, *parts: str) -> str:
        return self.read_bytes(*parts).decode()

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.read_bytes(*parts))

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Atomically publish ``data`` at ``rel``; transient storage errors are retried for retry_s."""
        self.retrying(lambda: self._write_once(rel, data), f"write {self.join(rel)}")

    def retrying(self, fn: Callable[[], T], what: str) -> T:
        """``fn()`` with transient storage errors retried for ``retry_s`` seconds (for idempotent calls:
        every write, and the reads a commit depends on)."""
        return retry_transient(fn, self.retry_s, what)

    def _write_once(self, rel: str, data: bytes) -> None:
        target = self.path(rel)
        if self.is_local:
            folder = posixpath.dirname(target)
            os.makedirs(folder, exist_ok=True)
            tmp = posixpath.join(folder, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(target)}")
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        else:
            self.fs.pipe_file(target, data)
            self.fs.invalidate_cache(posixpath.dirname(target))

    @contextlib.contextmanager
    def open_atomic(self, rel: str) -> Iterator[IO[bytes]]:
        """A binary file to stream a large output into; published at ``rel`` only if the block succeeds.

        Locally: a temporary file renamed on success. S3: a multipart upload, which S3 makes visible
        only when completed (s3fs aborts it when the block raises).
        """
        target = self.path(rel)
        if self.is_local:
            folder = posixpath.dirname(target)
            os.makedirs(folder, exist_ok=True)
            tmp = posixpath.join(folder, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(target)}")
            try:
                with open(tmp, "wb") as fh:
                    yield fh
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        else:
            fh = self.fs.open(target, "wb")
            try:
                yield fh
            except BaseException:
                with contextlib.suppress(Exception):
                    fh.discard() if hasattr(fh, "discard") else None
                raise
            fh.close()
            self.fs.invalidate_cache(posixpath.dirname(target))

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def write_json(self, rel: str, obj: Any, *, indent: int | None = 2) -> None:
        self.write_text(rel, json.dumps(obj, indent=indent, default=_json_default))

    def write_parquet(self, rel: str, table: pa.Table) -> None:
        """Atomically publish a Parquet file (compressed with zstd)."""
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        self.write_bytes(rel, buf.getvalue())

    def list(self, rel_dir: str = "", suffix: str = "") -> list[str]:
        """Sorted names (relative to ``rel_dir``) of the files directly under it; [] if absent."""
        folder = self.path(rel_dir)
        try:
            self.fs.invalidate_cache(folder)
            entries = self.fs.ls(folder, detail=True)
        except FileNotFoundError:
            return []
        names = []
        for e in entries:
            if e.get("type") == "directory":
                continue
            name = posixpath.basename(e["name"].rstrip("/"))
            if name.startswith(".tmp-") or not name.endswith(suffix):
                continue
            names.append(name)
        return sorted(names)

    def parquet_files(self, rel_dir: str) -> list[str]:
        """Full URIs of the committed Parquet parts in ``rel_dir``, sorted."""
        return [self.join(rel_dir, n) for n in self.list(rel_dir, ".parquet")]

    def parquet_paths(self, rel_dir: str) -> list[str]:
        """Filesystem paths (for :meth:`pyarrow_fs`, e.g. Ray Data readers) of the Parquet parts, sorted."""
        return [self.path(rel_dir, n) for n in self.list(rel_dir, ".parquet")]

    def read_part(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        """One Parquet file of the run root."""
        with self.fs.open(self.path(rel), "rb") as fh:
            return pq.read_table(fh, columns=columns)

    def read_parquet(self, rel_dir: str, columns: list[str] | None = None,
                     schema: pa.Schema | None = None) -> pa.Table:
        """Concatenate the Parquet parts of ``rel_dir``: for small tables only (stats, tests)."""
        tables = []
        for name in self.list(rel_dir, ".parquet"):
            with self.fs.open(self.path(rel_dir, name), "rb") as fh:
                tables.append(pq.read_table(fh, columns=columns))
        if not tables:
            if schema is not None:
                return schema.empty_table() if columns is None else schema.empty_table().select(columns)
            return pa.table({})
        return pa.concat_tables(tables, promote_options="default")

    def remove(self, rel: str, *, recursive: bool = False) -> None:
        p = self.path(rel)
        if self.fs.exists(p):
            self.fs.rm(p, recursive=recursive)

    def remove_unfinished_writes(self, rel_dir: str) -> int:
        """Remove what killed writers left under ``rel_dir``: temporary files locally, incomplete multipart
        uploads on S3 (invisible to readers, but stored and billed). Call only while nothing writes there."""
        n = 0
        if self.is_local:
            for folder, _, files in os.walk(self.path(rel_dir)):
                for name in files:
                    if name.startswith(".tmp-"):
                        with contextlib.suppress(FileNotFoundError):
                            os.remove(os.path.join(folder, name))
                            n += 1
            return n
        if self.protocol != "s3":
            return 0
        bucket, _, prefix = self.path(rel_dir).partition("/")
        try:
            kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix.rstrip("/") + "/"}
            while True:
                page = self.fs.call_s3("list_multipart_uploads", **kwargs)
                for up in page.get("Uploads", []):
                    self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
                    n += 1
                if not page.get("IsTruncated"):
                    break
                kwargs.update(KeyMarker=page["NextKeyMarker"], UploadIdMarker=page["NextUploadIdMarker"])
        except Exception as exc:  # a store without the multipart listing API: nothing we can clean
            log.debug("could not list multipart uploads under %s: %s", self.join(rel_dir), exc)
        return n

    def pyarrow_fs(self) -> pafs.FileSystem:
        return pyarrow_filesystem(self.uri, self.storage_options)

    def ensure_writable(self) -> None:
        """Fail early with a clear message when the root cannot be written (bad bucket, no credentials)."""
        probe = f"_probe/{uuid.uuid4().hex}"
        try:
            self._write_once(probe, b"ok")  # no retry: an unreachable root should fail now, not in minutes
            self.remove("_probe", recursive=True)
        except Exception as exc:  # any backend error means the same thing to the user
            raise RunRootError(f"run root {self.uri} is not writable: {type(exc).__name__}: {exc}") from exc


class RunRootError(RuntimeError, UserError):
    """The run root cannot be reached or written."""


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
