"""Training scalars: TensorBoard event files copied into the run root (read back with TensorBoard's own reader),
a failing copy that never fails training, and MLflow only when asked for (a clear error without the package)."""

from __future__ import annotations

import logging
import os
import sys
import types

import pytest

from u2seg.errors import UserError
from u2seg.io import RunRoot
from u2seg.pipeline.scalars import MissingPackageError, NullScalarLogger, ScalarLogger, open_scalars, require_mlflow

pytestmark = pytest.mark.unit

REL = "train/round-0/tensorboard"


def scalars_in(folder: str) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(folder)
    acc.Reload()
    return {tag: [(e.step, round(e.value, 5)) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


class FlakyRoot(RunRoot):
    """Its first ``fail`` writes fail (an outage), then writes work; counts the writes that went through."""

    def __init__(self, *args, fail: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.fail, self.written = fail, []

    def write_bytes(self, rel, data):
        if self.fail:
            self.fail -= 1
            raise ConnectionError("endpoint down")
        super().write_bytes(rel, data)
        self.written.append(rel)


def test_event_files_reach_the_run_root_at_each_sync_and_read_back(tmp_path):
    root = FlakyRoot(str(tmp_path / "run"))
    logger = ScalarLogger(root, REL)
    for step in (1, 2):
        logger.log(step, {"step": step, "rank": 0, "start_step": 0, "loss_total": 1.0 / step, "images_per_s": 3,
                          "note": "text", "flag": True})
    assert logger.sync() and len(root.written) == 1
    assert logger.sync() and len(root.written) == 1  # nothing new: nothing copied again
    logger.log(3, {"loss_total": 0.25})
    logger.close()
    assert not os.path.exists(logger.local_dir)
    got = scalars_in(str(tmp_path / "run" / REL))
    assert set(got) == {"loss_total", "images_per_s"}  # bookkeeping keys and non-numbers left out
    assert got["loss_total"] == [(1, 1.0), (2, 0.5), (3, 0.25)] and got["images_per_s"] == [(1, 3.0), (2, 3.0)]
    logger.close()  # twice is harmless


def test_a_failed_copy_is_a_warning_and_the_next_sync_copies_again(tmp_path, caplog):
    root = FlakyRoot(str(tmp_path / "run"), fail=1)
    logger = ScalarLogger(root, REL)
    logger.log(1, {"loss": 2.0})
    with caplog.at_level(logging.WARNING, logger="u2seg.pipeline.scalars"):
        assert logger.sync() is False
    assert logger.failed_syncs == 1 and "endpoint down" in caplog.text and not root.written
    logger.log(2, {"loss": 1.0})
    logger.close()
    assert scalars_in(str(tmp_path / "run" / REL)) == {"loss": [(1, 2.0), (2, 1.0)]}


def test_a_resumed_run_replaces_the_steps_past_its_checkpoint(tmp_path):
    root = RunRoot(str(tmp_path / "run"))
    first = ScalarLogger(root, REL)
    for step in (1, 2, 3, 4):  # killed after step 4; its checkpoint was at step 2
        first.log(step, {"loss": float(step)})
    first.close()
    again = ScalarLogger(root, REL, start_step=2)
    for step in (3, 4):
        again.log(step, {"loss": 10.0 + step})
    again.close()
    assert len(os.listdir(tmp_path / "run" / REL)) == 2
    assert scalars_in(str(tmp_path / "run" / REL)) == {"loss": [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0)]}


def test_only_rank_zero_logs(tmp_path):
    assert isinstance(open_scalars(RunRoot(str(tmp_path)), REL, rank=1), NullScalarLogger)
    logger = open_scalars(RunRoot(str(tmp_path)), REL, rank=0)
    assert isinstance(logger, ScalarLogger)
    logger.close()
    assert len(os.listdir(tmp_path / REL)) == 1  # rank 0's event file, even before its first scalar


def test_mlflow_without_the_package_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow -> ImportError, installed or not
    assert require_mlflow(None) is None
    with pytest.raises(MissingPackageError, match=r"train.mlflow_uri='http://mlflow:5000'.*pip install mlflow") as err:
        require_mlflow("http://mlflow:5000")
    assert isinstance(err.value, UserError) and isinstance(err.value, ImportError)
    with pytest.raises(MissingPackageError, match="mlflow package is not installed"):
        ScalarLogger(RunRoot(str(tmp_path)), REL, mlflow_uri="file:///tmp/mlruns")


def test_mlflow_gets_the_scalars_of_one_run_when_the_uri_is_set(tmp_path, monkeypatch):
    calls: list[tuple] = []
    fake = types.ModuleType("mlflow")
    fake.set_tracking_uri = lambda uri: calls.append(("uri", uri))
    fake.set_experiment = lambda name: calls.append(("experiment", name))
    fake.start_run = lambda run_name, tags: calls.append(("start", run_name, tags["u2seg.start_step"]))
    fake.log_params = lambda params: calls.append(("params", params))
    fake.log_metrics = lambda metrics, step: calls.append(("metrics", step, metrics))
    fake.end_run = lambda: calls.append(("end",))
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    logger = ScalarLogger(RunRoot(str(tmp_path)), REL, mlflow_uri="http://mlflow:5000", start_step=4,
                          params={"train.lr": 0.001})
    logger.log(5, {"step": 5, "loss": 0.5, "grad": float("nan")})
    logger.close()
    assert calls == [("uri", "http://mlflow:5000"), ("experiment", "u2seg"), ("start", "train/round-0", "4"),
                     ("params", {"train.lr": "0.001"}), ("metrics", 5, {"loss": 0.5}), ("end",)]


def test_a_failing_mlflow_server_leaves_tensorboard_going(tmp_path, monkeypatch, caplog):
    fake = types.ModuleType("mlflow")
    fake.set_tracking_uri = fake.set_experiment = lambda *a: None
    fake.start_run = lambda **k: None
    fake.end_run = lambda: None

    def down(*a, **k):
        raise ConnectionError("mlflow unreachable")

    fake.log_metrics = down
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    logger = ScalarLogger(RunRoot(str(tmp_path / "run")), REL, mlflow_uri="http://mlflow:5000")
    with caplog.at_level(logging.WARNING, logger="u2seg.pipeline.scalars"):
        logger.log(1, {"loss": 1.0})
        logger.log(2, {"loss": 0.5})
    logger.close()
    assert caplog.text.count("MLflow logging failed") == 1
    assert scalars_in(str(tmp_path / "run" / REL)) == {"loss": [(1, 1.0), (2, 0.5)]}
