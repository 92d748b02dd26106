"""Self-training's relabelling: round R's label set = round R-1's labels merged with round R-1's predictions.

Per image (``u2seg.labels.relabel.merge_predictions``): the previous pseudo things stay (they win
overlaps), confident predicted things that do not duplicate one are added, the previous stuff stays.
The merged set is written to ``selftrain/round-R/labels`` (a label set), group by group.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from u2seg.config import U2SegConfig
from u2seg.io import RunRoot, layout
from u2seg.io.labelset import Fragment, LabelSet

log = logging.getLogger(__name__)


def build_round_labels(cfg: U2SegConfig, root: RunRoot, r: int) -> dict[str, Any]:
    """Write ``round_labels(r)`` from ``round_labels(r - 1)`` and ``round_predictions(r - 1)``."""
    from u2seg.labels.relabel import merge_predictions

    k_things, k_stuff = layout.class_counts(root)
    prev = LabelSet(root, layout.round_labels(r - 1), k_things, k_stuff)
    pred = LabelSet(root, layout.round_predictions(r - 1), k_things, k_stuff)
    out = LabelSet(root, layout.round_labels(r), k_things, k_stuff)
    predicted = {im.image_id: im for im in pred.iter_images()}
    out.clear()
    added_total = 0
    for group in prev.groups():
        merged = Fragment()
        for row in prev.read_group(group, ["image_id", "uri", "png", "segments"]):
            image_id = row["image_id"]
            old_seg = prev.read_panoptic(prev.rel(row["png"]))
            p = predicted.get(image_id)
            new_seg = pred.read_panoptic(p.png) if p else np.zeros_like(old_seg)
            result, added = merge_predictions(
                old_seg, row["segments"], new_seg, p.segments if p else [], k_things=k_things,
                k_stuff=k_stuff, score_threshold=cfg.train.score_threshold, dedup_iou=cfg.train.dedup_iou,
                min_stuff_area=cfg.label.min_stuff_area, min_thing_area=cfg.label.min_thing_area)
            added_total += added
            merged.add(out.write_image(group, image_id, row["uri"], result.seg_ids, result.segments_info,
                                       semantic=result.semantic))
        out.commit(group, merged)
    counts = out.finish(f"u2seg self-training labels, round {r}", cfg.label.coco_max_images)
    log.info("selftrain round %d: %d predicted things added to the labels", r, added_total)
    return {"round": r, "added_things": added_total, **counts}
