"""The finetune stage on the 2-node Ray cluster: ``init=backbone`` needs no upstream, so one tiny run (6 labeled
synthetic images, half of them fine-tuned on for 2 steps, 2 held-out images) goes through the labeled subset,
Ray Train, the predict actors and the identity-mapped evaluation; its folder holds every output, a rerun is
skipped, and ``init=u2seg`` on a run root without a trained model refuses, saying what to run first."""

from __future__ import annotations

import pytest

from u2seg.config import load_config
from u2seg.errors import UpstreamError
from u2seg.io import RunRoot, layout
from u2seg.pipeline.finetune import finetune_folder
from u2seg.pipeline.run_stage import run_stage

pytestmark = pytest.mark.integration


@pytest.mark.timeout(900)
def test_finetune_from_the_backbone_end_to_end(ray_cluster, tmp_path):
    from u2seg.data.synthetic import make_synthetic

    world, held_out = tmp_path / "world", tmp_path / "held-out"
    make_synthetic(str(world), 6, seed=0, min_size=64, max_size=96)
    make_synthetic(str(held_out), 2, seed=1, min_size=64, max_size=96, prefix="val_")
    knobs = [f"run.run_root={tmp_path / 'run'}", "finetune.init=backbone", "finetune.fraction=0.5",
             "finetune.steps=2", "finetune.batch_size=1",
             f"finetune.gt_panoptic_json={world / 'gt' / 'panoptic.json'}", "train.backbone=resnet18",
             "train.image_size=64", "train.use_gpu=no", "train.max_failures=0", "evaluate.report_images=1",
             f"evaluate.images=[{held_out / 'images'}]",
             f"evaluate.gt_panoptic_json={held_out / 'gt' / 'panoptic.json'}",
             f"evaluate.gt_instances_json={held_out / 'gt' / 'instances.json'}"]
    cfg = load_config(None, knobs)
    folder = finetune_folder(cfg)
    stats = run_stage(folder, cfg)
    assert folder == "finetune/backbone-0.5"
    assert (stats["train_images"], stats["labeled_images"], stats["train"]["steps"]) == (3, 6, 2)
    assert stats["protocol"] == "identity" and stats["images"] == 2 and 0.0 <= stats["pq"] <= 1.0
    assert "ap_segm" in stats and "ap_bbox" in stats
    root = RunRoot(str(tmp_path / "run"))
    metrics = root.read_json(f"{layout.finetune_eval(folder)}/metrics.json")
    assert list(metrics["protocols"]) == ["identity"]
    mapping = root.read_json(f"{layout.finetune_eval(folder)}/mapping.json")["protocols"]["identity"]["mapping"]
    assert mapping == {str(i): i for i in range(1, 12)}
    for rel in (layout.finetune_model(folder), layout.finetune_subset(folder), layout.finetune_categories(folder),
                layout.marker(folder)):
        assert root.exists(rel), rel
    assert not root.exists(layout.TRAIN)  # nothing outside its own folder
    assert run_stage(folder, cfg).get("skipped") is True

    u2 = load_config(None, [*knobs, "finetune.init=u2seg"])
    with pytest.raises(UpstreamError, match="run `u2seg train`"):
        run_stage(finetune_folder(u2), u2)
