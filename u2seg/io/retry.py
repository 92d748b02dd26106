"""Riding out storage outages: a restarted S3 endpoint must not fail a whole stage or turn a good image into
an error row. Transient vs permanent is ours to decide; the backoff loop is tenacity's."""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from typing import TypeVar

import tenacity

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

    Exponential backoff (``first_delay_s`` doubling up to ``max_delay_s``, never sleeping past the
    budget) by tenacity; our classifier decides what is worth waiting for. Only idempotent operations
    belong here (our writes publish whole objects under fixed names).
    """
    backoff = tenacity.wait_exponential(multiplier=first_delay_s, max=max_delay_s)

    def wait(state: tenacity.RetryCallState) -> float:
        return max(0.0, min(backoff(state), budget_s - (state.seconds_since_start or 0.0)))

    def warn(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning("storage: %s failed (attempt %d: %s: %s); retrying in %.1fs", what, state.attempt_number,
                    type(exc).__name__, str(exc)[:200], state.upcoming_sleep)

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(is_transient), stop=tenacity.stop_after_delay(budget_s), wait=wait,
        before_sleep=warn, sleep=lambda s: time.sleep(s), reraise=True)
    return retrying(fn)
