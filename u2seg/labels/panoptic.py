"""Panoptic merge of thing pseudo-masks and the stuff map, and the COCO panoptic format rules.

Rules (docs/method.md, panoptic merge; COCO panoptic): every pixel belongs to exactly one segment or
to void (id 0); things are painted over stuff, higher score first (or U2Seg's larger bbox first,
smaller overwriting), and never share a pixel; each stuff category is at most one segment per
image; stuff connected fragments below a minimum area become void (and, optionally, a stuff class
mostly under things, as U2Seg). Category ids: thing cluster c -> c + 1 (1..k_things), stuff
cluster s -> k_things + 1 + s.
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


THING_ORDERS = ("score", "bbox_area")


def _bbox_area(mask: np.ndarray) -> int:
    """w * h of the mask's tight pixel box (pycocotools ``toBbox``), 0 for an empty mask."""
    rows = np.flatnonzero(mask.any(1))
    if rows.size == 0:
        return 0
    cols = np.flatnonzero(mask.any(0))
    return int(rows[-1] - rows[0] + 1) * int(cols[-1] - cols[0] + 1)


def _paint_things(
    masks: Sequence[MaskLike],
    classes: Sequence[int],
    scores: Sequence[float] | None,
    hw: tuple[int, int],
    *,
    k_things: int,
    min_area: float,
    max_occluded_fraction: float,
    order: str,
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Paint things; returns the id map (ids 1.. in the order of the returned (input index, category) list).

    Every thing claims only pixels no higher-priority thing holds. "score": priority = descending
    score (stable), ids in that order. "bbox_area": U2Seg paints in descending bbox area (stable) with
    each later thing overwriting, which gives every pixel to the *last* painter covering it; claiming
    free pixels in the reverse of that order is the same map, and lets the area / occlusion filters
    hand a dropped thing's pixels to the next one down. Ids then follow U2Seg's paint order.
    """
    if len(classes) != len(masks) or (scores is not None and len(scores) != len(masks)):
        raise ValueError("thing_masks, thing_classes and thing_scores must have the same length")
    decoded: list[np.ndarray] = []
    for idx, m in enumerate(masks):
        cls = int(classes[idx])
        if not 0 <= cls < k_things:
            raise ValueError(f"thing class {cls} outside 0..{k_things - 1}")
        mask = decode_mask(m)
        if mask.shape != hw:
            raise ValueError(f"thing mask {idx} has shape {mask.shape}, expected {hw}")
        decoded.append(mask)
    if order == "bbox_area":
        paint = np.argsort(-np.asarray([_bbox_area(m) for m in decoded], dtype=np.int64), kind="stable")
        priority = paint[::-1]
    elif scores is not None:
        priority = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    else:
        priority = np.arange(len(decoded))
    seg_ids = np.zeros(hw, dtype=np.int32)
    kept: list[tuple[int, int]] = []
    for idx in priority.tolist():
        mask = decoded[idx]
        full = int(mask.sum())
        visible = mask & (seg_ids == 0)
        area = int(visible.sum())
        if area == 0 or area < min_area or (full - area) > max_occluded_fraction * full:
            continue
        seg_ids[visible] = len(kept) + 1
        kept.append((idx, int(classes[idx]) + 1))
    if order == "bbox_area" and len(kept) > 1:  # renumber: ids in paint (descending bbox) order
        lut = np.zeros(len(kept) + 1, dtype=np.int32)
        lut[1:] = np.arange(len(kept), 0, -1, dtype=np.int32)
        seg_ids = lut[seg_ids]
        kept = kept[::-1]
    return seg_ids, kept


def _stuff_segments(
    stuff: np.ndarray, free: np.ndarray, *, k_stuff: int | None, min_area: float,
    overlap_drop: float | None = None,
) -> tuple[np.ndarray, list[int]]:
    """Per stuff class, keep its 8-connected fragments of at least ``min_area`` free pixels.

    With ``overlap_drop``, a class with more than that fraction of *all* its pixels under things
    is dropped whole first (U2Seg's rule: mostly hidden stuff is likely a thing's texture).
    Returns a map of stuff cluster id + 1 (0 = none) and the sorted list of surviving clusters.
    Each class is labelled inside its own bounding box, so the cost follows the class extents
    rather than K full-image passes.
    """
    labelled = np.where(stuff >= 0, stuff + 1, 0)
    if k_stuff is not None and labelled.size and int(labelled.max()) > k_stuff:
        raise ValueError(f"stuff id {int(labelled.max()) - 1} outside 0..{k_stuff - 1}")
    shifted = np.where(free, labelled, 0)
    if overlap_drop is not None and labelled.size:
        total = np.bincount(labelled.ravel())
        hidden = np.bincount(labelled[~free], minlength=total.size)
        ratio = hidden / np.maximum(total, 1)  # float64, as U2Seg's np.sum / np.sum
        drop = ratio > overlap_drop
        drop[0] = False
        if drop.any():
            shifted[drop[shifted]] = 0
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
    thing_order: str = "score",
    stuff_overlap_drop: float | None = None,
) -> PanopticResult:
    """Merge thing masks (0-based cluster ids) over a stuff map (0-based ids, <0 = void) into one image.

    ``thing_order="score"``: things are painted in descending score (ties: input order) and a later
    thing only gets pixels no earlier thing took. ``"bbox_area"`` (U2Seg's
    generate_pseudo_panoptic.py): things are painted in descending area w*h of their full mask's
    tight bbox (ties: input order), each later (smaller) one overwriting earlier ones; segment ids
    follow that paint order. Either way a pixel belongs to one thing, and a thing is dropped when it
    keeps no pixel, fewer than ``min_thing_area``, or loses more than ``max_occluded_fraction`` of
    its mask to higher-priority things (in "bbox_area" those are the smaller ones painted after it);
    a dropped thing's pixels go to the next thing down in priority, else to stuff.
    Remaining pixels take their stuff class. With ``stuff_overlap_drop`` a stuff class with more
    than that fraction of its pixels (all of the class in the image, thing-covered or not) under
    kept things is skipped and its free pixels become void (U2Seg: 0.7, strict >). Then each stuff
    class's 8-connected fragments smaller than ``min_stuff_area`` become void, and the rest of the
    class is one segment; stuff segment ids follow the things in ascending class. Area thresholds
    below 1 are fractions of H*W. ``k_stuff`` (optional) only range-checks the stuff ids. U2Seg's
    exact rule is ``thing_order="bbox_area", stuff_overlap_drop=0.7, min_stuff_area=0,
    min_thing_area=0`` (and the default ``max_occluded_fraction=1``).
    """
    if thing_order not in THING_ORDERS:
        raise ValueError(f"thing_order must be one of {THING_ORDERS}, got {thing_order!r}")
    if stuff_overlap_drop is not None and not 0.0 <= stuff_overlap_drop <= 1.0:
        raise ValueError(f"stuff_overlap_drop must be in [0, 1] or None, got {stuff_overlap_drop}")
    stuff = np.asarray(stuff)
    if stuff.ndim != 2:
        raise ValueError(f"stuff must be 2-D, got shape {stuff.shape}")
    hw = (int(stuff.shape[0]), int(stuff.shape[1]))
    n_pixels = hw[0] * hw[1]
    thing_map, kept = _paint_things(
        thing_masks, thing_classes, thing_scores, hw, k_things=k_things,
        min_area=_area_threshold(min_thing_area, n_pixels), max_occluded_fraction=max_occluded_fraction,
        order=thing_order)
    stuff_map_, survivors = _stuff_segments(
        stuff.astype(np.int32, copy=False), thing_map == 0, k_stuff=k_stuff,
        min_area=_area_threshold(min_stuff_area, n_pixels), overlap_drop=stuff_overlap_drop)
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


_CATEGORY_KEYS = ("id", "name", "supercategory", "isthing", "color")
_IMAGE_KEYS = ("id", "file_name", "width", "height")


def coco_panoptic_problems(panoptic: Mapping[str, Any]) -> list[str]:
    """Every way a COCO panoptic JSON (as a dict) breaks the format's file-level rules; empty when valid.

    Per-image rules (the PNG against its segments) are :func:`validate_panoptic`'s. Checks: ``images``,
    ``annotations`` and ``categories`` lists; categories with id, name, supercategory, isthing (0/1) and an
    RGB color, unique ids; images with id, file_name, width, height, unique ids; exactly one annotation per
    image, each naming a known image, a unique ``.png`` file_name and a segments_info list whose
    category ids are known.
    """
    problems: list[str] = []
    for key in ("images", "annotations", "categories"):
        if not isinstance(panoptic.get(key), list):
            problems.append(f"'{key}' must be a list")
    if problems:
        return problems
    cats: set[int] = set()
    for c in panoptic["categories"]:
        missing = [k for k in _CATEGORY_KEYS if k not in c]
        if missing:
            problems.append(f"category {c.get('id')!r}: missing keys {missing}")
        if c.get("isthing", 0) not in (0, 1):
            problems.append(f"category {c.get('id')!r}: isthing {c.get('isthing')!r} not 0 or 1")
        if "color" in c and (len(c["color"]) != 3 or not all(0 <= int(v) <= 255 for v in c["color"])):
            problems.append(f"category {c.get('id')!r}: color {c['color']!r} is not RGB")
        if c.get("id") in cats:
            problems.append(f"category id {c.get('id')!r}: listed more than once")
        cats.add(c.get("id"))
    images: set[Any] = set()
    for im in panoptic["images"]:
        missing = [k for k in _IMAGE_KEYS if k not in im]
        if missing:
            problems.append(f"image {im.get('id')!r}: missing keys {missing}")
        if im.get("id") in images:
            problems.append(f"image id {im.get('id')!r}: listed more than once")
        images.add(im.get("id"))
    annotated: set[Any] = set()
    names: set[str] = set()
    for a in panoptic["annotations"]:
        iid, name = a.get("image_id"), a.get("file_name")
        if iid not in images:
            problems.append(f"annotation of unknown image id {iid!r}")
        if iid in annotated:
            problems.append(f"image id {iid!r}: more than one annotation")
        annotated.add(iid)
        if not isinstance(name, str) or not name.endswith(".png"):
            problems.append(f"annotation of image {iid!r}: file_name {name!r} is not a .png")
        elif name in names:
            problems.append(f"annotation of image {iid!r}: file_name {name!r} used twice")
        names.add(name)
        if not isinstance(a.get("segments_info"), list):
            problems.append(f"annotation of image {iid!r}: segments_info must be a list")
            continue
        unknown = sorted({s.get("category_id") for s in a["segments_info"]} - cats, key=str)
        if unknown:
            problems.append(f"annotation of image {iid!r}: unknown category ids {unknown}")
    for iid in sorted(images - annotated, key=str)[:10]:
        problems.append(f"image id {iid!r}: no annotation")
    return problems


def semantic_from_panoptic(seg_ids: np.ndarray, segments_info: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Category id per pixel (0 = void) of a panoptic segment map and its segments."""
    lut = np.zeros(int(seg_ids.max()) + 1 if seg_ids.size else 1, np.int32)
    for s in segments_info:
        if int(s["id"]) < len(lut):
            lut[int(s["id"])] = int(s["category_id"])
    return lut[seg_ids]
