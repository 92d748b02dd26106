"""Training scalars as TensorBoard event files in the run root, and to MLflow when ``train.mlflow_uri`` is set.

TensorBoard writes to a local temporary folder (its writer appends to files, which S3 cannot); the event
files are copied to ``<run root>/<rel>/`` at each :meth:`ScalarLogger.sync` (the training loops call it at
each checkpoint) and at :meth:`ScalarLogger.close`, so ``tensorboard --logdir s3://...`` (or a local copy)
works for every run root. Rank 0 logs; other ranks get a :class:`NullScalarLogger`. A failed copy or MLflow
call is a warning: scalars never fail training. ``metrics.jsonl`` beside stays the record of the curve.
"""

from __future__ import annotations

import logging
import math
import os
import posixpath
import shutil
import tempfile
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from u2seg.errors import UserError

if TYPE_CHECKING:
    from u2seg.io import RunRoot

log = logging.getLogger(__name__)

# bookkeeping keys of the loops' metric rows: not scalars
SKIP_KEYS = frozenset({"step", "rank", "start_step"})


class MissingPackageError(UserError, ImportError):
    """A knob asks for an optional package that is not installed."""


def require_mlflow(uri: str | None) -> Any:
    """The ``mlflow`` module when ``uri`` is set (None otherwise); a clear error when it is not installed.

    The training drivers call it before starting workers, so a missing package fails in seconds.
    """
    if not uri:
        return None
    try:
        import mlflow
    except ImportError as exc:
        raise MissingPackageError(f"train.mlflow_uri={uri!r} is set but the mlflow package is not installed: "
                                  "`pip install mlflow` on the driver and the training workers, or unset "
                                  "train.mlflow_uri") from exc
    return mlflow


class NullScalarLogger:
    """What ranks other than 0 log: nothing."""

    def log(self, step: int, scalars: Mapping[str, Any]) -> None:
        pass

    def sync(self) -> bool:
        return True

    def close(self) -> None:
        pass


class ScalarLogger:
    """TensorBoard event files under ``<root>/<rel>/`` (and an MLflow run when ``mlflow_uri`` is given).

    ``start_step``: where a resumed run starts; TensorBoard then drops the earlier attempts' events past it
    (``purge_step``), as ``metrics.jsonl`` does, so each step appears once in the curve.
    """

    def __init__(self, root: RunRoot, rel: str, *, mlflow_uri: str | None = None, run_name: str | None = None,
                 start_step: int = 0, experiment: str = "u2seg", params: Mapping[str, Any] | None = None):
        from torch.utils.tensorboard import SummaryWriter

        mlflow = require_mlflow(mlflow_uri)
        self.root, self.rel = root, rel.strip("/")
        self.local_dir = tempfile.mkdtemp(prefix="u2seg-tensorboard-")
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.local_dir, True)
        self._writer = SummaryWriter(log_dir=self.local_dir, purge_step=start_step + 1 if start_step > 0 else None)
        self._copied: dict[str, int] = {}  # event file -> size at its last copy
        self._closed = False
        self.failed_syncs = 0
        self._mlflow = None
        if mlflow is not None:
            try:
                mlflow.set_tracking_uri(mlflow_uri)
                mlflow.set_experiment(experiment)
                mlflow.start_run(run_name=run_name or posixpath.dirname(self.rel) or self.rel,
                                 tags={"u2seg.run_root": root.uri, "u2seg.tensorboard": root.join(self.rel),
                                       "u2seg.start_step": str(start_step)})
                if params:
                    mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
                self._mlflow = mlflow
            except Exception as exc:
                log.warning("scalars: MLflow at %s unavailable (%s); TensorBoard only", mlflow_uri, exc)

    def log(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Record the numeric values of ``scalars`` at ``step`` (bookkeeping keys and non-numbers are left out)."""
        values = {k: float(v) for k, v in scalars.items()
                  if k not in SKIP_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for key, value in values.items():
            self._writer.add_scalar(key, value, step)
        if self._mlflow is not None and values:
            try:
                self._mlflow.log_metrics({k: v for k, v in values.items() if math.isfinite(v)}, step=step)
            except Exception as exc:
                log.warning("scalars: MLflow logging failed (%s); TensorBoard only from now", exc)
                self._mlflow = None

    def sync(self) -> bool:
        """Copy the event files that grew since their last copy to the run root; False (a warning) on failure."""
        if self._closed:
            return True
        self._writer.flush()
        ok = True
        for name in sorted(os.listdir(self.local_dir)):
            path = os.path.join(self.local_dir, name)
            if not os.path.isfile(path) or self._copied.get(name) == os.path.getsize(path):
                continue
            size = os.path.getsize(path)
            try:
                with open(path, "rb") as fh:
                    self.root.write_bytes(posixpath.join(self.rel, name), fh.read())
                self._copied[name] = size
            except Exception as exc:  # scalars never fail training; the next sync copies the file again
                ok = False
                self.failed_syncs += 1
                log.warning("scalars: could not copy %s to %s (%s: %s)", name, self.root.join(self.rel),
                            type(exc).__name__, exc)
        return ok

    def close(self) -> None:
        """Last copy, then the writer, the MLflow run and the local folder go."""
        if self._closed:
            return
        self._writer.close()
        self.sync()
        self._closed = True
        if self._mlflow is not None:
            try:
                self._mlflow.end_run()
            except Exception as exc:
                log.warning("scalars: MLflow end_run failed (%s)", exc)
        self._cleanup()


def open_scalars(root: RunRoot, rel: str, *, rank: int = 0, **kwargs: Any) -> ScalarLogger | NullScalarLogger:
    """A :class:`ScalarLogger` on rank 0, a :class:`NullScalarLogger` elsewhere (the loops call both alike)."""
    return ScalarLogger(root, rel, **kwargs) if rank == 0 else NullScalarLogger()
