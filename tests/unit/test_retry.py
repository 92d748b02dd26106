"""Which storage errors are waited out, and how long."""

from __future__ import annotations

import errno

import pytest

from u2seg.io import retry

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("exc", "transient"), [
    (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), True),
    (TimeoutError("read timed out"), True),
    (OSError(errno.EIO, "InternalError"), True),
    (OSError("no errno at all"), True),
    (OSError(errno.EINVAL, "The specified bucket is not valid."), False),
    (PermissionError("AccessDenied"), False),
    (FileNotFoundError("NoSuchBucket"), False),
    (OSError(errno.ENOSPC, "disk full"), False),
    (ValueError("a bug, not an outage"), False),
])
def test_transient_or_permanent(exc, transient):
    assert retry.is_transient(exc) is transient


def test_botocore_connection_errors_are_transient():
    be = pytest.importorskip("botocore.exceptions")
    assert retry.is_transient(be.EndpointConnectionError(endpoint_url="http://127.0.0.1:9"))


def test_retries_until_success_within_the_budget(monkeypatch):
    sleeps: list[float] = []
    monkeypatch.setattr(retry.time, "sleep", sleeps.append)
    calls = iter([ConnectionResetError("reset"), TimeoutError("slow"), "done"])

    def flaky():
        value = next(calls)
        if isinstance(value, Exception):
            raise value
        return value

    assert retry.retry_transient(flaky, 60, "write x") == "done"
    assert sleeps == [0.5, 1.0]


def test_permanent_errors_and_spent_budgets_raise_at_once(monkeypatch):
    monkeypatch.setattr(retry.time, "sleep", lambda s: pytest.fail("slept on a permanent error"))
    with pytest.raises(PermissionError):
        retry.retry_transient(lambda: (_ for _ in ()).throw(PermissionError("denied")), 60, "write x")
    with pytest.raises(ConnectionResetError):
        retry.retry_transient(lambda: (_ for _ in ()).throw(ConnectionResetError("reset")), 0, "write x")
