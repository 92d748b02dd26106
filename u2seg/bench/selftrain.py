"""Does the model beat its pseudo-labels? Held-out PQ of the pseudo-labels, the model, and the model after one
CutLER self-training round, on the synthetic world, on CPU.

U2Seg's central claim is that a model trained on the pseudo-labels segments better than the pseudo-labels
themselves, and better again after self-training. This benchmark measures that claim end to end through the
real stages (manifest -> stuff -> extract -> cluster -> label -> train -> predict -> evaluate), reading every
number from the evaluate stage's ``metrics.json`` (no metric is recomputed here):

- world A (``make_synthetic`` seed 0) is the unlabeled training set; world B (seed 1, ``val_`` names) is the
  held-out labeled set (``evaluate.images``), on which the model never trains;
- the pseudo-labels the model trains on exist only on world A: they are scored against world A's ground truth;
- the held-out PQ of the pseudo-labels: the same labelling method run on world B in a run root of its own (its
  images only; world A's STEGO head loaded, MaskCut, its own k-means, the merge), scored against world B's
  ground truth. This is the number the model must beat (the same images, the same ground truth);
- round 0 (trained on the pseudo-labels) and round 1 (one self-training round: round 0's confident predictions
  on world A replace the pseudo things, then training continues from round 0) are each scored on world B.

Round 0 is trained and scored with ``train.rounds=0``; ``train.rounds=1`` then keeps round 0 (the train stage's
``keep_across``) and adds round 1, which predict and evaluate_model score again.

The feature backbone of the pseudo-labels is a random-init ViT-S/8 (no downloads; a fixed seed), so the
pseudo-labels are what random features give on this world; the detector is a small CNN trained from scratch.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from u2seg.config import U2SegConfig, load_config
from u2seg.io import RunRoot, layout

log = logging.getLogger(__name__)

LABEL_STAGES = ("manifest", "stuff", "extract", "cluster", "label")
HEADLINE = ("pq", "sq", "rq", "pq_things", "pq_stuff", "miou", "pixel_accuracy", "miou_inplace",
            "ap_segm", "ap50_segm", "ap_bbox", "ap50_bbox", "ap_agnostic_segm", "mapped_categories")

# Pseudo-labels from a random-init ViT-S/8 (DINO's architecture, no weights: nothing is downloaded) on small
# images: MaskCut at 128 px, U2Seg's crop descriptors, a STEGO stuff head trained for a few steps (the demo's), and
# as many clusters as the world has classes (6 things, 5 stuff).
LABEL_SETTINGS = [
    "extract.backbone=vit_small_patch8_224.dino", "extract.weights=none", "extract.image_size=128",
    "extract.n_masks=3", "extract.batch_size=4", "extract.rows_per_part=8", "extract.amp=none",
    "extract.num_actors=2", "extract.min_actors=2",
    "extract.descriptor=crop_cls", "extract.crop_size=64",
    "stuff.method=stego", "stuff.k=5", "stuff.steps=20", "stuff.batch_size=4", "stuff.crop_size=64",
    "stuff.neighbors=3", "stuff.train_images=16",
    "cluster.things_k=6", "cluster.niter=15", "cluster.num_shards=2",
    "label.thing_order=bbox_area", "label.stuff_overlap_drop=0.7", "label.min_stuff_area=0",
    "label.min_thing_area=0", "run.max_error_fraction=0.5",
]
# A detector small enough to train on two shared CPU cores: ResNet-18 + FPN from scratch at 128 px with small heads
# (128 sampled proposals, 128-channel pyramid and mask head of 2 convs, 256-wide box head; Detectron2's sizes cost
# ~5x more per step on CPU), Mask R-CNN's standard heads, AdamW at 1e-3 with a short warmup, 2 DDP workers of one
# image each (one thread each), 600 steps a round (~0.7 s a step: the whole bench takes ~20 minutes on an idle
# 2-core machine; 120 steps were too few for the detector to fire on things). Round 1 trains as many steps again,
# from round 0's model, on CutLER's relabel (threshold 0.7) with nested duplicate predictions suppressed (mask IoU
# > 0.5): without that, each object enters round 1 as several pseudo instances. Detections are painted into the
# panoptic from 0.3 (a briefly trained model scores low).
TRAIN_SETTINGS = [
    "train.backbone=resnet18", "train.weights=none", "train.image_size=128", "train.num_workers=2",
    "train.batch_size=1", "train.steps=600", "train.optimizer=adamw", "train.lr=0.001", "train.weight_decay=0.0001",
    "train.warmup_steps=20", "train.warmup_factor=0.01", "train.clip=global", "train.clip_norm=1.0",
    "train.roi_heads=standard", "train.roi_batch_size=128", "train.fpn_channels=128", "train.box_head_dim=256",
    "train.mask_head_convs=2", "train.checkpoint_every=100", "train.use_gpu=no", "train.max_failures=0",
    "train.score_threshold=0.7", "train.selftrain_pred_nms=0.5", "predict.panoptic_score_threshold=0.3",
    "predict.rows_per_part=8", "predict.num_actors=2", "predict.min_actors=2",
]
QUICK_SETTINGS = [
    "extract.image_size=64", "stuff.method=kmeans", "extract.descriptor=mask_pool", "extract.n_masks=2",
    "train.image_size=96", "train.steps=4", "train.warmup_steps=2", "train.checkpoint_every=4",
]


def make_worlds(tmp: Path, n_train: int, n_heldout: int, min_size: int, max_size: int) -> tuple[Path, Path]:
    """World A (seed 0) for the pseudo-labels, world B (seed 1, ``val_`` names) held out."""
    from u2seg.data.synthetic import make_synthetic

    world_a, world_b = tmp / "world-a", tmp / "world-b"
    for path, n, seed, prefix in ((world_a, n_train, 0, ""), (world_b, n_heldout, 1, "val_")):
        if not (path / "gt" / "panoptic.json").exists():  # a kept work folder reuses its worlds
            make_synthetic(str(path), n, seed=seed, min_size=min_size, max_size=max_size, prefix=prefix)
    return world_a, world_b


def gt_overrides(world: Path) -> list[str]:
    return [f"evaluate.gt_panoptic_json={world}/gt/panoptic.json", f"evaluate.gt_panoptic_dir={world}/gt/panoptic",
            f"evaluate.gt_instances_json={world}/gt/instances.json"]


def read_scores(root: RunRoot, folder: str) -> dict[str, Any]:
    """The evaluate stage's own numbers: image counts and each protocol's headline metrics from metrics.json."""
    from u2seg.evaluate.summary import block_stats, protocol_blocks

    metrics = root.read_json(layout.eval_metrics(folder))
    out: dict[str, Any] = {"images": metrics["images"]}
    for name, block in protocol_blocks(metrics).items():
        flat = block_stats(block)
        out[name] = {k: flat[k] for k in HEADLINE if flat.get(k) is not None}
    return out


def _timed(phases: dict[str, float], reused: dict[str, Any], name: str, stage: str,
           cfg: U2SegConfig) -> dict[str, Any]:
    """Run one stage, timing it; a stage a kept work folder already holds is skipped by the runner, and the
    wall time of the run that made it (its stats.json) goes to ``reused``."""
    from u2seg.pipeline.run_stage import run_stage

    t0 = time.time()
    stats = run_stage(stage, cfg)
    phases[name] = round(time.time() - t0, 2)
    if stats.get("skipped"):
        reused[name] = stats.get("wall_s")
    return stats


def _train_curve(root: RunRoot, round_idx: int) -> dict[str, Any]:
    """First / last recorded total loss of a round (is it learning at all?) and its steady step time."""
    import json

    rows = [json.loads(line) for line in root.read_text(layout.round_metrics(round_idx)).splitlines()
            if line]
    rows = sorted((r for r in rows if r.get("rank", 0) == 0), key=lambda r: r["step"])
    tail = rows[-min(50, len(rows)):]
    head = rows[:min(50, len(rows))]

    def mean(rs: Sequence[dict[str, Any]], key: str) -> float:
        return round(sum(float(r[key]) for r in rs) / len(rs), 4)

    out = {"steps": rows[-1]["step"], "loss_total_first50": mean(head, "loss_total"),
           "loss_total_last50": mean(tail, "loss_total"),
           "s_per_step": round(rows[-1]["elapsed_s"] / max(1, rows[-1]["step"] - rows[0].get("start_step", 0)), 3)}
    for key in sorted(k for k in rows[-1] if k.startswith("loss_") and k != "loss_total"):
        out[f"{key}_last50"] = mean(tail, key)
    return out


def bench_configs(base: Path, world_a: Path, world_b: Path, settings: Sequence[str]) -> dict[str, U2SegConfig]:
    """The bench's four configs: world A's labels (scored on A), rounds 0 and 1 (trained on A, scored on B), and
    the held-out labels (the same method on world B alone, in ``run-heldout-labels`` with world A's stuff head)."""
    common = [f"run.run_root={base / 'run'}", f"manifest.inputs=[{world_a}/images]", "run.ray_num_cpus=4",
              "run.seed=0", *settings]
    held_out = [f"evaluate.images=[{world_b}/images]", *gt_overrides(world_b)]
    return {
        "labels": load_config(None, [*common, *gt_overrides(world_a)]),
        "round0": load_config(None, [*common, *held_out, "train.rounds=0"]),
        "round1": load_config(None, [*common, *held_out, "train.rounds=1"]),
        "heldout_labels": load_config(None, [
            *common, f"run.run_root={base / 'run-heldout-labels'}", f"manifest.inputs=[{world_b}/images]",
            f"stuff.checkpoint={base / 'run' / layout.STUFF_HEAD}", *gt_overrides(world_b)]),
    }


def bench_selftrain(*, quick: bool = False, n_train: int | None = None, n_heldout: int | None = None,
                    overrides: Sequence[str] = (), work: str | None = None) -> dict[str, Any]:
    """Pseudo-labels on world A, the model of round 0 and of round 1 on held-out world B; see the module doc.

    ``work`` keeps the worlds and the run root there (a rerun with other ``train.*`` overrides then relabels
    nothing: every stage whose config is unchanged is skipped); without it they go to a temporary folder.
    """
    import ray

    n_train = n_train or (6 if quick else 32)
    n_heldout = n_heldout or (3 if quick else 16)
    min_size, max_size = (96, 128) if quick else (128, 192)
    if work is None:
        with tempfile.TemporaryDirectory(prefix="u2seg-bench-selftrain-") as tmp:
            return bench_selftrain(quick=quick, n_train=n_train, n_heldout=n_heldout, overrides=overrides, work=tmp)
    base = Path(work).resolve()
    base.mkdir(parents=True, exist_ok=True)
    phases: dict[str, float] = {}
    reused: dict[str, Any] = {}
    t0 = time.time()
    world_a, world_b = make_worlds(base, n_train, n_heldout, min_size, max_size)
    phases["synth"] = round(time.time() - t0, 2)
    settings = [*LABEL_SETTINGS, *TRAIN_SETTINGS, *(QUICK_SETTINGS if quick else []), *overrides]
    cfgs = bench_configs(base, world_a, world_b, settings)
    cfg_labels, cfg_round0, cfg_round1 = cfgs["labels"], cfgs["round0"], cfgs["round1"]
    root = RunRoot(cfg_labels.run.run_root)
    heldout_root = RunRoot(cfgs["heldout_labels"].run.run_root)
    try:
        counts: dict[str, Any] = {}
        for stage in LABEL_STAGES:
            stats = _timed(phases, reused, stage, stage, cfg_labels)
            counts[stage] = {k: stats[k] for k in ("images", "manifest_images", "masks_assigned", "instances",
                                                    "segments_now") if k in stats}
        _timed(phases, reused, "evaluate_labels", "evaluate", cfg_labels)
        labels = read_scores(root, layout.EVAL_LABELS)
        for stage in (*LABEL_STAGES, "evaluate"):
            _timed(phases, reused, f"heldout_{stage}", stage, cfgs["heldout_labels"])
        labels_heldout = read_scores(heldout_root, layout.EVAL_LABELS)
        _timed(phases, reused, "train_round0", "train", cfg_round0)
        _timed(phases, reused, "predict_round0", "predict", cfg_round0)
        _timed(phases, reused, "evaluate_round0", "evaluate_model", cfg_round0)
        round0 = read_scores(root, layout.EVAL_MODEL)
        train1 = _timed(phases, reused, "selftrain_round1", "train", cfg_round1)  # predict A, relabel, train round 1
        _timed(phases, reused, "predict_round1", "predict", cfg_round1)
        _timed(phases, reused, "evaluate_round1", "evaluate_model", cfg_round1)
        round1 = read_scores(root, layout.EVAL_MODEL)
        curves = {f"round{r}": _train_curve(root, r) for r in (0, 1)}
        relabel = next((r for r in train1.get("rounds", []) if r.get("round") == 1), {})
    finally:
        if ray.is_initialized():
            ray.shutdown()
    verdict = claim(labels_heldout, round0, round1)
    return {
        "config": {"quick": quick, "device": "cpu", "world_a": {"seed": 0, "images": n_train},
                   "world_b_held_out": {"seed": 1, "images": n_heldout}, "image_px": [min_size, max_size],
                   "settings": settings, "feature_weights": "none (random-init ViT, run.seed=0)"},
        "note": ("the pseudo-labels the model trains on exist only on world A: scored against world A's ground "
                 "truth; the same labelling method run on world B alone (world A's stuff head) gives the held-out "
                 "pseudo-labels the claim compares with; round 0 and round 1 models are scored on held-out world "
                 "B, which no stage trained on; all numbers are read from eval/*/metrics.json (fractions in "
                 "[0, 1])"),
        "pseudo_labels_on_world_a": labels,
        "pseudo_labels_on_world_b": labels_heldout,
        "model_round0_on_world_b": round0,
        "model_round1_on_world_b": round1,
        "claim": verdict,
        "training": {**curves, "selftrain_relabel": {k: relabel.get(k) for k in (
            "predicted_images", "pred_things", "old_kept", "old_replaced")}},
        "stage_counts": counts,
        "phase_wall_s": phases,
        "reused_stages_wall_s": reused,  # stages made by an earlier run in --work: their own wall time then
    }


def claim(labels: dict[str, Any], round0: dict[str, Any], round1: dict[str, Any]) -> dict[str, Any]:
    """Per protocol: does the model's PQ beat the held-out pseudo-labels' (the same images), and does self-training
    add to it?"""
    out: dict[str, Any] = {}
    for proto in (p for p in labels if p != "images"):
        pq_l, pq_0, pq_1 = (d.get(proto, {}).get("pq") for d in (labels, round0, round1))
        if None in (pq_l, pq_0, pq_1):
            continue
        out[proto] = {"pq_labels": pq_l, "pq_round0": pq_0, "pq_round1": pq_1,
                      "round0_beats_labels": pq_0 > pq_l, "round1_beats_labels": pq_1 > pq_l,
                      "round1_beats_round0": pq_1 > pq_0}
    return out
