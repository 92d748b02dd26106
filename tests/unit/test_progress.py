"""Stage progress for watchers: the _PROGRESS.json record's math, its throttle, its path from the stage table,
and that neither a failed write nor broken Ray metrics ever fails the loop it watches."""

from __future__ import annotations

import logging
import pickle

import pytest

from u2seg.io import RunRoot
from u2seg.pipeline import progress as progress_mod
from u2seg.pipeline.progress import Progress, StageProgress, progress_record

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class FailingRoot(RunRoot):
    """A run root whose every write fails with a transient error (an unreachable endpoint)."""

    attempts = 0

    def _write_once(self, rel, data):
        FailingRoot.attempts += 1
        raise ConnectionError("the bucket is gone")


def test_record_rate_counts_this_runs_work_and_eta_the_rest_at_that_rate():
    rec = progress_record(stage="train", phase="train round-0", unit="step", done=30, total=100,
                          errors={"b": 1, "a": 2}, started_at=100.0, now=110.0, start_done=10)
    assert rec["rate"] == 2.0 and rec["eta_s"] == 35.0 and rec["elapsed_s"] == 10.0
    assert rec["errors"] == {"a": 2, "b": 1} and list(rec["errors"]) == ["a", "b"] and rec["error_count"] == 3
    assert rec["finished"] is False and rec["failed"] is None
    idle = progress_record(stage="x", phase="x", unit="img", done=5, total=9, errors={}, started_at=100.0,
                           now=100.0, start_done=5)
    assert idle["rate"] is None and idle["eta_s"] is None  # no work yet: no rate, no guess
    done = progress_record(stage="x", phase="x", unit="img", done=9, total=9, errors={}, started_at=100.0,
                           now=103.0, finished=True)
    assert done["rate"] == 3.0 and done["eta_s"] == 0.0 and done["finished"] is True


def test_writes_first_then_at_most_every_every_s_then_last_whatever_the_throttle(tmp_path):
    root, clock = RunRoot(str(tmp_path)), Clock()
    p = StageProgress(root, "extract", total=10, unit="img", every_s=30, clock=clock)
    path = "extract/_PROGRESS.json"
    assert p.writes == 1 and root.read_json(path)["done"] == 0       # a first record at once
    clock.t += 10
    p.update(4, errors={"ImageDecodeError:truncated": 1})
    assert p.writes == 1 and root.read_json(path)["done"] == 0       # throttled
    clock.t += 25
    p.update(2)
    rec = root.read_json(path)
    assert p.writes == 2 and rec["done"] == 6 and rec["rate"] == round(6 / 35, 4)
    assert rec["eta_s"] == round(4 / (6 / 35), 1) and rec["errors"] == {"ImageDecodeError:truncated": 1}
    clock.t += 1
    p.update(4, errors={"ImageDecodeError:truncated": 1, "ImageTooSmallError": 1, "zero": 0})
    assert p.writes == 2
    p.finish()
    rec = root.read_json(path)
    assert p.writes == 3 and rec["finished"] is True and rec["done"] == rec["total"] == 10 and rec["eta_s"] == 0
    assert rec["errors"] == {"ImageDecodeError:truncated": 2, "ImageTooSmallError": 1}
    assert rec["stage"] == "extract" and rec["phase"] == "extract" and rec["unit"] == "img"
    assert rec["started_at"] == 1000.0 and rec["updated_at"] == 1036.0


def test_every_s_zero_writes_at_every_update(tmp_path):
    p = StageProgress(RunRoot(str(tmp_path)), "cluster", total=3, unit="part", every_s=0, clock=Clock())
    for _ in range(3):
        p.update(1)
    assert p.writes == 4


def test_the_path_comes_from_the_stage_table(tmp_path):
    root = RunRoot(str(tmp_path))
    StageProgress(root, "label", 1, "group")
    StageProgress(root, "evaluate", 1, "img")
    assert root.exists("labels/_PROGRESS.json") and root.exists("eval/labels/_PROGRESS.json")
    with pytest.raises(ValueError, match="unknown stage 'labelz'"):
        StageProgress(root, "labelz", 1, "group")
    with pytest.raises(ValueError, match="total must be >= 0"):
        StageProgress(root, "label", -1, "group")


def test_a_failed_write_is_a_warning_and_never_waits_out_an_outage(tmp_path, caplog):
    root = FailingRoot(str(tmp_path), retry_s=120.0)
    with caplog.at_level(logging.WARNING, logger="u2seg.pipeline.progress"):
        p = StageProgress(root, "extract", total=2, unit="img", every_s=0)
        p.update(1)
        p.finish(2)
    assert p.failed_writes == 3 and p.writes == 0 and root.retry_s == 120.0
    assert FailingRoot.attempts == 3  # one attempt per write: its own copy of the root does not retry
    assert "could not write" in caplog.text and "the bucket is gone" in caplog.text


