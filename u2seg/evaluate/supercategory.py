"""COCO panoptic ground truth with stuff relabeled to supercategories, as U2Seg evaluates stuff.

U2Seg's stuff head has no notion of COCO's 53 fine stuff classes, so its paper scores stuff against
the 15 COCO stuff supercategories (textile, building, ..., solid); thing classes stay the 80 COCO
classes. Its `get_panoptic_anns_supercategory.py` does, and so does this module by default:
- each stuff category gets the id ``offset + k`` of its supercategory, k = 1, 2, ... numbered in the
  order supercategories first appear among stuff categories sorted by id (for COCO this is U2Seg's
  hard-coded table: textile 1, building 2, raw-material 3, furniture-stuff 4, floor 5, plant 6,
  food-stuff 7, ground 8, structural 9, water 10, wall 11, window 12, ceiling 13, sky 14, solid 15;
  U2Seg uses offset 300, its cluster count);
- thing categories and their ids are kept; segments keep their ids, areas, boxes and crowd flags;
- segments of one image in the same supercategory are NOT merged and the PNGs are not rewritten:
  U2Seg only relabels `segments_info` (so an image with wall-brick and wall-other has two gt "wall"
  segments, each matched on its own by PQ).
U2Seg's JSON keeps one category entry per old stuff class (ids repeated; panopticapi keeps the last);
here each supercategory has one entry, named after it.
`merge_stuff=True` is a stricter variant (not U2Seg's): same-supercategory stuff segments of an image
(of equal crowd flag) merge into one, keeping the lowest segment id, with the PNG rewritten.
"""

from __future__ import annotations

import json
import logging
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import fsspec
import numpy as np

from u2seg.labels.coco import decode_panoptic_png, panoptic_png_bytes

logger = logging.getLogger(__name__)

SUPERCATEGORY_OFFSET = 300  # U2Seg's stuff ids: 300 + supercategory index (its cluster count)


def supercategory_categories(coco_categories: Iterable[Mapping], *, offset: int = SUPERCATEGORY_OFFSET
                             ) -> tuple[list[dict], dict[int, int]]:
    """(new categories, old id -> new id): things kept, stuff merged per `supercategory` (module doc)."""
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    cats = sorted((dict(c) for c in coco_categories), key=lambda c: int(c["id"]))
    ids = [int(c["id"]) for c in cats]
    if len(set(ids)) != len(ids):
        raise ValueError("coco_categories have repeated ids")
    things: list[dict] = []
    stuff: dict[str, dict] = {}
    old_to_new: dict[int, int] = {}
    for c in cats:
        if "isthing" not in c:
            raise ValueError(f"category {c['id']} has no 'isthing' flag: not a COCO panoptic category")
        cid = int(c["id"])
        if int(c["isthing"]):
            things.append(c)
            old_to_new[cid] = cid
            continue
        sup = c.get("supercategory")
        if not sup:
            raise ValueError(f"stuff category {cid} ({c.get('name')}) has no 'supercategory'")
        if sup not in stuff:
            entry = {"id": offset + len(stuff) + 1, "name": str(sup), "supercategory": str(sup), "isthing": 0}
            if "color" in c:
                entry["color"] = list(c["color"])
            stuff[sup] = entry
        old_to_new[cid] = stuff[sup]["id"]
    if things and stuff and max(int(c["id"]) for c in things) > offset:
        raise ValueError(f"offset {offset} is below thing id {max(int(c['id']) for c in things)}: "
                         "supercategory ids would collide with thing ids")
    return things + list(stuff.values()), old_to_new


def relabel_segments(segments_info: Sequence[Mapping], old_to_new: Mapping[int, int],
                     new_categories: Iterable[Mapping]) -> list[dict]:
    """Copies of the segments with their category ids mapped (all that U2Seg's conversion does)."""
    known = {int(c["id"]) for c in new_categories}
    out: list[dict] = []
    for s in segments_info:
        old = int(s["category_id"])
        if old not in old_to_new:
            raise ValueError(f"segment {s.get('id')} has category {old}, absent from old_to_new")
        new = int(old_to_new[old])
        if new not in known:
            raise ValueError(f"category {old} maps to {new}, absent from new_categories")
        out.append({**dict(s), "category_id": new})
    return out


