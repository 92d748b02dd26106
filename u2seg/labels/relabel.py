"""Self-training's relabelling of one image: the previous pseudo-label plus the model's confident things.

Pure (numpy): the pipeline's self-training rounds call :func:`merge_predictions` per image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from u2seg.labels.panoptic import PanopticResult, panoptic_merge


def merge_predictions(old_seg: np.ndarray, old_segments: Sequence[Mapping[str, Any]], new_seg: np.ndarray,
                      new_segments: Sequence[Mapping[str, Any]], *, k_things: int, k_stuff: int,
                      score_threshold: float, dedup_iou: float, min_stuff_area: float,
                      min_thing_area: float) -> tuple[PanopticResult, int]:
    """One image's merged panoptic label and how many predicted things were added.

    The previous pseudo things stay and win overlaps; predicted things scoring at least
    ``score_threshold`` that do not duplicate a previous thing (mask IoU above ``dedup_iou``) are added;
    the previous stuff map stays under them.
    """
    stuff = np.full(old_seg.shape, -1, np.int32)
    masks, classes, scores = [], [], []
    for s in old_segments:
        m = old_seg == s["id"]
        if s["category_id"] > k_things:
            stuff[m] = s["category_id"] - k_things - 1
        else:
            masks.append(m)
            classes.append(s["category_id"] - 1)
            scores.append(2.0)  # previous pseudo-labels outrank predictions where they overlap
    n_old_things = len(masks)
    added = 0
    for s in new_segments:
        if s["category_id"] > k_things or s.get("score", 0.0) < score_threshold:
            continue
        m = new_seg == s["id"]
        ious = [np.logical_and(m, o).sum() / max(np.logical_or(m, o).sum(), 1) for o in masks[:n_old_things]]
        if ious and max(ious) > dedup_iou:
            continue
        masks.append(m)
        classes.append(s["category_id"] - 1)
        scores.append(float(s["score"]))
        added += 1
    result = panoptic_merge(masks, classes, scores, stuff, k_things=k_things, k_stuff=k_stuff,
                            min_stuff_area=min_stuff_area, min_thing_area=min_thing_area)
    return result, added
