"""Progress you can watch outside the terminal, on the 2-node cluster with a local run root.

One tiny pipeline (8 images, one of them broken, 2 images per extract group, 2 training steps) runs while a
background thread polls every stage's ``_PROGRESS.json``: extract's record must be seen changing (at least
two distinct ``done`` values) and end ``finished`` with done == total and its error counted by reason;
training's record is fed by Ray Train's controller at each report. After it, round 0's TensorBoard event
files are in the run root and read back with TensorBoard's own reader. A second test trains the STEGO stuff
head for 2 steps and reads ``stuff/tensorboard``.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from helpers import tiny_config

from u2seg.io import RunRoot
from u2seg.pipeline.run_stage import run_stage
from u2seg.pipeline.stages import stage

pytestmark = pytest.mark.integration

WATCHED = ("extract", "cluster", "label", "train")
KNOBS = ["run.progress_every_s=0", "extract.rows_per_part=2", "extract.batch_size=2", "train.steps=2",
         "train.checkpoint_every=1", "train.num_workers=1", "train.batch_size=1", "train.image_size=64",
         "train.rounds=0", "train.images_without_things=train", "cluster.num_shards=1"]


@dataclass
class Watcher:
    """Polls the stages' ``_PROGRESS.json`` files (as a dashboard would) and keeps every distinct record."""

    root: str
    seen: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {s: [] for s in WATCHED})
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        paths = {s: f"{self.root}/{stage(s).marker('_PROGRESS.json')}" for s in WATCHED}
        while not self.stop.is_set():
            for name, path in paths.items():
                try:
                    with open(path) as fh:
                        rec = json.load(fh)  # atomic writes: never a partial file
                except FileNotFoundError:
                    continue
                if not self.seen[name] or self.seen[name][-1] != rec:
                    self.seen[name].append(rec)
            time.sleep(0.02)


@pytest.fixture(scope="module")
def watched_run(ray_cluster, synthetic_world, tmp_path_factory):
    src = tmp_path_factory.mktemp("images")
    for p in sorted((synthetic_world / "images").iterdir())[:7]:
        shutil.copy(p, src / p.name)
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    run = tmp_path_factory.mktemp("run")
    cfg = tiny_config(str(run), [str(src)], None, *KNOBS)
    watcher = Watcher(str(run))
    thread = threading.Thread(target=watcher.run, daemon=True)
    thread.start()
    stats = {}
    try:
        for name in ("manifest", "stuff", "extract", "cluster", "label", "train"):
            stats[name] = run_stage(name, cfg)
    finally:
        time.sleep(0.2)
        watcher.stop.set()
        thread.join(10)
    return cfg, RunRoot(str(run)), watcher, stats


@pytest.mark.timeout(900)
def test_extract_progress_is_seen_changing_and_ends_finished_with_errors_by_reason(watched_run):
    _, root, watcher, stats = watched_run
    records = watcher.seen["extract"]
    dones = [r["done"] for r in records]
    assert len(set(dones)) >= 2, records
    assert dones == sorted(dones)  # never backwards
    last = records[-1]
    assert last["finished"] is True and last["done"] == last["total"] == 8 and last["unit"] == "img"
    assert last["error_count"] == 1 and sum(last["errors"].values()) == 1 == stats["extract"]["errors"]
    [reason] = last["errors"]
    error_row = root.read_parquet("extract/errors").to_pylist()[0]
    assert reason == error_row["error_class"]
    assert last["rate"] > 0 and last["eta_s"] == 0 and last["updated_at"] >= last["started_at"]
    assert all(not r["finished"] for r in records[:-1]) and last == root.read_json("extract/_PROGRESS.json")


@pytest.mark.timeout(900)
def test_every_long_loop_leaves_a_finished_record(watched_run):
    _, root, watcher, _ = watched_run
    for name, unit in (("cluster", "part"), ("label", "group")):
        rec = root.read_json(stage(name).marker("_PROGRESS.json"))
        assert rec["finished"] and rec["done"] == rec["total"] == 4 and rec["unit"] == unit, rec
    train = root.read_json("train/_PROGRESS.json")
    assert train["finished"] and train["done"] == train["total"] == 2 and train["unit"] == "step"
    assert train["phase"] == "train round-0" and train["rate"] > 0
    # fed by Ray Train's controller from the reports, before the driver's last record
    assert any(not r["finished"] and r["done"] >= 1 for r in watcher.seen["train"]), watcher.seen["train"]


@pytest.mark.timeout(900)
def test_training_scalars_are_tensorboard_event_files_in_the_run_root(watched_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, root, _, _ = watched_run
    assert root.list("train/round-0/tensorboard")
    acc = EventAccumulator(root.path("train/round-0/tensorboard"))
    acc.Reload()
    assert {"loss_total", "images_per_s"} <= set(acc.Tags()["scalars"])
    curve = [json.loads(line) for line in root.read_text("train/round-0/metrics.jsonl").splitlines()]
    assert [(e.step, round(e.value, 4)) for e in acc.Scalars("loss_total")] == \
        [(r["step"], round(r["loss_total"], 4)) for r in curve] and [r["step"] for r in curve] == [1, 2]


@pytest.mark.timeout(900)
def test_stuff_head_training_writes_tensorboard_and_progress(ray_cluster, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from u2seg.data.synthetic import make_synthetic

    make_synthetic(str(tmp_path / "pool"), 4, seed=3, min_size=64, max_size=96)
    cfg = tiny_config(str(tmp_path / "run"), [str(tmp_path / "pool" / "images")], None, "stuff.method=stego",
                      "stuff.train_images=4", "stuff.steps=2", "stuff.batch_size=2", "stuff.k=3",
                      "stuff.crop_size=32", "stuff.code_dim=8", "stuff.neighbors=2", "run.progress_every_s=0")
    run_stage("manifest", cfg)
    run_stage("stuff", cfg)
    root = RunRoot(str(tmp_path / "run"))
    acc = EventAccumulator(root.path("stuff/tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss/total")] == [1, 2]
    rec = root.read_json("stuff/_PROGRESS.json")
    assert rec["phase"] == "stuff: train" and rec["finished"] and rec["done"] == rec["total"] == 2
