"""metrics.jsonl across killed attempts: every step once, the later attempt's values win."""

from __future__ import annotations

import json

import pytest

from u2seg.io import RunRoot
from u2seg.pipeline.train import append_metrics

pytestmark = pytest.mark.unit

REL = "train/round-0/metrics.jsonl"


def _rows(steps: range, attempt: int) -> list[dict]:
    return [{"step": s, "loss": 1.0 / s, "attempt": attempt} for s in steps]


def test_a_resumed_attempt_replaces_what_the_killed_one_recorded_past_its_checkpoint(tmp_path):
    root = RunRoot(str(tmp_path))
    append_metrics(root, REL, _rows(range(1, 3), 1), keep_upto=0)   # attempt 1: checkpoint at 2
    append_metrics(root, REL, _rows(range(3, 5), 1), keep_upto=2)   # recorded 3-4, killed before ckpt 4
    root.write_text(REL, root.read_text(REL) + '{"step": 5, "lo')   # and a torn last line
    append_metrics(root, REL, _rows(range(3, 5), 2), keep_upto=2)   # attempt 2 resumes from 2
    append_metrics(root, REL, _rows(range(5, 7), 2), keep_upto=4)
    rows = [json.loads(line) for line in root.read_text(REL).splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["attempt"] for r in rows] == [1, 1, 2, 2, 2, 2]


def test_a_fresh_start_drops_an_earlier_curve(tmp_path):
    root = RunRoot(str(tmp_path))
    append_metrics(root, REL, _rows(range(1, 4), 1), keep_upto=0)
    append_metrics(root, REL, _rows(range(1, 2), 2), keep_upto=0)   # no checkpoint survived
    assert [json.loads(line)["attempt"] for line in root.read_text(REL).splitlines()] == [2]


def test_a_finished_round_is_kept_without_training_again(tmp_path):
    """More train.rounds on a finished run: round 0's stats come from its files, no worker group starts."""
    from u2seg.config import load_config
    from u2seg.pipeline.train import kept_round_stats

    root = RunRoot(str(tmp_path))
    cfg = load_config(None, ["train.steps=4"])
    assert kept_round_stats(cfg, root, 0) is None  # nothing trained yet
    append_metrics(root, REL, [{"step": s, "rank": 0, "loss_total": 5.0 - s} for s in range(1, 5)], keep_upto=0)
    assert kept_round_stats(cfg, root, 0) is None  # steps recorded, but no final model.pt: it must finish
    root.write_bytes("train/round-0/model.pt", b"weights")
    stats = kept_round_stats(cfg, root, 0)
    assert stats is not None and (stats["steps"], stats["loss_total"], stats["kept"]) == (4, 1.0, True)
    assert kept_round_stats(load_config(None, ["train.steps=6"]), root, 0) is None  # fewer steps than asked for
