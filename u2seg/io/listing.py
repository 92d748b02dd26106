"""Streaming listing of image sources: local folders, ``s3://`` prefixes and list files.

Every lister is a generator of :class:`Listed` entries that holds at most one listing page (S3: 1000
keys) or one directory's entries at a time, so a million keys never sit in one Python list. Each entry
carries a *version* (local: size and modification time; S3: the ETag) so that a rerun can tell a changed
image from an unchanged one. What is not listed is counted (by suffix, or by reason) in a
:class:`ListStats`, and a link that cannot be followed is an entry with an error reason, never an abort.

Local files are listed under their canonical path (symlinks resolved), so a symlink and its target are one
image. The run root is never listed, even when it lies inside an input folder.
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow.parquet as pq

from u2seg.errors import InputsError
from u2seg.io.images import has_image_extension
from u2seg.io.runroot import filesystem_for, split_protocol

log = logging.getLogger(__name__)

LIST_FILE_SUFFIXES = (".txt", ".lst", ".parquet")
SYMLINK_LOOP = "symlink_loop"
DANGLING_LINK = "dangling_link"


@dataclass(frozen=True)
class Listed:
    """One listed file: an image (``error`` empty) or a link that could not be followed (``error`` = reason)."""

    uri: str
    size: int  # bytes, -1 when unknown (list files)
    version: str  # what changes when the file changes ("" when unknown: list files)
    error: str = ""
    message: str = ""


@dataclass
class ListStats:
    """What a listing skipped: files by suffix, and other reasons (hidden files, symlinked folders...)."""

    skipped_suffixes: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)

    def skip_name(self, name: str) -> None:
        base = posixpath.basename(name)
        if base.startswith("."):
            self.skipped["hidden"] += 1
        else:
            self.skipped_suffixes[os.path.splitext(base)[1].lower() or "(none)"] += 1

    def merge(self, other: ListStats) -> None:
        self.skipped_suffixes.update(other.skipped_suffixes)
        self.skipped.update(other.skipped)

    def to_dict(self) -> dict[str, dict[str, int]]:
        return {"not_listed_suffixes": dict(sorted(self.skipped_suffixes.items())),
                "not_listed": dict(sorted(self.skipped.items()))}


def is_image_name(name: str) -> bool:
    return has_image_extension(name) and not os.path.basename(name).startswith(".")


def is_list_file(uri: str) -> bool:
    return uri.lower().endswith(LIST_FILE_SUFFIXES)


def _inside(path: str, folder: str | None) -> bool:
    return folder is not None and (path == folder or path.startswith(folder.rstrip("/") + "/"))


def iter_local(folder: str, recursive: bool = True, *, exclude: str | None = None,
               stats: ListStats | None = None) -> Iterator[Listed]:
    """Depth-first scandir; yields image files in sorted order per directory, under their canonical path.

    The folder is made canonical once; below it only symlinks need resolving (entries that are not links
    keep a canonical path), so a deep tree costs no per-file path resolution.
    """
    stats = stats if stats is not None else ListStats()
    folder = os.path.realpath(folder)
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except FileNotFoundError as exc:
        raise InputsError(f"input folder does not exist: {folder}") from exc
    subdirs = []
    for e in entries:
        if _inside(e.path, exclude):
            stats.skipped["run_root"] += 1
            continue
        if e.is_symlink():
            yield from _local_link(e, stats)
        elif e.is_dir(follow_symlinks=False):
            subdirs.append(e.path)
        elif not is_image_name(e.name):
            stats.skip_name(e.name)
        elif e.is_file(follow_symlinks=False):
            st = e.stat(follow_symlinks=False)
            yield Listed(e.path, st.st_size, f"{st.st_size}-{st.st_mtime_ns}")
    if recursive:
        for d in subdirs:
            yield from iter_local(d, recursive, exclude=exclude, stats=stats)


def _local_link(entry: os.DirEntry, stats: ListStats) -> Iterator[Listed]:
    """A symlink: its target's canonical path (a loop or a dangling link is an error entry, not an abort)."""
    try:
        st = os.stat(entry.path)
    except OSError as exc:
        reason = SYMLINK_LOOP if exc.errno == errno.ELOOP else DANGLING_LINK
        target = os.readlink(entry.path)
        yield Listed(entry.path, -1, "", reason, f"{reason}: {entry.path} -> {target} ({exc.strerror})")
        return
    if os.path.isdir(entry.path):
        stats.skipped["symlinked_folder"] += 1  # not followed: a linked folder can loop back or repeat a tree
        log.warning("manifest: not following the symlinked folder %s", entry.path)
        return
    if not is_image_name(entry.name) and not is_image_name(os.path.realpath(entry.path)):
        stats.skip_name(entry.name)
        return
    yield Listed(os.path.realpath(entry.path), st.st_size, f"{st.st_size}-{st.st_mtime_ns}")


