"""Binary masks <-> COCO RLE, and per-segment area/bbox statistics: the one pycocotools wrapper.

Masks travel through the run root as COCO compressed RLE with ``counts`` as ``str`` (that is what
JSON and the Parquet MASKS_SCHEMA hold); pycocotools wants bytes and Fortran order, so every
conversion goes through here instead of being repeated at each call site.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from scipy import ndimage

MaskLike = np.ndarray | Mapping[str, Any]

_DIRECT_MAX_ID = 1 << 16


def _json_rle(rle: Mapping[str, Any]) -> dict[str, Any]:
    """pycocotools' RLE with ``counts`` as str and ``size`` as plain ints (what JSON and Parquet hold)."""
    counts = rle["counts"]
    return {"size": [int(rle["size"][0]), int(rle["size"][1])],
            "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """Encode a 2-D boolean mask as COCO compressed RLE with JSON-ready ``counts`` (str)."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    return _json_rle(mask_utils.encode(np.asfortranarray(mask.astype(np.uint8, copy=False))))


def encode_masks(masks: np.ndarray) -> list[dict[str, Any]]:
    """COCO fields of a stack of boolean masks ``[n, H, W]`` (CPU torch tensors convert too), in order.

    One dict per mask: ``{"rle": {"size": [H, W], "counts": str}, "bbox": [x, y, w, h] floats,
    "area": int}``; an empty mask gives area 0 and bbox [0, 0, 0, 0]. The whole stack goes through
    pycocotools in one call (one Fortran-order copy) instead of one call per mask.
    """
    arr = np.asarray(masks, dtype=bool)
    if arr.ndim != 3:
        raise ValueError(f"masks must be [n, H, W], got shape {arr.shape}")
    if arr.shape[0] == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(arr.transpose(1, 2, 0).astype(np.uint8)))
    areas, boxes = mask_utils.area(rles), mask_utils.toBbox(rles)
    return [{"rle": _json_rle(rle), "bbox": [float(v) for v in box], "area": int(area)}
            for rle, area, box in zip(rles, areas, boxes, strict=True)]


def _to_compressed(rle: Mapping[str, Any]) -> dict[str, Any]:
    """pycocotools-ready RLE: bytes counts; uncompressed (list) counts are compressed first."""
    size = [int(rle["size"][0]), int(rle["size"][1])]
    counts = rle["counts"]
    if isinstance(counts, list):
        return mask_utils.frPyObjects({"size": size, "counts": counts}, size[0], size[1])
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return {"size": size, "counts": counts}


def decode_mask(mask: MaskLike) -> np.ndarray:
    """A boolean HxW array from a boolean/0-1 array or a COCO RLE dict (str, bytes or list counts)."""
    if isinstance(mask, Mapping):
        return mask_utils.decode(_to_compressed(mask)).astype(bool)
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {arr.shape}")
    return arr.astype(bool, copy=False)


def mask_area_bbox(mask: MaskLike) -> tuple[int, list[float]]:
    """(area, [x, y, w, h]) as pycocotools computes them, so JSON agrees with COCOeval."""
    rle = _to_compressed(mask) if isinstance(mask, Mapping) else _to_compressed(encode_rle(decode_mask(mask)))
    return int(mask_utils.area(rle)), [float(v) for v in mask_utils.toBbox(rle)]


def segment_stats(seg_ids: np.ndarray) -> dict[int, tuple[int, list[int]]]:
    """Map every non-zero id in an id map to (area, [x, y, w, h]) in one pass over the pixels.

    ``find_objects`` allocates one slot per label, so small ids (what ``panoptic_merge`` makes) are
    used directly and arbitrary 24-bit ids are first compacted with ``np.unique``.
    """
    if seg_ids.ndim != 2:
        raise ValueError(f"seg_ids must be 2-D, got shape {seg_ids.shape}")
    if seg_ids.size == 0:
        return {}
    if int(seg_ids.min()) >= 0 and int(seg_ids.max()) <= _DIRECT_MAX_ID:
        labels = seg_ids.astype(np.int32, copy=False)
        counts = np.bincount(labels.ravel())[1:]
        ids = np.arange(1, counts.size + 1)
    else:  # label j + 1 stands for ids[j]
        ids, inverse, counts = np.unique(seg_ids, return_inverse=True, return_counts=True)
        labels = inverse.reshape(seg_ids.shape).astype(np.int32) + 1
    stats: dict[int, tuple[int, list[int]]] = {}
    for sid, area, box in zip(ids.tolist(), counts.tolist(), ndimage.find_objects(labels), strict=True):
        if sid == 0 or box is None:
            continue
        ys, xs = box
        stats[int(sid)] = (int(area), [int(xs.start), int(ys.start), int(xs.stop - xs.start),
                                       int(ys.stop - ys.start)])
    return stats
