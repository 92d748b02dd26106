"""Reading inputs (source images, ground truth) from local paths or object stores, riding out outages.

Every stage and viz read input bytes through :func:`read_input`: a transient storage error (endpoint
down, connection reset, timeout) is retried for ``retry_s`` seconds (``run.storage.retry_s``) and then
raises :class:`InputUnreachableError`, so an outage fails the task (which Ray retries, and a rerun
resumes) instead of being recorded as a bad image. Permanent errors (no such key, access denied)
propagate unchanged: for an image they are its own fault and become an errors-table row.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from u2seg.io.retry import is_transient, retry_transient
from u2seg.io.runroot import filesystem_for, split_protocol


class InputUnreachableError(RuntimeError):
    """An input stayed unreadable through a transient error for the whole retry budget."""


def read_input(uri: str, storage_options: Mapping[str, Any] | None = None, retry_s: float = 0.0) -> bytes:
    """The bytes at ``uri`` (a local path or any fsspec URI)."""
    fs = filesystem_for(uri, dict(storage_options or {}))
    path = split_protocol(uri)[1]
    try:
        return retry_transient(lambda: fs.cat_file(path), retry_s, f"read {uri}")
    except Exception as exc:
        if is_transient(exc):
            raise InputUnreachableError(f"could not read {uri} within run.storage.retry_s={retry_s}s: "
                                        f"{type(exc).__name__}: {exc}") from exc
        raise


def read_json_input(uri: str, storage_options: Mapping[str, Any] | None = None, retry_s: float = 0.0) -> Any:
    return json.loads(read_input(uri, storage_options, retry_s))


def read_image(uri: str, storage_options: Mapping[str, Any] | None = None, retry_s: float = 0.0) -> np.ndarray:
    """A source image as uint8 RGB (``u2seg.io.images.decode_image``: oriented, alpha over black, 8-bit)."""
    from u2seg.io.images import decode_image

    return decode_image(read_input(uri, storage_options, retry_s))
