"""Stage markers: skip on the same config, resume partial outputs, reset outputs of another config."""

from __future__ import annotations

import pytest

from u2seg.config import load_config
from u2seg.io import RunRoot
from u2seg.pipeline.markers import is_done, mark_done
from u2seg.pipeline.run_stage import claim_outputs, run_stage
from u2seg.pipeline.stages import stage

pytestmark = pytest.mark.unit


def test_claim_keeps_partial_outputs_of_the_same_config_and_drops_others(tmp_path):
    root = RunRoot(str(tmp_path))
    extract = stage("extract")
    claim_outputs(root, extract, "h1", "h1")
    root.write_text("extract/masks/part-a.parquet", "partial")
    root.write_text("extract/images/.tmp-dead-part-b.parquet", "a killed writer's temp file")
    claim_outputs(root, extract, "h1", "h1")            # a resumed run: keep what is there, drop temp files
    assert root.exists("extract/masks/part-a.parquet")
    assert not root.exists("extract/images/.tmp-dead-part-b.parquet")
    mark_done(root, extract, "h1", {"n": 1})
    assert is_done(root, extract, "h1") and not is_done(root, extract, "h2")
    claim_outputs(root, extract, "h2", "h2")            # another config: start clean
    assert not root.exists("extract/masks/part-a.parquet")
    assert not is_done(root, extract, "h1")


def test_a_when_done_stage_keeps_its_previous_results_until_it_replaces_them(tmp_path):
    root = RunRoot(str(tmp_path))
    evaluate = stage("evaluate")
    claim_outputs(root, evaluate, "h1", "h1")
    root.write_text("eval/labels/metrics.json", "{}")
    mark_done(root, evaluate, "h1", {})
    claim_outputs(root, evaluate, "h2", "h2")           # another config: the old results stay until replaced
    assert root.exists("eval/labels/metrics.json") and is_done(root, evaluate, "h1")


def test_keep_across_keys_do_not_reset_outputs(tmp_path):
    """train keeps its finished rounds when only train.rounds changes; any other change resets it."""
    train = stage("train")
    base = load_config("demo")
    more_rounds = load_config("demo", ["train.rounds=3"])
    other = load_config("demo", ["train.lr=0.5"])
    assert train.config_hash(base) != train.config_hash(more_rounds)
    assert train.reset_hash(base) == train.reset_hash(more_rounds) != train.reset_hash(other)
    root = RunRoot(str(tmp_path))
    claim_outputs(root, train, train.config_hash(base), train.reset_hash(base))
    root.write_text("train/round-0/model.pt", "weights")
    claim_outputs(root, train, train.config_hash(more_rounds), train.reset_hash(more_rounds))
    assert root.exists("train/round-0/model.pt")
    claim_outputs(root, train, train.config_hash(other), train.reset_hash(other))
    assert not root.exists("train/round-0/model.pt")


def test_run_stage_skips_when_done_and_writes_resolved_config(tmp_path):
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    (img_dir / "a.jpg").write_bytes(b"x")
    cfg = load_config(None, [f"run.run_root={tmp_path / 'run'}", f"manifest.inputs=[{img_dir}]",
                             "run.storage.secret=hunter2", "manifest.refresh=false"])
    first = run_stage("manifest", cfg)
    assert first["images"] == 1 and "skipped" not in first and first["reason"] == "not run yet"
    again = run_stage("manifest", cfg)
    assert again["skipped"] is True and again["images"] == 1
    text = (tmp_path / "run" / "config.yaml").read_text()
    assert cfg.hash() in text and "hunter2" not in text
    forced = run_stage("manifest", cfg, force=True)
    assert "skipped" not in forced
    relisted = run_stage("manifest", load_config(None, [f"run.run_root={tmp_path / 'run'}",
                                                        f"manifest.inputs=[{img_dir}]"]))
    assert relisted["reason"].startswith("config changed: manifest.refresh")


class FlakyRayInit:
    """Stands in for ``ray.init``/``ray.shutdown``: fails the first ``failures`` starts with ``error``."""

    def __init__(self, failures: int, error: str) -> None:
        self.failures, self.error, self.calls, self.shutdowns = failures, error, [], 0

    def init(self, **kwargs):
        self.calls.append(kwargs)
        if len(self.calls) <= self.failures:
            raise Exception(self.error)

    def shutdown(self):
        self.shutdowns += 1


@pytest.mark.parametrize(("failures", "error", "expect_calls", "raises"), [
    (2, "The current node timed out during startup. ...", 3, False),   # slow machine: third try starts
    (3, "The current node timed out during startup. ...", 3, True),    # gives up after the attempts
    (1, "permission denied: /tmp/ray", 1, True),                       # other errors are not retried
])
def test_local_ray_start_retries_only_a_start_up_timeout(monkeypatch, failures, error, expect_calls, raises):
    import ray

    from u2seg.pipeline import ray_session as runner

    fake = FlakyRayInit(failures, error)
    monkeypatch.setattr(ray, "init", fake.init)
    monkeypatch.setattr(ray, "shutdown", fake.shutdown)
    monkeypatch.setattr(runner.time, "sleep", lambda s: None)
    stopped: list[int] = []
    monkeypatch.setattr(runner, "stop_ray_children", lambda: stopped.append(1) or 0)  # spare the session Ray
    if raises:
        with pytest.raises(Exception, match=error.split(":")[0][:20]):
            runner.start_local_ray(num_cpus=2)
    else:
        runner.start_local_ray(num_cpus=2)
    assert len(fake.calls) == expect_calls and fake.shutdowns == min(failures, expect_calls)
    hook = {"worker_process_setup_hook": "u2seg.pipeline.ray_session.quiet_worker_logs"}
    assert all(c == {"address": "local", "runtime_env": hook, "num_cpus": 2} for c in fake.calls)
    assert len(stopped) == (expect_calls - 1 if "timed out" in error else 0)


STOP_CHILDREN_SCRIPT = """
import subprocess, sys
from u2seg.pipeline import ray_session as runner
sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
ray_like = subprocess.Popen([*sleeper, "/site-packages/ray/core/src/ray/raylet/raylet"])
other = subprocess.Popen(sleeper)
stopped = runner.stop_ray_children()
alive = other.poll() is None
other.kill()
print(stopped, alive)
"""


def test_stop_ray_children_kills_only_ray_processes():
    """In a child process: this test process's own children include the session's Ray cluster."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", STOP_CHILDREN_SCRIPT], capture_output=True, text=True, timeout=60,
                         check=True).stdout.split()
    assert out == ["1", "True"], out
