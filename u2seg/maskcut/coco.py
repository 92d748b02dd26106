"""Boolean masks -> COCO annotations (pycocotools RLE with str counts, xywh bbox, area)."""

from __future__ import annotations

import numpy as np
import pycocotools.mask as mask_util
import torch


def masks_to_coco(masks_full: np.ndarray | torch.Tensor) -> list[dict]:
    """One dict per input mask [n,H,W], in order: {"rle": {"size": [H, W], "counts": str},
    "bbox": [x, y, w, h] floats, "area": int}. Empty masks give area 0 and bbox [0, 0, 0, 0]."""
    if isinstance(masks_full, torch.Tensor):
        masks_full = masks_full.detach().cpu().numpy()
    arr = np.asarray(masks_full, dtype=bool)
    if arr.ndim != 3:
        raise ValueError(f"masks must be [n, H, W], got {arr.shape}")
    if arr.shape[0] == 0:
        return []
    rles = mask_util.encode(np.asfortranarray(arr.transpose(1, 2, 0).astype(np.uint8)))
    areas = mask_util.area(rles)
    boxes = mask_util.toBbox(rles)
    out = []
    for rle, area, box in zip(rles, areas, boxes, strict=True):
        counts = rle["counts"]
        out.append({
            "rle": {"size": [int(s) for s in rle["size"]],
                    "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts},
            "bbox": [float(v) for v in box],
            "area": int(area),
        })
    return out
