"""Stage markers: skip on the same config, resume partial outputs, reset outputs of another config."""

from __future__ import annotations

import pytest

from u2seg.config import load_config
from u2seg.io import RunRoot
from u2seg.pipeline.markers import is_done, mark_done
from u2seg.pipeline.runner import _claim_outputs, run_stage

pytestmark = pytest.mark.unit


def test_claim_keeps_partial_outputs_of_the_same_config_and_drops_others(tmp_path):
    root = RunRoot(str(tmp_path))
    _claim_outputs(root, "extract", "h1")
    root.write_text("extract/masks/part-a.parquet", "partial")
    _claim_outputs(root, "extract", "h1")            # a resumed run: keep what is there
    assert root.exists("extract/masks/part-a.parquet")
    mark_done(root, "extract", "h1", {"n": 1})
    assert is_done(root, "extract", "h1") and not is_done(root, "extract", "h2")
    _claim_outputs(root, "extract", "h2")            # another config: start clean
    assert not root.exists("extract/masks/part-a.parquet")
    assert not is_done(root, "extract", "h1")


def test_run_stage_skips_when_done_and_writes_resolved_config(tmp_path):
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    (img_dir / "a.jpg").write_bytes(b"x")
    cfg = load_config(None, [f"run.run_root={tmp_path / 'run'}", f"manifest.inputs=[{img_dir}]",
                             "run.storage.secret=hunter2"])
    first = run_stage("manifest", cfg)
    assert first["images"] == 1 and "skipped" not in first
    again = run_stage("manifest", cfg)
    assert again["skipped"] is True and again["images"] == 1
    text = (tmp_path / "run" / "config.yaml").read_text()
    assert cfg.hash() in text and "hunter2" not in text
    forced = run_stage("manifest", cfg, force=True)
    assert "skipped" not in forced
