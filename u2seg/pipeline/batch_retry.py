"""Model calls on batches that never blame an image for a failure that is not its own.

A batched model call can fail because of the batch (out of memory on a batch of large images), because of
the machine (a transient device error), or because of one image in it (a shape the model cannot take).
:func:`call_per_item` splits a failing batch in halves down to single items; a single item that fails with
a resource or device error is retried with backoff and then raises :class:`ResourceError` (the task fails,
Ray retries it, a rerun resumes: never an error row); only an item that fails alone with an error of its
own becomes an :class:`ItemFailure`, which the stage records as an error row.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

_RESOURCE_WORDS = ("out of memory", "cuda", "cublas", "cudnn", "nccl", "hip error", "device-side", "xid",
                   "illegal memory access", "ecc error", "resource exhausted", "cannot allocate memory")


class ResourceError(RuntimeError):
    """A model call kept failing for a reason outside its input (memory, device): the task must fail."""


@dataclass(frozen=True)
class ItemFailure(Generic[T]):
    """One item that failed alone with an error of its own."""

    error: BaseException

    @property
    def error_class(self) -> str:
        reason = getattr(self.error, "reason", None)
        return type(self.error).__name__ + (f":{reason}" if reason else "")


def is_resource_error(exc: BaseException) -> bool:
    """Out-of-memory and device errors: not the input's fault (retried, never an error row)."""
    if isinstance(exc, (MemoryError, ResourceError)):
        return True
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:  # torch is a dependency; the guard keeps this module importable without it
        pass
    if isinstance(exc, RuntimeError):
        text = str(exc).lower()
        return any(word in text for word in _RESOURCE_WORDS)
    return False


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def call_per_item(fn: Callable[[list[T]], Sequence[R]], items: Sequence[T], *, what: str = "model call",
                  retries: int = 3, first_delay_s: float = 1.0, sleep: Callable[[float], None] = time.sleep
                  ) -> list[R | ItemFailure]:
    """``fn(items)`` (one result per item, in order), splitting and retrying as the module doc says."""
    items = list(items)
    if not items:
        return []
    try:
        out = list(fn(items))
    except Exception as exc:
        if len(items) > 1:
            log.warning("%s: a batch of %d failed (%s: %s); splitting it", what, len(items), type(exc).__name__,
                        str(exc)[:200])
            _free_memory()
            half = len(items) // 2
            return (call_per_item(fn, items[:half], what=what, retries=retries, first_delay_s=first_delay_s,
                                  sleep=sleep)
                    + call_per_item(fn, items[half:], what=what, retries=retries, first_delay_s=first_delay_s,
                                    sleep=sleep))
        if not is_resource_error(exc):
            log.warning("%s: an item failed on its own: %s: %s", what, type(exc).__name__, str(exc)[:500])
            return [ItemFailure(exc)]
        return [_retry_single(fn, items[0], exc, what, retries, first_delay_s, sleep)]
    if len(out) != len(items):
        raise RuntimeError(f"{what} returned {len(out)} results for {len(items)} items")
    return out


def _retry_single(fn: Callable[[list[T]], Sequence[R]], item: T, first: BaseException, what: str, retries: int,
                  first_delay_s: float, sleep: Callable[[float], None]) -> R | ItemFailure:
    """One item, failing with a resource error: retry with backoff, then fail the task."""
    delay, last = first_delay_s, first
    for attempt in range(1, retries + 1):
        log.warning("%s: resource error on a single item (attempt %d/%d: %s); retrying in %.1fs", what, attempt,
                    retries, str(last)[:200], delay)
        _free_memory()
        sleep(delay)
        delay *= 2
        try:
            return next(iter(fn([item])))
        except Exception as exc:
            if not is_resource_error(exc):
                return ItemFailure(exc)
            last = exc
    raise ResourceError(f"{what}: still failing after {retries} retries on a single item: "
                        f"{type(last).__name__}: {last}") from last
