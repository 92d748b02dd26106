"""Panoptic merge of thing pseudo-masks and the stuff map, and the COCO panoptic format rules.

Rules (docs/method.md, panoptic merge; COCO panoptic): every pixel belongs to exactly one segment or
to void (id 0); things are painted over stuff, higher score first, and never share a pixel; each
stuff category is at most one segment per image; stuff connected fragments below a minimum area
become void. Category ids: thing cluster c -> c + 1 (1..k_things), stuff cluster s ->
k_things + 1 + s.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
from scipy import ndimage

from u2seg.labels.masks import MaskLike, decode_mask, segment_stats

MAX_SEGMENT_ID = 256**3 - 1  # largest id an RGB panoptic PNG can encode


@dataclass
class PanopticResult:
    """One image's panoptic label.

    seg_ids: int32 [H, W] segment id per pixel, 0 = void.
    segments_info: COCO panoptic segments (id, category_id, area, bbox xywh, iscrowd=0); things
        first in paint order, then stuff by category id.
    semantic: int32 [H, W] category id per pixel, 0 = void / ignore (for a semantic label PNG).
    thing_sources: segment id -> index of the input thing it came from (things that lost all
        their pixels, or were filtered, are absent), so callers can keep instances consistent.
    """

    seg_ids: np.ndarray
    segments_info: list[dict[str, Any]]
    semantic: np.ndarray
    thing_sources: dict[int, int] = field(default_factory=dict)


def _area_threshold(value: float, n_pixels: int) -> float:
    """Areas below 1 are fractions of the image; 1 and above are pixel counts."""
    if value < 0:
        raise ValueError(f"area threshold must be >= 0, got {value}")
    return value * n_pixels if value < 1 else float(value)


def _paint_things(
    masks: Sequence[MaskLike],
    classes: Sequence[int],
    scores: Sequence[float] | None,
    hw: tuple[int, int],
    *,
    k_things: int,
    min_area: float,
    max_occluded_fraction: float,
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Paint things by descending score (stable); returns the id map and (input index, category)."""
    if len(classes) != len(masks) or (scores is not None and len(scores) != len(masks)):
        raise ValueError("thing_masks, thing_classes and thing_scores must have the same length")
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable") if scores is not None \
        else np.arange(len(masks))
    seg_ids = np.zeros(hw, dtype=np.int32)
    kept: list[tuple[int, int]] = []
    for idx in order.tolist():
        cls = int(classes[idx])
        if not 0 <= cls < k_things:
            raise ValueError(f"thing class {cls} outside 0..{k_things - 1}")
        mask = decode_mask(masks[idx])
        if mask.shape != hw:
            raise ValueError(f"thing mask {idx} has shape {mask.shape}, expected {hw}")
        full = int(mask.sum())
        visible = mask & (seg_ids == 0)
        area = int(visible.sum())
        if area == 0 or area < min_area or (full - area) > max_occluded_fraction * full:
            continue
        seg_ids[visible] = len(kept) + 1
        kept.append((idx, cls + 1))
    return seg_ids, kept


def _stuff_segments(
    stuff: np.ndarray, free: np.ndarray, *, k_stuff: int | None, min_area: float
) -> tuple[np.ndarray, list[int]]:
    """Per stuff class, keep its 8-connected fragments of at least ``min_area`` free pixels.

    Returns a map of stuff cluster id + 1 (0 = none) and the sorted list of surviving clusters.
    Each class is labelled inside its own bounding box, so the cost follows the class extents
    rather than K full-image passes.
    """
    shifted = np.where(free & (stuff >= 0), stuff + 1, 0)
    if k_stuff is not None and shifted.size and int(shifted.max()) > k_stuff:
        raise ValueError(f"stuff id {int(shifted.max()) - 1} outside 0..{k_stuff - 1}")
    out = np.zeros(stuff.shape, dtype=np.int32)
    survivors: list[int] = []
    for cls, box in enumerate(ndimage.find_objects(shifted)):
        if box is None:
            continue
        region = (shifted[box] == cls + 1).astype(np.uint8)
        # connectedComponents + bincount is ~10x faster than connectedComponentsWithStats here.
        n, comp = cv2.connectedComponents(region, connectivity=8, ltype=cv2.CV_32S)
        keep = np.bincount(comp.ravel(), minlength=n) >= min_area
        keep[0] = False  # label 0 is the background of this class's binary crop
        if not keep.any():
            continue
        out[box][keep[comp]] = cls + 1
        survivors.append(cls)
    return out, survivors


