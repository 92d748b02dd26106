"""Progress of a stage's long loop, where it can be watched without the terminal.

Three views of the same counts: a tqdm bar plus a log line every ``log_every_s`` (cluster logs have no
TTY); ``<stage folder>/_PROGRESS.json`` in the run root, rewritten by the driver at most every
``run.progress_every_s`` and once more when the loop ends (a watcher polls one small file, local or S3);
and Ray metrics (``u2seg_stage_*``, on the Ray cluster's Prometheus endpoint). None of them can fail a
stage: a failed progress write or metrics record is a warning.

Training loops report from Ray Train's controller: ``train_progress.ProgressCallback`` turns each
``ray.train.report`` (the checkpoints) into an update of the same record.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from u2seg.io import layout

if TYPE_CHECKING:
    from u2seg.io import RunRoot

log = logging.getLogger(__name__)

# Ray metric names (Prometheus adds the "ray_" namespace and "_total" to counters).
METRIC_DONE = "u2seg_stage_done"
METRIC_ERRORS = "u2seg_stage_errors"
METRIC_RATE = "u2seg_stage_rate"
METRIC_ETA = "u2seg_stage_eta_seconds"


def progress_record(*, stage: str, phase: str, unit: str, done: int, total: int, errors: Mapping[str, int],
                    started_at: float, now: float, start_done: int = 0, finished: bool = False,
                    failed: str | None = None) -> dict[str, Any]:
    """The ``_PROGRESS.json`` record: counts, rate over this run so far and the time left at that rate.

    ``start_done`` is what was already done when this run started (a resumed training round): the rate
    counts this run's own work only. ``eta_s`` is None while no rate is known, 0 once finished.
    """
    elapsed = max(now - started_at, 0.0)
    work = max(done - start_done, 0)
    rate = work / elapsed if elapsed > 0 and work > 0 else None
    if finished:
        eta: float | None = 0.0
    elif rate:
        eta = max(total - done, 0) / rate
    else:
        eta = None
    return {"stage": stage, "phase": phase, "started_at": round(started_at, 3), "updated_at": round(now, 3),
            "elapsed_s": round(elapsed, 3), "done": int(done), "total": int(total), "unit": unit,
            "errors": {k: int(v) for k, v in sorted(errors.items())}, "error_count": int(sum(errors.values())),
            "rate": None if rate is None else round(rate, 4), "eta_s": None if eta is None else round(eta, 1),
            "finished": bool(finished), "failed": failed}


class _Metrics:
    """The Ray metrics of every stage in this process, made once; a process without Ray metrics records nothing."""

    _made: _Metrics | None = None
    _broken = False

    def __init__(self) -> None:
        from ray.util.metrics import Counter, Gauge

        self.done = Counter(METRIC_DONE, "units of work a stage's loop has done (images, groups, parts, steps)",
                            tag_keys=("stage", "unit"))
        self.errors = Counter(METRIC_ERRORS, "inputs a stage's loop turned into error rows, by reason",
                              tag_keys=("stage", "reason"))
        self.rate = Gauge(METRIC_RATE, "units per second over the stage's loop so far", tag_keys=("stage", "unit"))
        self.eta = Gauge(METRIC_ETA, "seconds the stage's loop has left at its rate so far", tag_keys=("stage",))

    @classmethod
    def get(cls) -> _Metrics | None:
        if cls._made is None and not cls._broken:
            try:
                cls._made = cls()
            except Exception as exc:  # no Ray, or a Ray without metrics support: progress goes on without
                cls._broken = True
                log.warning("progress: Ray metrics unavailable (%s); _PROGRESS.json and logs only", exc)
        return cls._made


class StageProgress:
    """``<stage folder>/_PROGRESS.json`` and the Ray metrics of one long loop (a "phase") of a stage.

    Writes a first record when made, then at most every ``every_s`` seconds on :meth:`update`, and a last
    one on :meth:`finish` (``finished: true``) or :meth:`fail`. Picklable (Ray Train's controller holds a
    copy in ``train_progress.ProgressCallback``); the path comes from the stage table.
    """

    def __init__(self, root: RunRoot | None, stage: str, total: int, unit: str, *, phase: str | None = None,
                 every_s: float = 30.0, start_done: int | None = 0, clock: Callable[[], float] = time.time):
        from u2seg.pipeline.stages import stage as stage_of

        if total < 0:
            raise ValueError(f"progress: total must be >= 0, got {total}")
        if every_s < 0:
            raise ValueError(f"progress: every_s must be >= 0, got {every_s}")
        self.rel = stage_of(stage).marker(layout.PROGRESS)
        self.stage, self.total, self.unit, self.phase = stage, int(total), unit, phase or stage
        self.every_s, self.clock = float(every_s), clock
        # a failed write never waits out an outage: the loop it watches is not held up
        self.root = _no_retry(root) if root is not None else None
        self.start_done = start_done  # None: the first update says where this run started
        self.done = start_done or 0
        self.errors: dict[str, int] = {}
        self.started_at = clock()
        self._last_write = -math.inf
        self.writes = self.failed_writes = 0
        self.write(force=True)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "clock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.clock = time.time

    def update(self, n: int = 0, *, done: int | None = None, errors: Mapping[str, int] | None = None,
               start_done: int | None = None) -> None:
        """Count ``n`` more units (or set ``done``) and ``errors`` more error rows by reason; maybe write."""
        if self.start_done is None:  # this run resumed from here: neither the rate nor the counters count it
            self.start_done = self.done = start_done if start_done is not None else (done if done is not None else 0)
        before = self.done
        self.done = int(done) if done is not None else self.done + int(n)
        new_errors = {str(k): int(v) for k, v in (errors or {}).items() if v}
        for reason, count in new_errors.items():
            self.errors[reason] = self.errors.get(reason, 0) + count
        self._record_metrics(self.done - before, new_errors)
        self.write()

    def finish(self, done: int | None = None, *, start_done: int | None = None) -> None:
        """The loop ended: the last record (``finished: true``), whatever the throttle.

        ``done``/``start_done`` set the final counts without recording metrics: the driver closing a training
        phase whose updates (and metrics) came from Ray Train's controller through a copy of this object.
        """
        if self.start_done is None:
            self.start_done = start_done if start_done is not None else done
        if done is not None:
            self.done = int(done)
        self.write(force=True, finished=True)

    def fail(self, error: BaseException) -> None:
        """The loop raised: a last record saying so (``finished: false``, ``failed``)."""
        self.write(force=True, failed=f"{type(error).__name__}: {error}"[:500])

    @contextlib.contextmanager
    def guard(self) -> Iterator[StageProgress]:
        """Around a loop whose end the caller records itself: an exception leaves a last record saying so."""
        try:
            yield self
        except BaseException as exc:
            self.fail(exc)
            raise

    def record(self, *, finished: bool = False, failed: str | None = None) -> dict[str, Any]:
        return progress_record(stage=self.stage, phase=self.phase, unit=self.unit, done=self.done, total=self.total,
                               errors=self.errors, started_at=self.started_at, now=self.clock(),
                               start_done=self.start_done or 0, finished=finished, failed=failed)

    def write(self, *, force: bool = False, finished: bool = False, failed: str | None = None) -> bool:
        """Write the record when ``every_s`` has passed since the last write (or ``force``); never raises."""
        now = self.clock()
        if not force and now - self._last_write < self.every_s:
            return False
        self._last_write = now
        if self.root is None:
            return False
        try:
            self.root.write_json(self.rel, self.record(finished=finished, failed=failed))
            self.writes += 1
            return True
        except Exception as exc:  # progress is for watchers: it never fails the stage it watches
            self.failed_writes += 1
            log.warning("progress: could not write %s (%s: %s); the stage goes on", self.root.join(self.rel),
                        type(exc).__name__, exc)
            return False

    def _record_metrics(self, new_done: int, new_errors: Mapping[str, int]) -> None:
        metrics = _Metrics.get()
        if metrics is None:
            return
        try:
            if new_done > 0:
                metrics.done.inc(new_done, tags={"stage": self.stage, "unit": self.unit})
            for reason, count in new_errors.items():
                metrics.errors.inc(count, tags={"stage": self.stage, "reason": reason})
            rec = self.record()
            if rec["rate"] is not None:
                metrics.rate.set(rec["rate"], tags={"stage": self.stage, "unit": self.unit})
            if rec["eta_s"] is not None:
                metrics.eta.set(rec["eta_s"], tags={"stage": self.stage})
        except Exception as exc:
            log.warning("progress: a Ray metrics record failed (%s); metrics for %s stop", exc, self.stage)
            _Metrics._made, _Metrics._broken = None, True


def _no_retry(root: RunRoot) -> RunRoot:
    clone = copy.copy(root)
    clone.retry_s = 0.0
    return clone


class Progress:
    """tqdm bar plus a log line at most every ``log_every_s`` seconds; with ``root`` and ``stage`` also the
    stage's ``_PROGRESS.json`` (every ``every_s``: ``run.progress_every_s``) and its Ray metrics."""

    def __init__(self, total: int, desc: str, unit: str = "it", log_every_s: float = 30.0, *,
                 root: RunRoot | None = None, stage: str | None = None, every_s: float = 30.0):
        self.total, self.desc, self.unit, self.log_every_s = total, desc, unit, log_every_s
        self.done = 0
        self._t0 = self._last = time.time()
        self._bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)
        self.watch = StageProgress(root, stage, total, unit, phase=desc, every_s=every_s) if stage else None

    def update(self, n: int, errors: Mapping[str, int] | None = None) -> None:
        """``n`` more units done, ``errors`` of them (by reason) error rows."""
        self.done += n
        self._bar.update(n)
        if self.watch is not None:
            self.watch.update(n, errors=errors)
        now = time.time()
        if now - self._last >= self.log_every_s:
            self._last = now
            rate = self.done / max(now - self._t0, 1e-9)
            log.info("%s: %d/%d %s (%.2f %s/s)", self.desc, self.done, self.total, self.unit, rate, self.unit)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        self._bar.close()
        if self.watch is not None:
            if exc is None:
                self.watch.finish()
            else:
                self.watch.fail(exc)
        log.info("%s: %d/%d %s in %.1fs", self.desc, self.done, self.total, self.unit, time.time() - self._t0)
