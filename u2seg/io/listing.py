"""Streaming listing of image sources: local folders, ``s3://`` prefixes and list files.

Every lister is a generator of ``(uri, size_bytes)`` that holds at most one listing page (S3: 1000
keys) or one directory's entries at a time, so a million keys never sit in one Python list.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import fsspec
import pyarrow.parquet as pq

from u2seg.io.images import has_image_extension
from u2seg.io.runroot import filesystem_for, split_protocol

log = logging.getLogger(__name__)

LIST_FILE_SUFFIXES = (".txt", ".lst", ".parquet")


def is_image_name(name: str) -> bool:
    return has_image_extension(name) and not os.path.basename(name).startswith(".")


def is_list_file(uri: str) -> bool:
    return uri.lower().endswith(LIST_FILE_SUFFIXES)


def iter_local(folder: str, recursive: bool = True) -> Iterator[tuple[str, int]]:
    """Depth-first scandir; yields image files in sorted order per directory."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"input folder does not exist: {folder}") from exc
    subdirs = []
    for e in entries:
        if e.is_dir(follow_symlinks=False):
            subdirs.append(e.path)
        elif e.is_file() and is_image_name(e.name):
            yield e.path, e.stat().st_size
    if recursive:
        for d in subdirs:
            yield from iter_local(d, recursive)


def iter_s3(fs: Any, bucket_prefix: str, recursive: bool = True) -> Iterator[tuple[str, int]]:
    """Page through ListObjectsV2 (1000 keys per page) without accumulating pages."""
    bucket, _, prefix = bucket_prefix.partition("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": 1000}
    if not recursive:
        kwargs["Delimiter"] = "/"
    while True:
        page = fs.call_s3("list_objects_v2", **kwargs)
        for obj in page.get("Contents", []):
            if is_image_name(obj["Key"]):
                yield f"s3://{bucket}/{obj['Key']}", int(obj["Size"])
        token = page.get("NextContinuationToken")
        if not page.get("IsTruncated") or not token:
            return
        kwargs["ContinuationToken"] = token


def canonical_uri(uri: str) -> str:
    """One spelling per image, so one image written two ways in list files gets one image_id:
    local paths (plain, ``file://``, ``local://``) become absolute paths, ``s3a://`` becomes ``s3://``."""
    proto, path = split_protocol(uri)
    return path if proto == "file" else f"{proto}://{path}"


def iter_list_file(uri: str, storage_options: dict[str, Any] | None = None) -> Iterator[tuple[str, int]]:
    """A text file of one URI per line (``#`` comments), or a Parquet file with a ``uri`` column.

    Entries are canonicalised (:func:`canonical_uri`); duplicates are removed by the manifest stage.
    Sizes are unknown (-1) for list files; extract records the real size when it reads the image.
    """
    if uri.lower().endswith(".parquet"):
        with fsspec.open(uri, "rb", **_opts(uri, storage_options)) as fh:
            pf = pq.ParquetFile(fh)
            if "uri" not in pf.schema_arrow.names:
                raise ValueError(f"list file {uri} has no 'uri' column (columns: {pf.schema_arrow.names})")
            for batch in pf.iter_batches(columns=["uri"], batch_size=4096):
                for u in batch.column(0).to_pylist():
                    if u and u.strip():
                        yield canonical_uri(u.strip()), -1
        return
    with fsspec.open(uri, "rt", **_opts(uri, storage_options)) as fh:
        for line in fh:
            line = line.strip()
            if line and not line.startswith("#"):
                yield canonical_uri(line), -1


def _opts(uri: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    return {} if split_protocol(uri)[0] == "file" else dict(storage_options or {})


def split_source(uri: str, storage_options: dict[str, Any] | None, recursive: bool) -> list[str]:
    """Split one folder/prefix into its immediate sub-folders (listed in parallel) plus itself (files only).

    Returns source specs: the top level as ``flat:<uri>`` and each child as a recursive source.
    """
    if is_list_file(uri) or not recursive:
        return [uri]
    proto, path = split_protocol(uri)
    if proto == "file":
        if not os.path.isdir(path):
            raise FileNotFoundError(f"input folder does not exist: {uri}")
        children = sorted(e.path for e in os.scandir(path) if e.is_dir(follow_symlinks=False))
        return [f"flat:{path}", *children]
    fs = filesystem_for(uri, storage_options)
    bucket, _, prefix = path.partition("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    page = fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, Delimiter="/", MaxKeys=1000)
    children = [f"s3://{bucket}/{cp['Prefix'].rstrip('/')}" for cp in page.get("CommonPrefixes", [])]
    if page.get("IsTruncated"):  # too many children to split cheaply: list the prefix as one stream
        return [uri]
    return [f"flat:{uri}", *children]


def iter_source(spec: str, storage_options: dict[str, Any] | None, recursive: bool) -> Iterator[tuple[str, int]]:
    """Stream ``(uri, bytes)`` of one source spec from :func:`split_source`."""
    flat = spec.startswith("flat:")
    uri = spec[5:] if flat else spec
    rec = recursive and not flat
    if is_list_file(uri):
        yield from iter_list_file(uri, storage_options)
        return
    proto, path = split_protocol(uri)
    if proto == "file":
        yield from iter_local(path, rec)
    elif proto == "s3":
        yield from iter_s3(filesystem_for(uri, storage_options), path, rec)
    else:
        fs = filesystem_for(uri, storage_options)
        for p, info in fs.find(path, maxdepth=None if rec else 1, detail=True).items():
            if is_image_name(p):
                yield f"{proto}://{p}", int(info.get("size", -1))