def panoptic_merge(
    thing_masks: Sequence[MaskLike],
    thing_classes: Sequence[int],
    thing_scores: Sequence[float] | None,
    stuff: np.ndarray,
    *,
    k_things: int,
    k_stuff: int | None = None,
    min_stuff_area: float = 64,
    min_thing_area: float = 16,
    max_occluded_fraction: float = 1.0,
) -> PanopticResult:
    """Merge thing masks (0-based cluster ids) over a stuff map (0-based ids, <0 = void) into one image.

    Things are painted in descending score (ties: input order) and a later thing only gets pixels
    no earlier thing took; a thing left with fewer than ``min_thing_area`` pixels, or with more than
    ``max_occluded_fraction`` of its mask already taken, is dropped and its pixels fall back to stuff.
    Remaining pixels take their stuff class; each stuff class's 8-connected fragments smaller than
    ``min_stuff_area`` become void, and the rest of the class is one segment. Area thresholds below
    1 are fractions of H*W. ``k_stuff`` (optional) only range-checks the stuff ids.
    """
    stuff = np.asarray(stuff)
    if stuff.ndim != 2:
        raise ValueError(f"stuff must be 2-D, got shape {stuff.shape}")
    hw = (int(stuff.shape[0]), int(stuff.shape[1]))
    n_pixels = hw[0] * hw[1]
    thing_map, kept = _paint_things(
        thing_masks, thing_classes, thing_scores, hw, k_things=k_things,
        min_area=_area_threshold(min_thing_area, n_pixels), max_occluded_fraction=max_occluded_fraction)
    stuff_map_, survivors = _stuff_segments(
        stuff.astype(np.int32, copy=False), thing_map == 0, k_stuff=k_stuff,
        min_area=_area_threshold(min_stuff_area, n_pixels))
    n_things = len(kept)
    if n_things + len(survivors) > MAX_SEGMENT_ID:
        raise ValueError("too many segments for a panoptic PNG")

    seg_ids = thing_map.copy()
    categories: dict[int, int] = {}
    thing_sources: dict[int, int] = {}
    for seg, (idx, cat) in enumerate(kept, start=1):
        categories[seg] = cat
        thing_sources[seg] = idx
    # Stuff segment ids follow the things; a lookup table maps stuff id + 1 -> segment id.
    lut = np.zeros(int(stuff_map_.max()) + 1, dtype=np.int32)
    for offset, cls in enumerate(survivors, start=1):
        seg = n_things + offset
        lut[cls + 1] = seg
        categories[seg] = k_things + 1 + cls
    stuff_pixels = stuff_map_ > 0
    seg_ids[stuff_pixels] = lut[stuff_map_[stuff_pixels]]

    cat_lut = np.zeros(n_things + len(survivors) + 1, dtype=np.int32)
    for seg, cat in categories.items():
        cat_lut[seg] = cat
    semantic = cat_lut[seg_ids]

    stats = segment_stats(seg_ids)
    segments_info = [
        {"id": seg, "category_id": cat, "area": stats[seg][0], "bbox": stats[seg][1], "iscrowd": 0}
        for seg, cat in sorted(categories.items())
    ]
    return PanopticResult(seg_ids=seg_ids, segments_info=segments_info, semantic=semantic,
                          thing_sources=thing_sources)


