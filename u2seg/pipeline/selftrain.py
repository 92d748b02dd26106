"""Self-training's relabelling: round R's label set from round R-1's labels and round R-1's predictions.

Per image, CutLER's rule (``u2seg.labels.selftrain.relabel_image``): the model's predictions scoring at
least ``train.score_threshold`` become pseudo things, with their full predicted masks (the prediction set's
``instances``, ``u2seg/pipeline/predict.py``); a previous pseudo thing (a thing segment of the previous
label) stays only while its mask IoU with every such prediction is below ``train.selftrain_iou``. The new
things are merged over the stuff with the label stage's rules (``label.thing_order``,
``label.stuff_overlap_drop``, ``label.min_thing_area``, ``label.min_stuff_area``); the stuff is the previous
label's (``train.selftrain_stuff=labels``) or the model's semantic head (``model``: the prediction set's
semantic PNG). An image the model did not predict keeps its previous things.

The work streams a label group at a time (Ray Data tasks, as the label stage): each task reads its group's
previous part and the prediction parts holding its images (found through a small image -> group index),
writes its PNGs, then commits the group's part to ``selftrain/round-R/labels``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from u2seg.config import LabelConfig, TrainConfig, U2SegConfig
from u2seg.io import RunRoot, layout
from u2seg.io.labelset import Fragment, LabelSet

log = logging.getLogger(__name__)

COUNTS = ("images", "pred_things", "old_kept", "old_replaced")


def prediction_index(pred: LabelSet) -> dict[str, str]:
    """u2seg image id -> the prediction group holding it (the parts' id column only)."""
    return {r["image_id"]: r["group"] for r in pred.iter_rows(["group", "image_id"])}


def _image_predictions(pred: LabelSet, group: str) -> dict[str, dict[str, Any]]:
    """u2seg image id -> its prediction row (png, instances) in one prediction group."""
    return {r["image_id"]: r for r in pred.read_group(group, ["image_id", "png", "instances"])}


def relabel_group(group: str, root: RunRoot, r: int, index: dict[str, str], train_cfg: TrainConfig,
                  label_cfg: LabelConfig) -> dict[str, int]:
    """Write round ``r``'s labels of previous-label group ``group``; returns its counts (``COUNTS``)."""
    from u2seg.labels import decode_mask, decode_semantic_png
    from u2seg.labels.selftrain import panoptic_stuff, relabel_image, semantic_stuff

    k_things, k_stuff = layout.class_counts(root)
    prev = LabelSet(root, layout.round_labels(r - 1), k_things, k_stuff)
    pred = LabelSet(root, layout.round_predictions(r - 1), k_things, k_stuff)
    out = LabelSet(root, layout.round_labels(r), k_things, k_stuff)
    pred_groups: dict[str, dict[str, dict[str, Any]]] = {}
    counts = dict.fromkeys(COUNTS, 0)
    merged = Fragment()
    for row in prev.read_group(group, ["image_id", "uri", "png", "segments"]):
        image_id, segments = row["image_id"], row["segments"]
        old_seg = prev.read_panoptic(prev.rel(row["png"]))
        pred_group = index.get(image_id)
        if pred_group is not None and pred_group not in pred_groups:
            pred_groups[pred_group] = _image_predictions(pred, pred_group)
        predicted = pred_groups[pred_group].get(image_id) if pred_group is not None else None
        instances = predicted["instances"] if predicted else []
        masks = np.stack([decode_mask(a["segmentation"]) for a in instances]) if instances else \
            np.zeros((0, *old_seg.shape), bool)
        if train_cfg.selftrain_stuff == "model" and predicted is not None:
            semantic_png = predicted["png"].replace("panoptic/", "semantic/", 1)
            stuff = semantic_stuff(decode_semantic_png(root.read_bytes(pred.rel(semantic_png))), k_things)
        else:  # "labels", or an image without predictions: the previous stuff stays
            stuff = panoptic_stuff(old_seg, segments, k_things)
        try:
            res = relabel_image(
                old_seg, segments, masks, [int(a["category_id"]) - 1 for a in instances],
                [float(a.get("score", 1.0)) for a in instances], stuff, k_things=k_things, k_stuff=k_stuff,
                score_threshold=train_cfg.score_threshold, iou_threshold=train_cfg.selftrain_iou,
                pred_nms=train_cfg.selftrain_pred_nms,
                min_stuff_area=label_cfg.min_stuff_area, min_thing_area=label_cfg.min_thing_area,
                thing_order=label_cfg.thing_order, stuff_overlap_drop=label_cfg.stuff_overlap_drop)
        except ValueError as exc:
            raise ValueError(f"self-training round {r}: image {image_id} ({row['uri']}): {exc}") from exc
        p = res.panoptic
        merged.add(out.write_image(group, image_id, row["uri"], p.seg_ids, p.segments_info, semantic=p.semantic,
                                   thing_scores=res.thing_scores, write_semantic=label_cfg.write_semantic))
        counts["images"] += 1
        counts["pred_things"] += res.pred_things
        counts["old_kept"] += res.old_kept
        counts["old_replaced"] += res.old_replaced
    out.commit(group, merged)
    return counts


def build_round_labels(cfg: U2SegConfig, root: RunRoot, r: int) -> dict[str, Any]:
    """Write ``round_labels(r)`` from ``round_labels(r - 1)`` and ``round_predictions(r - 1)``, a group per task."""
    import ray

    k_things, k_stuff = layout.class_counts(root)
    prev = LabelSet(root, layout.round_labels(r - 1), k_things, k_stuff)
    pred = LabelSet(root, layout.round_predictions(r - 1), k_things, k_stuff)
    out = LabelSet(root, layout.round_labels(r), k_things, k_stuff)
    out.clear()
    index = prediction_index(pred)
    groups = prev.groups()
    totals = dict.fromkeys(COUNTS, 0)
    if groups:
        train_cfg, label_cfg = cfg.train, cfg.label

        def batch(b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # the index travels with the function
            rows = [relabel_group(str(g), root, r, index, train_cfg, label_cfg) for g in b["group"]]
            return {k: np.array([row[k] for row in rows]) for k in COUNTS}

        ds = ray.data.from_items([{"group": g} for g in groups]).map_batches(batch, batch_size=1, num_cpus=1)
        for row in ds.iter_rows():
            for k in COUNTS:
                totals[k] += int(row[k])
    merged = out.finish(f"u2seg self-training labels, round {r}", cfg.label.coco_max_images)
    log.info("selftrain round %d: %d images, %d predicted things taken, %d previous things kept, %d replaced",
             r, totals["images"], totals["pred_things"], totals["old_kept"], totals["old_replaced"])
    return {"round": r, **totals, "instances": merged["instances"], "parts": merged["parts"]}
