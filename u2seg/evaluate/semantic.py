"""Semantic mIoU and pixel accuracy from a pred x gt confusion after mapping.

Ground-truth void (e.g. 255) never reaches the confusion (see `matching.OverlapAccumulator`).
By default (`unmapped="miss"`) pixels of unmapped predicted categories and void predictions are misses
for their gt class (they count in its gt area) but enlarge no predicted class's area: the prediction
said nothing usable there. U2Seg's protocol (`unmapped="ignore"`) instead sends them to its ignore
label, so they are scored nowhere, and averages IoU only over classes with gt pixels (`average="gt"`);
the default average runs over classes seen in gt or prediction (`average="seen"`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np

from u2seg.evaluate.matching import Confusion, as_confusion


def semantic_metrics(confusion: Confusion | np.ndarray, mapping: Mapping[int, int], *,
                     unmapped: Literal["miss", "ignore"] = "miss",
                     average: Literal["seen", "gt"] = "seen") -> dict:
    """mIoU (mean over the averaged classes) and pixel accuracy, values in [0, 1].

    Returns {"miou", "pixel_accuracy", "n_classes", "per_class": {gt_id: {"iou", "gt_pixels"}}}.
    """
    if unmapped not in ("miss", "ignore"):
        raise ValueError(f"unmapped must be 'miss' or 'ignore', got {unmapped!r}")
    if average not in ("seen", "gt"):
        raise ValueError(f"average must be 'seen' or 'gt', got {average!r}")
    conf = as_confusion(confusion)
    mapping = {int(k): int(v) for k, v in mapping.items()}  # tolerate JSON-loaded str keys
    col = {int(g): j for j, g in enumerate(conf.gt_ids.tolist())}
    n_gt = len(col)
    tp = np.zeros(n_gt, dtype=np.int64)
    pred_area = np.zeros(n_gt, dtype=np.int64)
    scored = np.zeros(n_gt, dtype=np.int64)  # gt pixels whose prediction is mapped
    for i, p in enumerate(conf.pred_ids.tolist()):
        if p not in mapping:
            continue
        g = int(mapping[p])
        if g not in col:
            raise ValueError(f"mapping sends pred {p} to {g}, not a gt category of this confusion")
        tp[col[g]] += conf.counts[i, col[g]]
        pred_area[col[g]] += conf.counts[i].sum()
        scored += conf.counts[i]
    gt_area = conf.counts.sum(axis=0) + conf.unassigned if unmapped == "miss" else scored
    union = gt_area + pred_area - tp
    present = union > 0 if average == "seen" else (gt_area > 0) & (union > 0)
    iou = np.divide(tp, union, out=np.zeros(n_gt, dtype=np.float64), where=union > 0)
    total = int(gt_area.sum())
    return {
        "miou": float(iou[present].mean()) if present.any() else 0.0,
        "pixel_accuracy": float(tp.sum() / total) if total else 0.0,
        "n_classes": int(present.sum()),
        "per_class": {int(g): {"iou": float(iou[j]), "gt_pixels": int(gt_area[j])}
                      for g, j in col.items() if present[j]},
    }
