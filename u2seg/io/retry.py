"""Retrying writes through a storage outage: a restarted S3 endpoint must not fail a whole stage."""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

# Errors that say "this will not work however long you wait": a missing or invalid bucket, denied access,
# a bad request. s3fs turns S3 error codes into these types and errnos; an outage gives other errors.
PERMANENT = (PermissionError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)
PERMANENT_ERRNOS = {errno.EINVAL, errno.EPERM, errno.EACCES, errno.ENOENT, errno.ENOTDIR, errno.EISDIR,
                    errno.ENAMETOOLONG, errno.EMSGSIZE, errno.EROFS, errno.EEXIST, errno.ENOTEMPTY,
                    errno.ENOSPC}


def _transient_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [OSError, TimeoutError, ConnectionError]
    try:  # s3fs speaks aiobotocore; its connection errors are not all OSErrors
        import botocore.exceptions as be

        types += [be.ConnectionError, be.HTTPClientError]
    except ImportError:  # only local run roots in this environment
        pass
    try:
        import aiohttp

        types.append(aiohttp.ClientError)
    except ImportError:
        pass
    return tuple(types)


def is_transient(exc: BaseException) -> bool:
    """True for errors a storage outage raises (connection refused/reset, timeouts, 5xx surfaced as OSError)."""
    if isinstance(exc, PERMANENT) or (isinstance(exc, OSError) and exc.errno in PERMANENT_ERRNOS):
        return False
    return isinstance(exc, _transient_types())


def retry_transient(fn: Callable[[], T], budget_s: float, what: str, *, first_delay_s: float = 0.5,
                    max_delay_s: float = 15.0) -> T:
    """Call ``fn`` until it succeeds, a permanent error occurs, or ``budget_s`` seconds have passed.

    Only idempotent operations belong here (our writes publish whole objects under fixed names).
    """
    deadline = time.monotonic() + budget_s
    delay, attempt = first_delay_s, 1
    while True:
        try:
            return fn()
        except Exception as exc:
            left = deadline - time.monotonic()
            if not is_transient(exc) or left <= 0:
                raise
            log.warning("storage: %s failed (attempt %d: %s: %s); retrying in %.1fs", what, attempt,
                        type(exc).__name__, str(exc)[:200], min(delay, left))
            time.sleep(min(delay, left))
            delay, attempt = min(delay * 2, max_delay_s), attempt + 1
