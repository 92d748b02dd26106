"""Ray Train's side of stage progress: the controller calls this after every ``ray.train.report``.

Imported only by the training drivers, when they run (it imports Ray Train).
"""

from __future__ import annotations

import logging
from typing import Any

import ray.train

from u2seg.pipeline.progress import StageProgress

log = logging.getLogger(__name__)


class ProgressCallback(ray.train.UserCallback):
    """Feeds a :class:`StageProgress` (a copy, living in the controller) from the workers' reported ``step``
    (and ``start_step``: where this run resumed); never fails training."""

    def __init__(self, progress: StageProgress):
        self.progress = progress

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        try:
            steps = [int(m["step"]) for m in metrics if m and "step" in m]
            if not steps:
                return
            starts = [int(m["start_step"]) for m in metrics if m and "start_step" in m]
            self.progress.update(done=max(steps), start_done=min(starts) if starts else None)
        except Exception as exc:
            log.warning("progress: a training report could not be recorded (%s)", exc)


def progress_callbacks(progress: StageProgress) -> list[Any]:
    """``ray.train.RunConfig(callbacks=...)`` feeding ``progress`` from each report."""
    return [ProgressCallback(progress)]