def remap_panoptic_image(seg_ids: np.ndarray, segments_info: Sequence[Mapping], old_to_new: Mapping[int, int],
                         new_categories: Iterable[Mapping], *, merge_stuff: bool = False
                         ) -> tuple[np.ndarray, list[dict]]:
    """Relabel one image's segments to supercategory ids; `seg_ids` comes back unchanged unless merging.

    With `merge_stuff`, stuff segments sharing (new category, iscrowd) become the one with the lowest
    id: pixels relabeled, areas summed, boxes joined.
    """
    new_categories = list(new_categories)
    out = relabel_segments(segments_info, old_to_new, new_categories)
    if not merge_stuff:
        return seg_ids, out
    isthing = {int(c["id"]): bool(int(c.get("isthing", 0))) for c in new_categories}
    keep: dict[tuple[int, int], dict] = {}
    relabel: dict[int, int] = {}
    merged: list[dict] = []
    for s in sorted(out, key=lambda s: int(s["id"])):
        key = (int(s["category_id"]), int(s.get("iscrowd", 0)))
        if isthing[key[0]]:
            merged.append(s)
        elif key in keep:
            first = keep[key]
            relabel[int(s["id"])] = int(first["id"])
            if "area" in first and "area" in s:
                first["area"] = int(first["area"]) + int(s["area"])
            if "bbox" in first and "bbox" in s:
                first["bbox"] = _join_boxes(first["bbox"], s["bbox"])
        else:
            keep[key] = s
            merged.append(s)
    if not relabel:
        return seg_ids, out
    ids = np.asarray(seg_ids)
    new_ids = ids.copy()
    for src, dst in relabel.items():
        new_ids[ids == src] = dst
    order = {int(s["id"]): k for k, s in enumerate(out)}  # keep the input's segment order
    return new_ids, sorted(merged, key=lambda s: order[int(s["id"])])


def _join_boxes(a: Sequence[float], b: Sequence[float]) -> list:
    """Smallest xywh box holding both; empty boxes (w or h 0) are ignored."""
    boxes = [list(x) for x in (a, b) if x[2] > 0 and x[3] > 0]
    if not boxes:
        return list(a)
    x0 = min(x[0] for x in boxes)
    y0 = min(x[1] for x in boxes)
    x1 = max(x[0] + x[2] for x in boxes)
    y1 = max(x[1] + x[3] for x in boxes)
    return [x0, y0, x1 - x0, y1 - y0]


def _join(folder: str, name: str) -> str:
    return posixpath.join(folder.rstrip("/"), name)


def write_supercategory_set(panoptic_json: str, png_dir: str, out_json: str, out_dir: str,
                            storage_options: Mapping[str, Any] | None = None, *,
                            offset: int = SUPERCATEGORY_OFFSET, merge_stuff: bool = False) -> dict[str, int]:
    """Write the supercategory version of a COCO panoptic set (paths or fsspec URIs), image by image.

    PNGs are copied byte for byte unless `merge_stuff` changes them; the JSON keeps every other key.
    Returns counts: images, segments, stuff segments relabeled, segments merged away, PNGs rewritten.
    """
    so = dict(storage_options or {})
    with fsspec.open(panoptic_json, "rt", **so) as f:
        data = json.load(f)
    if "categories" not in data or "annotations" not in data:
        raise ValueError(f"{panoptic_json}: not a COCO panoptic JSON (needs 'categories' and 'annotations')")
    new_cats, old_to_new = supercategory_categories(data["categories"], offset=offset)
    stuff_old = {int(c["id"]) for c in data["categories"] if not int(c.get("isthing", 0))}
    fs, root = fsspec.core.url_to_fs(out_dir, **so)
    fs.makedirs(root, exist_ok=True)
    stats = {"images": 0, "segments": 0, "stuff_relabeled": 0, "merged_away": 0, "pngs_rewritten": 0}
    anns = []
    for ann in data["annotations"]:
        src = _join(png_dir, ann["file_name"])
        with fsspec.open(src, "rb", **so) as f:
            raw = f.read()
        segs = ann["segments_info"]
        try:
            if merge_stuff:
                ids = decode_panoptic_png(raw)
                new_ids, new_segs = remap_panoptic_image(ids, segs, old_to_new, new_cats, merge_stuff=True)
            else:
                new_ids, new_segs = None, relabel_segments(segs, old_to_new, new_cats)
        except ValueError as e:
            raise ValueError(f"{src}: {e}") from e
        changed = new_ids is not None and len(new_segs) != len(segs)
        with fsspec.open(_join(out_dir, ann["file_name"]), "wb", **so) as f:
            f.write(panoptic_png_bytes(new_ids) if changed else raw)
        anns.append({**ann, "segments_info": new_segs})
        stats["images"] += 1
        stats["segments"] += len(segs)
        stats["stuff_relabeled"] += sum(int(s["category_id"]) in stuff_old for s in segs)
        stats["merged_away"] += len(segs) - len(new_segs)
        stats["pngs_rewritten"] += int(changed)
    with fsspec.open(out_json, "wt", **so) as f:
        json.dump({**data, "categories": new_cats, "annotations": anns}, f)
    logger.info("supercategory set: %d images, %d stuff segments relabeled to %d supercategories, %d merged "
                "away -> %s", stats["images"], stats["stuff_relabeled"],
                sum(not c["isthing"] for c in new_cats), stats["merged_away"], out_json)
    return stats
