"""A progress bar for long driver loops that also logs, so cluster logs show progress without a TTY."""

from __future__ import annotations

import logging
import time

from tqdm import tqdm

log = logging.getLogger(__name__)


class Progress:
    """tqdm bar plus a log line at most every ``log_every_s`` seconds."""

    def __init__(self, total: int, desc: str, unit: str = "it", log_every_s: float = 30.0):
        self.total, self.desc, self.unit, self.log_every_s = total, desc, unit, log_every_s
        self.done = 0
        self._t0 = self._last = time.time()
        self._bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)

    def update(self, n: int) -> None:
        self.done += n
        self._bar.update(n)
        now = time.time()
        if now - self._last >= self.log_every_s:
            self._last = now
            rate = self.done / max(now - self._t0, 1e-9)
            log.info("%s: %d/%d %s (%.2f %s/s)", self.desc, self.done, self.total, self.unit, rate, self.unit)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.close()
        log.info("%s: %d/%d %s in %.1fs", self.desc, self.done, self.total, self.unit, time.time() - self._t0)
