"""The whole pipeline as one command on a tiny synthetic run shaped like coco.yaml: pseudo-labels from world A,
the model scored on a held-out world B under both protocols; then a rerun that skips every stage."""

from __future__ import annotations

import json

import pytest

from u2seg.cli import main
from u2seg.io import RunRoot

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]


def test_pipeline_runs_every_stage_and_reruns_as_noops(ray_cluster, tmp_path, capsys):
    from helpers import TINY

    from u2seg.data.synthetic import make_synthetic

    data, held_out = tmp_path / "data", tmp_path / "val"
    make_synthetic(str(data), 8, seed=1, min_size=96, max_size=128)                 # world A: training images
    make_synthetic(str(held_out), 4, seed=2, min_size=96, max_size=128, prefix="val_")  # world B: held out
    run = tmp_path / "run"
    args = ["pipeline", f"run.run_root={run}", f"manifest.inputs=[{data}/images]", *TINY,
            f"evaluate.images=[{held_out}/images]", f"evaluate.gt_panoptic_json={held_out}/gt/panoptic.json",
            f"evaluate.gt_instances_json={held_out}/gt/instances.json",
            "train.steps=2", "train.checkpoint_every=1", "train.image_size=96", "train.batch_size=1",
            "train.rounds=1", "train.score_threshold=0.0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "model/hungarian" in out and "model/u2seg" in out and "pq" in out     # both protocols side by side
    model_eval = RunRoot(str(run)).read_json("eval/model/metrics.json")
    assert model_eval["images"]["evaluated"] == 4 and set(model_eval["protocols"]) == {"hungarian", "u2seg"}
    assert "held-out" in RunRoot(str(run)).read_json("eval/labels/metrics.json")["note"]  # A and B share no image
    predicted = {r["uri"] for r in RunRoot(str(run)).read_parquet("predict/ledger").to_pylist()}
    assert len(predicted) == 4 and all("/val/images/val_" in u for u in predicted)
    root = RunRoot(str(run))
    from u2seg.pipeline.stages import STAGES

    for st in STAGES:
        assert root.exists(st.marker()), st.name
        assert root.exists(st.marker("stats.json")), st.name
    assert root.exists("config.yaml") and "config_hash" in root.read_text("config.yaml")
    for rel in ("labels/panoptic.json", "labels/instances.json", "train/round-0/model.pt", "train/round-1/model.pt",
                "selftrain/round-1/predictions/panoptic.json", "selftrain/round-1/labels/panoptic.json",
                "predict/panoptic.json", "eval/labels/metrics.json", "eval/model/report.html",
                "eval/model/metrics.json", "labels/parts", "selftrain/round-1/labels/parts", "predict/parts"):
        assert root.exists(rel), rel
    train = root.read_json("train", "stats.json")
    assert [r["round"] for r in train["rounds"]] == [0, 1]
    lines = root.read_text("train/round-0/metrics.jsonl").splitlines()
    assert json.loads(lines[-1])["step"] == 2

    # the same command again: every stage is skipped (same config hash), nothing recomputed
    assert main(args) == 0
    again = capsys.readouterr().out
    assert again.count("skipped") >= 8  # every stage but the manifest, which relists its folder
    # a changed knob reruns that stage (and the ones after it), not the ones before
    assert main([*args, "evaluate.report_images=2"]) == 0
    third = capsys.readouterr().out
    rows = {line.split()[0]: line for line in third.splitlines() if line.split() and line.split()[0] in (
        "manifest", "stuff", "extract", "cluster", "label", "train", "predict", "evaluate", "evaluate_model")}
    assert all("skipped" in rows[s] for s in ("stuff", "extract", "cluster", "label", "train", "predict"))
    assert "skipped" not in rows["evaluate"] and "skipped" not in rows["evaluate_model"]