def iter_s3(fs: Any, bucket_prefix: str, recursive: bool = True, *, exclude: str | None = None,
            stats: ListStats | None = None) -> Iterator[Listed]:
    """Page through ListObjectsV2 (1000 keys per page) without accumulating pages."""
    stats = stats if stats is not None else ListStats()
    bucket, _, prefix = bucket_prefix.partition("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": 1000}
    if not recursive:
        kwargs["Delimiter"] = "/"
    while True:
        page = fs.call_s3("list_objects_v2", **kwargs)
        for obj in page.get("Contents", []):
            key = obj["Key"]
            if _inside(f"{bucket}/{key}", exclude):
                stats.skipped["run_root"] += 1
            elif is_image_name(key):
                yield Listed(f"s3://{bucket}/{key}", int(obj["Size"]), str(obj.get("ETag", "")).strip('"'))
            elif not key.endswith("/"):
                stats.skip_name(key)
        token = page.get("NextContinuationToken")
        if not page.get("IsTruncated") or not token:
            return
        kwargs["ContinuationToken"] = token


def canonical_uri(uri: str) -> str:
    """One spelling per image, so one image written two ways gets one image_id: local paths (plain,
    ``file://``, ``local://``, relative, through symlinks) become canonical absolute paths, ``s3a://``
    becomes ``s3://``."""
    proto, path = split_protocol(uri)
    return os.path.realpath(path) if proto == "file" else f"{proto}://{path}"


def iter_list_file(uri: str, storage_options: dict[str, Any] | None = None) -> Iterator[Listed]:
    """A text file of one URI per line (``#`` comments), or a Parquet file with a ``uri`` column.

    Entries are canonicalised (:func:`canonical_uri`); duplicates are removed by the manifest stage.
    Sizes and versions are unknown for list files (-1, ""): a changed image behind an unchanged URI is
    not noticed, and extract records the real size when it reads the image.
    """
    if uri.lower().endswith(".parquet"):
        with fsspec.open(uri, "rb", **_opts(uri, storage_options)) as fh:
            pf = pq.ParquetFile(fh)
            if "uri" not in pf.schema_arrow.names:
                raise ValueError(f"list file {uri} has no 'uri' column (columns: {pf.schema_arrow.names})")
            for batch in pf.iter_batches(columns=["uri"], batch_size=4096):
                for u in batch.column(0).to_pylist():
                    if u and u.strip():
                        yield Listed(canonical_uri(u.strip()), -1, "")
        return
    with fsspec.open(uri, "rt", **_opts(uri, storage_options)) as fh:
        for line in fh:
            line = line.strip()
            if line and not line.startswith("#"):
                yield Listed(canonical_uri(line), -1, "")


def _opts(uri: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    return {} if split_protocol(uri)[0] == "file" else dict(storage_options or {})


def split_source(uri: str, storage_options: dict[str, Any] | None, recursive: bool,
                 exclude: str | None = None) -> list[str]:
    """Split one folder/prefix into its immediate sub-folders (listed in parallel) plus itself (files only).

    Returns source specs: the top level as ``flat:<uri>`` and each child as a recursive source.
    """
    if is_list_file(uri) or not recursive:
        return [uri]
    proto, path = split_protocol(uri)
    if proto == "file":
        if not os.path.isdir(path):
            raise InputsError(f"input folder does not exist: {uri}")
        children = sorted(e.path for e in os.scandir(path) if e.is_dir(follow_symlinks=False)
                          and not _inside(os.path.realpath(e.path), exclude))
        return [f"flat:{path}", *children]
    fs = filesystem_for(uri, storage_options)
    bucket, _, prefix = path.partition("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    page = fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, Delimiter="/", MaxKeys=1000)
    children = [f"s3://{bucket}/{cp['Prefix'].rstrip('/')}" for cp in page.get("CommonPrefixes", [])
                if not _inside(f"{bucket}/{cp['Prefix'].rstrip('/')}", exclude)]
    if page.get("IsTruncated"):  # too many children to split cheaply: list the prefix as one stream
        return [uri]
    return [f"flat:{uri}", *children]


def iter_source(spec: str, storage_options: dict[str, Any] | None, recursive: bool, *,
                exclude: str | None = None, stats: ListStats | None = None) -> Iterator[Listed]:
    """Stream the entries of one source spec from :func:`split_source`.

    ``exclude``: the run root as a canonical local path or ``bucket/prefix``; nothing under it is listed.
    """
    flat = spec.startswith("flat:")
    uri = spec[5:] if flat else spec
    rec = recursive and not flat
    if is_list_file(uri):
        yield from iter_list_file(uri, storage_options)
        return
    proto, path = split_protocol(uri)
    if proto == "file":
        yield from iter_local(path, rec, exclude=exclude, stats=stats)
    elif proto == "s3":
        yield from iter_s3(filesystem_for(uri, storage_options), path, rec, exclude=exclude, stats=stats)
    else:
        stats = stats if stats is not None else ListStats()
        fs = filesystem_for(uri, storage_options)
        for p, info in fs.find(path, maxdepth=None if rec else 1, detail=True).items():
            if is_image_name(p):
                version = str(info.get("ETag") or info.get("mtime") or info.get("size", ""))
                yield Listed(f"{proto}://{p}", int(info.get("size", -1)), version)
            else:
                stats.skip_name(p)
