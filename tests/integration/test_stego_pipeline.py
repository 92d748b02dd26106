"""The STEGO stuff stage on the 2-node cluster: a head trained with Ray Train, applied in the extract pass,
painted by label; a grown bucket keeps the head (stable stuff classes); a loaded checkpoint replaces training."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from helpers import check_run_root_consistent, tiny_config

from u2seg.io import RunRoot
from u2seg.io.labelset import LabelSet
from u2seg.pipeline.run_pipeline import run_pipeline

pytestmark = pytest.mark.integration

STAGES = ("manifest", "stuff", "extract", "cluster", "label")
STEGO = ["stuff.method=stego", "stuff.train_images=6", "stuff.steps=4", "stuff.batch_size=2", "stuff.k=4",
         "stuff.crop_size=32", "stuff.code_dim=8", "stuff.neighbors=3", "label.thing_order=bbox_area",
         "label.stuff_overlap_drop=0.7", "label.min_stuff_area=0", "label.min_thing_area=0"]


def test_stego_head_trained_applied_and_kept(ray_cluster, tmp_path):
    from u2seg.data.synthetic import make_synthetic

    pool = tmp_path / "pool"
    make_synthetic(str(pool), 8, seed=2, min_size=64, max_size=96)
    src, run = tmp_path / "images", tmp_path / "run"
    src.mkdir()
    names = sorted(p.name for p in (pool / "images").iterdir())
    for n in names[:7]:
        shutil.copy(pool / "images" / n, src / n)
    cfg = tiny_config(str(run), [str(src)], None, *STEGO)
    first = run_pipeline(cfg, stages=STAGES)["stages"]
    root = RunRoot(str(run))
    stuff = first["stuff"]
    assert stuff["method"] == "stego" and stuff["steps"] == 4 and stuff["images"] == 6 and stuff["crops"] == 30
    assert root.exists("stuff/head.pt")
    curve = [json.loads(line) for line in root.read_text("stuff/metrics.jsonl").splitlines()]
    assert [r["step"] for r in curve] == [1, 2, 3, 4] and all(np.isfinite(r["loss/total"]) for r in curve)
    ledger = [r for r in root.read_parquet("extract/images").to_pylist() if r["status"] == "ok"]
    assert ledger and all(len(r["stuff_classes"]) == r["grid_h"] * r["grid_w"] == 64 for r in ledger)
    assert all(max(r["stuff_classes"]) < 4 for r in ledger) and not root.exists("cluster/stuff.npy")
    assert root.read_parquet("extract/patches").num_rows == 0  # no k-means sample with STEGO
    pan = LabelSet(root, "labels").panoptic_dict()
    merged = root.read_json("labels/panoptic.json")  # a small set also gets the merged file, equal to the parts
    assert {k: merged[k] for k in ("images", "annotations", "categories")} == pan
    k_things = 4
    assert len(pan["categories"]) == k_things + 4
    stuff_ids = {s["category_id"] for a in pan["annotations"] for s in a["segments_info"]
                 if s["category_id"] > k_things}
    assert stuff_ids and stuff_ids <= set(range(k_things + 1, k_things + 5))
    check_run_root_consistent(root)

    # a grown bucket: the head stays (same file, same stuff class ids), only the new image is extracted
    head = root.read_bytes("stuff/head.pt")
    shutil.copy(pool / "images" / names[7], src / names[7])
    again = run_pipeline(cfg, stages=STAGES)["stages"]
    assert again["stuff"]["kept"] is True and root.read_bytes("stuff/head.pt") == head
    assert again["extract"]["processed_now"] == 1
    check_run_root_consistent(root)

    # stuff.checkpoint: a trained head (here: ours, in STEGO's key format) is loaded instead of training
    ckpt = tmp_path / "stego.pt"
    import torch

    torch.save({"state_dict": torch.load(str(run / "stuff/head.pt"), weights_only=True)["state_dict"]}, ckpt)
    other = tiny_config(str(tmp_path / "run2"), [str(src)], None, *STEGO, f"stuff.checkpoint={ckpt}")
    loaded = run_pipeline(other, stages=("manifest", "stuff"))["stages"]["stuff"]
    assert loaded["loaded"] == str(ckpt) and loaded["k"] == 4