def _category_table(categories: Iterable[Mapping[str, Any]] | None) -> dict[int, bool] | None:
    if categories is None:
        return None
    return {int(c["id"]): bool(c.get("isthing", 1)) for c in categories}


def validate_panoptic(
    seg_ids: np.ndarray,
    segments_info: Sequence[Mapping[str, Any]],
    *,
    categories: Iterable[Mapping[str, Any]] | None = None,
) -> list[str]:
    """Every way (seg_ids, segments_info) breaks the COCO panoptic format; empty when valid.

    Checks: 2-D integer map with ids in 0..2^24-1; unique, positive segment ids; every non-zero id
    in the map listed and every listed id present; area and bbox equal to the pixels; iscrowd in
    {0, 1}; category ids positive (and known, when ``categories`` is given, which also enforces
    at most one segment per stuff category).
    """
    problems: list[str] = []
    seg_ids = np.asarray(seg_ids)
    if seg_ids.ndim != 2 or not np.issubdtype(seg_ids.dtype, np.integer):
        return [f"seg_ids must be a 2-D integer array, got {seg_ids.dtype} {seg_ids.shape}"]
    if seg_ids.size and (int(seg_ids.min()) < 0 or int(seg_ids.max()) > MAX_SEGMENT_ID):
        problems.append(f"segment ids outside 0..{MAX_SEGMENT_ID}")
    known = _category_table(categories)
    stats = segment_stats(seg_ids)
    listed: set[int] = set()
    stuff_seen: dict[int, int] = {}
    for pos, seg in enumerate(segments_info):
        missing = [k for k in ("id", "category_id", "area", "bbox", "iscrowd") if k not in seg]
        if missing:
            problems.append(f"segment #{pos}: missing keys {missing}")
            if "id" not in seg:
                continue
        sid = int(seg["id"])
        if sid <= 0:
            problems.append(f"segment #{pos}: id {sid} is not positive (0 is void)")
        if sid in listed:
            problems.append(f"segment id {sid}: listed more than once")
        listed.add(sid)
        cat = seg.get("category_id")
        if cat is not None:
            if int(cat) <= 0:
                problems.append(f"segment id {sid}: category_id {cat} is not positive")
            elif known is not None and int(cat) not in known:
                problems.append(f"segment id {sid}: unknown category_id {cat}")
            elif known is not None and not known[int(cat)]:
                if int(cat) in stuff_seen:
                    problems.append(f"segment id {sid}: stuff category {cat} already has segment "
                                    f"{stuff_seen[int(cat)]}")
                stuff_seen[int(cat)] = sid
        if "iscrowd" in seg and seg["iscrowd"] not in (0, 1):
            problems.append(f"segment id {sid}: iscrowd {seg['iscrowd']!r} not 0 or 1")
        if sid not in stats:
            if sid > 0:
                problems.append(f"segment id {sid}: listed but has no pixels in the PNG")
            continue
        area, bbox = stats[sid]
        if "area" in seg and int(seg["area"]) != area:
            problems.append(f"segment id {sid}: area {seg['area']} != {area} pixels")
        if "bbox" in seg and [float(v) for v in seg["bbox"]] != [float(v) for v in bbox]:
            problems.append(f"segment id {sid}: bbox {list(seg['bbox'])} != {bbox}")
    for sid in sorted(set(stats) - listed):
        problems.append(f"segment id {sid}: in the PNG but not in segments_info")
    return problems


def semantic_from_panoptic(seg_ids: np.ndarray, segments_info: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Category id per pixel (0 = void) of a panoptic segment map and its segments."""
    lut = np.zeros(int(seg_ids.max()) + 1 if seg_ids.size else 1, np.int32)
    for s in segments_info:
        if int(s["id"]) < len(lut):
            lut[int(s["id"])] = int(s["category_id"])
    return lut[seg_ids]
