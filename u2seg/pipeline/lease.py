"""One driver per run root: a lease file (owner token, heartbeat, expiry) at ``<run root>/_LEASE``.

A second driver fails at once naming the owner and when its lease expires (or waits for it); the lease
of a killed driver is taken over once it has expired, or at once when that driver ran on this host and its
process is gone (a rerun right after a crash on a laptop or a head node need not wait). The lease is
created with a conditional write where the store has one (local: ``O_CREAT | O_EXCL``; S3: ``PutObject``
with ``If-None-Match: *``) and every acquisition is verified by reading the lease back after a short
pause. On a store without conditional writes two drivers starting within that pause of each other
could both believe they won; the read-back makes the loser fail in all other cases (see the README,
"Failures and reruns").
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from u2seg.errors import LeaseHeldError
from u2seg.io import RunRoot, layout

log = logging.getLogger(__name__)

LEASE = layout.LEASE
VERIFY_PAUSE_S = 1.0

_held: dict[str, RunLease] = {}  # run root URI -> the lease this process holds (re-entrant)
_held_lock = threading.Lock()


class RunLease:
    """The lease of one run root, held by this process while a stage or the pipeline runs."""

    def __init__(self, root: RunRoot, ttl_s: float, what: str):
        self.root, self.ttl_s, self.what = root, float(ttl_s), what
        self.token = uuid.uuid4().hex
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ the lease record

    def _record(self) -> dict[str, Any]:
        now = time.time()
        return {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(), "what": self.what,
                "heartbeat_at": now, "expires_at": now + self.ttl_s}

    def read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.root.read_bytes(LEASE))
        except FileNotFoundError:
            return None
        except ValueError:  # a torn or foreign file: treat as expired
            return {"token": None, "expires_at": 0}

    def _create_exclusive(self, data: bytes) -> bool:
        """Create the lease only if absent; False when it already exists (or the store lost the race)."""
        if self.root.is_local:
            path = self.root.path(LEASE)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            return True
        if self.root.protocol == "s3":
            bucket, _, key = self.root.path(LEASE).partition("/")
            try:
                self.root.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
                return True
            except Exception as exc:  # 412 PreconditionFailed: someone else created it first
                text = str(exc).lower()
                if "precondition" in text or "pre-condition" in text or "412" in text:
                    return False
                log.debug("conditional PutObject unsupported (%s); plain write, verified by read-back", exc)
        if self.root.exists(LEASE):
            return False
        self.root.write_bytes(LEASE, data)
        return True

    # ------------------------------------------------------------------ acquire / renew / release

    def acquire(self, wait_s: float = 0.0) -> None:
        """Take the lease, waiting up to ``wait_s`` seconds for another driver's to end or expire."""
        deadline = time.monotonic() + wait_s
        while True:
            current = self.read()
            if current is None:
                if self._create_exclusive(json.dumps(self._record()).encode()) and self._verify():
                    break
            elif (why := _stale(current)) is not None:
                log.warning("run root %s: taking over the lease of %s (pid %s on %s, last heartbeat %.0fs ago): %s",
                            self.root.uri, current.get("what"), current.get("pid"), current.get("host"),
                            time.time() - float(current.get("heartbeat_at", 0)), why)
                self.root.write_json(LEASE, self._record())
                if self._verify():
                    break
            if time.monotonic() >= deadline:
                raise LeaseHeldError(self._held_message(self.read()))
            time.sleep(min(5.0, max(0.5, self.ttl_s / 10)))
        self._thread = threading.Thread(target=self._heartbeat, name="u2seg-lease", daemon=True)
        self._thread.start()

    def _verify(self) -> bool:
        """Read the lease back after a pause: a driver that lost a race sees the winner's token."""
        time.sleep(VERIFY_PAUSE_S)
        current = self.read()
        return current is not None and current.get("token") == self.token

    def _held_message(self, current: dict[str, Any] | None) -> str:
        if current is None:
            return f"run root {self.root.uri}: could not take the lease"
        left = float(current.get("expires_at", 0)) - time.time()
        return (f"run root {self.root.uri} is in use by another driver: {current.get('what')} (pid "
                f"{current.get('pid')} on {current.get('host')}); its lease expires in {max(0.0, left):.0f}s "
                "unless renewed. Wait for it (--wait) or use another run root")

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                current = self.read()
                if current is None or current.get("token") != self.token:
                    self.lost = True
                    log.error("run root %s: this driver's lease was taken over by %s; stop this run", self.root.uri,
                              (current or {}).get("what"))
                    return
                self.root.write_json(LEASE, self._record())
            except Exception as exc:  # a storage blip: try again at the next beat (the lease has slack)
                log.warning("run root %s: lease heartbeat failed: %s", self.root.uri, exc)

    def check(self) -> None:
        """Raise when the lease was lost (another driver took it over): nothing more may be written."""
        if self.lost:
            raise LeaseHeldError(f"run root {self.root.uri}: the lease was taken over by another driver")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(Exception):
            current = self.read()
            if current is not None and current.get("token") == self.token:
                self.root.remove(LEASE)


def _stale(current: dict[str, Any]) -> str | None:
    """Why another driver's lease may be taken over now, or None while it is live."""
    if float(current.get("expires_at", 0)) < time.time():
        return "it has expired"
    pid = current.get("pid")
    if current.get("host") == socket.gethostname() and isinstance(pid, int) and pid != os.getpid():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "its process is gone"
        except PermissionError:  # alive, owned by another user
            return None
    return None


@contextlib.contextmanager
def hold_lease(root: RunRoot, ttl_s: float, what: str, *, wait_s: float = 0.0) -> Iterator[RunLease]:
    """Hold the run root's lease for the block; nested holds in one process share the outer lease."""
    with _held_lock:
        outer = _held.get(root.uri)
    if outer is not None:
        yield outer
        return
    lease = RunLease(root, ttl_s, what)
    lease.acquire(wait_s)
    with _held_lock:
        _held[root.uri] = lease
    try:
        yield lease
    finally:
        with _held_lock:
            _held.pop(root.uri, None)
        lease.release()
