"""Unit tests for `u2seg bench selftrain`: its settings load, its numbers come from metrics.json, the verdict's
arithmetic, and the CLI's --out FILE.json / --override. The bench itself (a whole pipeline twice over) takes
tens of minutes on two CPU cores, so it is run by hand (README), not here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from u2seg.bench import selftrain
from u2seg.bench.selftrain import LABEL_SETTINGS, QUICK_SETTINGS, TRAIN_SETTINGS, claim, read_scores
from u2seg.config import load_config
from u2seg.io import RunRoot

pytestmark = pytest.mark.unit


def _block(pq: float) -> dict[str, Any]:
    part = {"pq": pq, "sq": 0.8, "rq": pq / 0.8, "n": 3}
    return {"summary": {"mapped_categories": 4}, "panoptic": {"All": part, "Things": part, "Stuff": part},
            "semantic": {"miou": 0.5, "pixel_accuracy": 0.7},
            "instance": {"class_aware": {"segm": {"AP": 0.1, "AP50": 0.2}, "bbox": {"AP": 0.15}}}}


def test_settings_are_valid_knobs() -> None:
    for extra in ([], QUICK_SETTINGS):
        cfg = load_config(None, ["run.run_root=/tmp/x", "manifest.inputs=[/tmp/a]", *LABEL_SETTINGS,
                                 *TRAIN_SETTINGS, *extra])
        assert cfg.extract.backbone.startswith("vit_")  # the pseudo-labels' features stay a ViT
        assert cfg.extract.weights == "none" and cfg.train.use_gpu == "no"


def test_the_held_out_labels_run_on_world_b_alone_with_world_a_stuff_head(tmp_path: Path) -> None:
    a, b = tmp_path / "world-a", tmp_path / "world-b"
    cfgs = selftrain.bench_configs(tmp_path, a, b, [*LABEL_SETTINGS, *TRAIN_SETTINGS])
    held = cfgs["heldout_labels"]
    assert held.run.run_root != cfgs["labels"].run.run_root == cfgs["round0"].run.run_root
    assert [str(p) for p in held.manifest.inputs] == [f"{b}/images"]  # none of world A's images
    assert held.stuff.checkpoint == f"{tmp_path}/run/stuff/head.pt"  # the stuff head world A trained
    assert held.evaluate.gt_panoptic_json == cfgs["round0"].evaluate.gt_panoptic_json == f"{b}/gt/panoptic.json"
    assert cfgs["labels"].evaluate.gt_panoptic_json == f"{a}/gt/panoptic.json"
    assert cfgs["round0"].train.rounds == 0 and cfgs["round1"].train.rounds == 1


def test_read_scores_takes_each_protocol_from_metrics_json(tmp_path: Path) -> None:
    root = RunRoot(str(tmp_path))
    root.write_json("eval/model/metrics.json", {"images": {"evaluated": 2, "gt": 2},
                                                "protocols": {"hungarian": _block(0.3), "u2seg": _block(0.4)}})
    scores = read_scores(root, "eval/model")
    assert scores["images"]["evaluated"] == 2
    assert scores["hungarian"]["pq"] == 0.3 and scores["u2seg"]["pq"] == 0.4
    assert scores["hungarian"]["ap_segm"] == 0.1 and scores["hungarian"]["ap_bbox"] == 0.15
    assert scores["u2seg"]["miou"] == 0.5 and "ap_agnostic_segm" not in scores["u2seg"]  # absent stays absent


def test_claim_compares_pq_per_protocol() -> None:
    labels = {"images": {}, "hungarian": {"pq": 0.2}, "u2seg": {"pq": 0.3}}
    round0 = {"images": {}, "hungarian": {"pq": 0.25}, "u2seg": {"pq": 0.1}}
    round1 = {"images": {}, "hungarian": {"pq": 0.22}, "u2seg": {"pq": 0.35}}
    out = claim(labels, round0, round1)
    assert out["hungarian"] == {"pq_labels": 0.2, "pq_round0": 0.25, "pq_round1": 0.22, "round0_beats_labels": True,
                                "round1_beats_labels": True, "round1_beats_round0": False}
    assert out["u2seg"]["round0_beats_labels"] is False and out["u2seg"]["round1_beats_round0"] is True
    assert claim(labels, {"images": {}}, round1) == {}  # a protocol missing on one side is not compared


def test_cli_writes_the_named_json_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from u2seg.cli import main

    seen: dict[str, Any] = {}

    def fake(**kwargs: Any) -> dict[str, Any]:
        seen.update(kwargs)
        return {"claim": {}}

    monkeypatch.setattr(selftrain, "bench_selftrain", fake)
    out = tmp_path / "sub" / "result.json"
    assert main(["bench", "selftrain", "--quick", "--out", str(out), "--work", str(tmp_path / "w"),
                 "--override", "train.steps=3", "train.lr=0.001"]) == 0
    assert json.loads(out.read_text())["benchmark"] == "selftrain"
    assert seen["quick"] is True and list(seen["overrides"]) == ["train.steps=3", "train.lr=0.001"]
    assert seen["work"] == str(tmp_path / "w")
    with pytest.raises(ValueError, match="no config overrides"):
        main(["bench", "manifest", "--out", str(tmp_path), "--override", "train.steps=3"])