def test_a_resumed_run_rates_only_its_own_steps_and_counts_no_metric_twice(tmp_path, monkeypatch):
    calls: list[tuple] = []

    class FakeMetric:
        def __init__(self, name):
            self.name = name

        def inc(self, value, tags):
            calls.append((self.name, value, tags))

        def set(self, value, tags):
            calls.append((self.name, value, tags))

    class FakeMetrics:
        done, errors, rate, eta = FakeMetric("done"), FakeMetric("errors"), FakeMetric("rate"), FakeMetric("eta")

    monkeypatch.setattr(progress_mod._Metrics, "get", classmethod(lambda cls: FakeMetrics))
    root, clock = RunRoot(str(tmp_path)), Clock(0.0)
    p = StageProgress(root, "train", total=1000, unit="step", phase="train round-0", start_done=None, every_s=0,
                      clock=clock)
    clock.t = 10.0
    p.update(done=600, start_done=500)  # the first report of a run resumed at step 500
    clock.t = 20.0
    p.update(done=700, start_done=650)  # a later attempt: the run still started at 500
    rec = root.read_json("train/_PROGRESS.json")
    assert rec["done"] == 700 and rec["rate"] == 10.0 and rec["eta_s"] == 30.0 and rec["phase"] == "train round-0"
    assert [c[1] for c in calls if c[0] == "done"] == [100, 100]
    assert calls[-1] == ("eta", 30.0, {"stage": "train"})
    assert ("rate", 10.0, {"stage": "train", "unit": "step"}) in calls
    p.finish(1000, start_done=0)  # the driver's copy closes the phase: counts set, no metric recorded again
    assert root.read_json("train/_PROGRESS.json")["finished"] is True
    assert [c[1] for c in calls if c[0] == "done"] == [100, 100]


def test_broken_ray_metrics_never_fail_the_loop(tmp_path, monkeypatch, caplog):
    class Exploding:
        def inc(self, *a, **k):
            raise RuntimeError("no metrics agent")

        set = inc

    class Broken:
        done = errors = rate = eta = Exploding()

    monkeypatch.setattr(progress_mod._Metrics, "_made", Broken)
    monkeypatch.setattr(progress_mod._Metrics, "_broken", False)
    with caplog.at_level(logging.WARNING, logger="u2seg.pipeline.progress"):
        p = StageProgress(RunRoot(str(tmp_path)), "predict", total=2, unit="img", every_s=0)
        p.update(1, errors={"x": 1})
        p.update(1)
    assert p.done == 2 and progress_mod._Metrics._broken and "metrics for predict stop" in caplog.text

    def no_ray_metrics(self):
        raise ImportError("no ray")

    monkeypatch.setattr(progress_mod._Metrics, "_made", None)
    monkeypatch.setattr(progress_mod._Metrics, "_broken", False)
    monkeypatch.setattr(progress_mod._Metrics, "__init__", no_ray_metrics)
    assert progress_mod._Metrics.get() is None and progress_mod._Metrics._broken


def test_progress_bar_records_the_end_and_a_failure(tmp_path):
    root = RunRoot(str(tmp_path))
    with Progress(3, "predict round 0", unit="img", root=root, stage="predict", every_s=1e9) as bar:
        bar.update(2)
        bar.update(1)
    rec = root.read_json("predict/_PROGRESS.json")
    assert rec["finished"] and rec["done"] == 3 and rec["phase"] == "predict round 0"
    with pytest.raises(RuntimeError, match="boom"), Progress(3, "label", "group", root=root, stage="label") as bar:
        bar.update(1)
        raise RuntimeError("boom")
    rec = root.read_json("labels/_PROGRESS.json")
    assert rec["finished"] is False and rec["failed"] == "RuntimeError: boom" and rec["done"] == 1
    with Progress(2, "no watcher", "it") as bar:  # without a stage: the bar alone, as before
        bar.update(2)
    assert bar.watch is None


def test_guard_records_a_failed_training_and_the_writer_pickles(tmp_path):
    root = RunRoot(str(tmp_path))
    p = StageProgress(root, "stuff", total=4, unit="step", start_done=None, every_s=0)
    with pytest.raises(ValueError), p.guard():
        raise ValueError("worker died")
    assert root.read_json("stuff/_PROGRESS.json")["failed"] == "ValueError: worker died"
    copy = pickle.loads(pickle.dumps(p))  # what Ray Train's controller gets
    copy.update(done=2, start_done=0)
    assert root.read_json("stuff/_PROGRESS.json")["done"] == 2 and callable(copy.clock)


def test_the_training_callback_feeds_the_record_from_the_reports(tmp_path):
    from u2seg.pipeline.train_progress import progress_callbacks

    root = RunRoot(str(tmp_path))
    p = StageProgress(root, "train", total=6, unit="step", start_done=None, every_s=0)
    [callback] = progress_callbacks(p)
    callback.after_report(None, [{"step": 4, "start_step": 2}, {"step": 4, "start_step": 2}], None)
    callback.after_report(None, [{"no": "step"}], None)   # ignored
    callback.after_report(None, [None], None)              # never raises
    rec = root.read_json("train/_PROGRESS.json")
    assert rec["done"] == 4 and p.start_done == 2 and rec["unit"] == "step"
