"""Panoptic quality (PQ = SQ x RQ) by the COCO panoptic rules.

Rules (as in the COCO panoptic evaluation, Kirillov et al. 2019):
- A gt segment and a predicted segment of the same category match when IoU > 0.5, where the union
  leaves out the predicted pixels that fall on gt void (id 0). IoU > 0.5 makes matches unique.
- Unmatched non-crowd gt segments are false negatives; gt crowd segments are never counted.
- An unmatched predicted segment is a false positive unless more than half of it lies on gt void
  plus gt crowd regions of its own category.
- Per category PQ = sum IoU(TP) / (TP + FP/2 + FN/2); the averages run over categories that have
  any TP, FP or FN.

Deliberate differences from the reference tool (numbers verified equal to 1e-9 on random synthetic
sets with void, crowd and wrong classes); only the second can change a number on input it accepts:
- Segment areas are counted from the PNG, not read from the JSON `area` field (equal when consistent).
- Several crowd segments of one category in one image all count as crowd (the reference keeps only
  the last one it sees for the FP rule).
- A predicted JSON segment absent from the PNG is ignored (the reference raises).
- An image without a prediction counts as an empty prediction (the reference raises); it is logged
  and reported in `diagnostics`.
- No category with any TP/FP/FN gives averages of 0 with n = 0 (the reference divides by zero).

Pseudo categories: with `mapping` (pred category -> gt category), prediction categories are
remapped first. Unmapped categories become void (they belong to no gt category, so no category can be
charged a false positive; `diagnostics` reports how many such segments there were and how many
would have been false positives). After a many-to-one mapping several segments of one image may
share a category: by default stuff segments of one category are merged into one (a stuff class has
one segment per image), thing segments stay separate instances. `merge_stuff=False` keeps stuff
segments apart too, as U2Seg's evaluation does (it relabels segments and hands them to panopticapi
unmerged: at most one of them can match, the others are false positives unless mostly on void).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import cv2
import fsspec
import numpy as np

logger = logging.getLogger(__name__)

VOID = 0
_OFFSET = np.int64(1 << 24)  # segment ids are 24-bit (RGB-encoded)
_CHUNK = 16  # images per worker task


@dataclass
class PanopticImage:
    """One image in COCO panoptic form: segment-id map plus its `segments_info`."""

    ids: np.ndarray  # HxW non-negative ints, 0 = void
    segments: list[dict] = field(default_factory=list)  # {"id", "category_id", "iscrowd"(gt)}


@dataclass
class CategoryStat:
    iou: float = 0.0
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def __iadd__(self, other: CategoryStat) -> CategoryStat:
        self.iou += other.iou
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        return self


@dataclass
class PQStats:
    """Per-category sums over images plus diagnostics; picklable and mergeable across workers."""

    per_cat: dict[int, CategoryStat] = field(default_factory=dict)
    images: int = 0
    missing_predictions: int = 0
    unmapped_segments: int = 0
    unmapped_would_be_fp: int = 0

    def cat(self, cat_id: int) -> CategoryStat:
        return self.per_cat.setdefault(cat_id, CategoryStat())

    def merge(self, other: PQStats) -> PQStats:
        for c, s in other.per_cat.items():
            self.cat(c).__iadd__(s)
        self.images += other.images
        self.missing_predictions += other.missing_predictions
        self.unmapped_segments += other.unmapped_segments
        self.unmapped_would_be_fp += other.unmapped_would_be_fp
        return self


def _as_categories(categories: Iterable[Mapping] | Mapping[int, Mapping]) -> dict[int, dict]:
    if isinstance(categories, Mapping):
        return {int(k): dict(v) for k, v in categories.items()}
    return {int(c["id"]): dict(c) for c in categories}


def _overlaps(gt_ids: np.ndarray, pred_ids: np.ndarray) -> dict[tuple[int, int], int]:
    if gt_ids.shape != pred_ids.shape:
        raise ValueError(f"gt {gt_ids.shape} and prediction {pred_ids.shape} differ in size")
    g = gt_ids.astype(np.int64, copy=False).ravel()
    p = pred_ids.astype(np.int64, copy=False).ravel()
    if g.size and (max(g.max(), p.max()) >= _OFFSET or min(g.min(), p.min()) < 0):
        raise ValueError("segment ids must lie in [0, 2**24)")
    keys, cnt = np.unique(g * _OFFSET + p, return_counts=True)
    return {divmod(k, int(_OFFSET)): c for k, c in zip(keys.tolist(), cnt.tolist(), strict=True)}


def _remap(pred: PanopticImage, mapping: Mapping[int, int] | None, categories: Mapping[int, Mapping],
           merge_stuff: bool = True) -> tuple[dict[int, int], dict[int, int], list[int]]:
    """Return (pred segment id -> output segment id, output id -> category, unmapped segment ids)."""
    seg_to_out: dict[int, int] = {}
    out_cat: dict[int, int] = {}
    stuff_first: dict[int, int] = {}
    unmapped: list[int] = []
    for s in pred.segments:
        sid, cat = int(s["id"]), int(s["category_id"])
        if mapping is not None:
            if cat not in mapping:
                unmapped.append(sid)
                continue
            cat = int(mapping[cat])
        if cat not in categories:
            raise ValueError(f"prediction segment {sid} has category {cat}, unknown to the ground truth"
                             + ("" if mapping is None else " (after mapping)"))
        if mapping is not None and merge_stuff and not categories[cat].get("isthing", 0):
            seg_to_out[sid] = stuff_first.setdefault(cat, sid)
        else:
            seg_to_out[sid] = sid
        out_cat[seg_to_out[sid]] = cat
    return seg_to_out, out_cat, unmapped


def image_pq_stats(gt: PanopticImage, pred: PanopticImage, categories: Mapping[int, Mapping],
                   mapping: Mapping[int, int] | None = None, merge_stuff: bool = True) -> PQStats:
    """PQ counts for one image (see module doc for the rules)."""
    stats = PQStats(images=1)
    raw = _overlaps(gt.ids, pred.ids)
    seg_to_out, pred_cat, unmapped = _remap(pred, mapping, categories, merge_stuff)
    known = set(seg_to_out) | set(unmapped)
    stray = {p for _, p in raw} - known - {VOID}
    if stray:
        raise ValueError(f"prediction PNG has segment ids {sorted(stray)[:5]} missing from its segments_info")

    # pixel counts of unmapped segments, for the diagnostics only
    un = set(unmapped)
    un_area: dict[int, int] = {}
    un_void: dict[int, int] = {}
    inter: dict[tuple[int, int], int] = {}
    for (g, p), c in raw.items():
        if p in un:
            un_area[p] = un_area.get(p, 0) + c
            if g == VOID:
                un_void[p] = un_void.get(p, 0) + c
            p = VOID
        else:
            p = seg_to_out.get(p, VOID)
        inter[(g, p)] = inter.get((g, p), 0) + c
    stats.unmapped_segments = len(un_area)
    stats.unmapped_would_be_fp = sum(1 for p, a in un_area.items() if un_void.get(p, 0) / a <= 0.5)

    pred_area: dict[int, int] = {}
    gt_area: dict[int, int] = {}
    for (g, p), c in inter.items():
        pred_area[p] = pred_area.get(p, 0) + c
        gt_area[g] = gt_area.get(g, 0) + c
    gt_segs = {int(s["id"]): s for s in gt.segments}

    matched_gt: set[int] = set()
    matched_pred: set[int] = set()
    for (g, p), c in inter.items():
        if g not in gt_segs or p not in pred_cat:
            continue
        gs = gt_segs[g]
        cat = int(gs["category_id"])
        if gs.get("iscrowd", 0) or cat != pred_cat[p]:
            continue
        union = pred_area[p] + gt_area[g] - c - inter.get((VOID, p), 0)
        iou = c / union
        if iou > 0.5:
            st = stats.cat(cat)
            st.tp += 1
            st.iou += iou
            matched_gt.add(g)
            matched_pred.add(p)

    crowd_by_cat: dict[int, set[int]] = {}
    for g, gs in gt_segs.items():
        cat = int(gs["category_id"])
        if gs.get("iscrowd", 0):
            crowd_by_cat.setdefault(cat, set()).add(g)
        elif g not in matched_gt:
            stats.cat(cat).fn += 1

    for p, cat in pred_cat.items():
        if p in matched_pred or p not in pred_area:
            continue  # matched, or listed in JSON but absent from the PNG
        ignorable = inter.get((VOID, p), 0) + sum(inter.get((g, p), 0) for g in crowd_by_cat.get(cat, ()))
        if ignorable / pred_area[p] > 0.5:
            continue
        stats.cat(cat).fp += 1
    return stats


def summarize(stats: PQStats, categories: Iterable[Mapping] | Mapping[int, Mapping]) -> dict:
    """Average per-category PQ/SQ/RQ into All / Things / Stuff, plus the per-class table."""
    cats = _as_categories(categories)
    per_class: dict[int, dict] = {}
    for cid in cats:
        s = stats.per_cat.get(cid, CategoryStat())
        denom = s.tp + 0.5 * s.fp + 0.5 * s.fn
        per_class[cid] = {
            "pq": s.iou / denom if denom else 0.0,
            "sq": s.iou / s.tp if s.tp else 0.0,
            "rq": s.tp / denom if denom else 0.0,
            "tp": s.tp, "fp": s.fp, "fn": s.fn,
        }
    out: dict = {}
    for name, want in (("All", None), ("Things", True), ("Stuff", False)):
        rows = [per_class[cid] for cid, c in cats.items()
                if (want is None or bool(c.get("isthing", 0)) == want)
                and per_class[cid]["tp"] + per_class[cid]["fp"] + per_class[cid]["fn"] > 0]
        n = len(rows)
        out[name] = {k: (sum(r[k] for r in rows) / n if n else 0.0) for k in ("pq", "sq", "rq")}
        out[name]["n"] = n
    out["per_class"] = per_class
    out["diagnostics"] = {"images": stats.images, "missing_predictions": stats.missing_predictions,
                          "unmapped_segments": stats.unmapped_segments,
                          "unmapped_would_be_fp": stats.unmapped_would_be_fp}
    return out


def pq_from_arrays(pairs: Iterable[tuple[PanopticImage, PanopticImage]], *,
                   categories: Iterable[Mapping] | Mapping[int, Mapping],
                   mapping: Mapping[int, int] | None = None, merge_stuff: bool = True) -> dict:
    """In-memory PQ over (gt, pred) pairs: the core that `panoptic_quality` runs per file."""
    cats = _as_categories(categories)
    stats = PQStats()
    for gt, pred in pairs:
        stats.merge(image_pq_stats(gt, pred, cats, mapping, merge_stuff))
    return summarize(stats, cats)


# ----------------------------------------------------------------------------- files / URIs


def read_json(uri: str, storage_options: Mapping | None = None) -> dict:
    with fsspec.open(uri, "rt", **dict(storage_options or {})) as f:
        return json.load(f)


def read_panoptic_png(uri: str, storage_options: Mapping | None = None) -> np.ndarray:
    """Decode a COCO panoptic PNG into segment ids (id = R + 256 G + 256^2 B)."""
    with fsspec.open(uri, "rb", **dict(storage_options or {})) as f:
        data = f.read()
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None or img.ndim != 3 or img.shape[2] < 3 or img.dtype != np.uint8:
        raise ValueError(f"{uri}: not an 8-bit RGB panoptic PNG")
    bgr = img[..., :3].astype(np.int64)
    return bgr[..., 2] + 256 * bgr[..., 1] + 65536 * bgr[..., 0]


def _join(folder: str, name: str) -> str:
    return posixpath.join(folder.rstrip("/"), name) if "://" in folder else f"{folder.rstrip('/')}/{name}"


def _chunk_stats(tasks: Sequence[tuple[dict, dict | None]], gt_dir: str, pred_dir: str,
                 categories: dict[int, dict], mapping: dict[int, int] | None,
                 storage_options: dict | None, merge_stuff: bool = True) -> PQStats:
    stats = PQStats()
    for gt_ann, pred_ann in tasks:
        gt_ids = read_panoptic_png(_join(gt_dir, gt_ann["file_name"]), storage_options)
        gt = PanopticImage(gt_ids, gt_ann["segments_info"])
        if pred_ann is None:
            pred = PanopticImage(np.zeros_like(gt_ids), [])
            stats.missing_predictions += 1
        else:
            pred = PanopticImage(read_panoptic_png(_join(pred_dir, pred_ann["file_name"]), storage_options),
                                 pred_ann["segments_info"])
        try:
            stats.merge(image_pq_stats(gt, pred, categories, mapping, merge_stuff))
        except ValueError as e:
            raise ValueError(f"image {gt_ann['image_id']}: {e}") from e
    return stats


def panoptic_quality(gt_json: str | Mapping, pred_json: str | Mapping, gt_dir: str, pred_dir: str, *,
                     categories: Iterable[Mapping] | Mapping[int, Mapping] | None = None,
                     mapping: Mapping[int, int] | None = None, storage_options: Mapping | None = None,
                     workers: int = 2, merge_stuff: bool = True) -> dict:
    """PQ/SQ/RQ (values in [0, 1]) of COCO panoptic predictions; files by path or fsspec URI.

    `gt_json` / `pred_json` may also be already-loaded dicts. `categories` defaults to the gt JSON's.
    `workers` > 1 spreads images over that many processes (spawned: safe inside threaded hosts).
    `merge_stuff=False` scores mapped stuff segments of one category apart, as U2Seg does (module doc).
    """
    gt = read_json(gt_json, storage_options) if isinstance(gt_json, str) else gt_json
    pr = read_json(pred_json, storage_options) if isinstance(pred_json, str) else pred_json
    cats = _as_categories(categories if categories is not None else gt["categories"])
    mp = None if mapping is None else {int(k): int(v) for k, v in mapping.items()}
    storage = dict(storage_options or {})
    preds = {a["image_id"]: a for a in pr["annotations"]}
    tasks = [(a, preds.get(a["image_id"])) for a in gt["annotations"]]
    missing = sum(p is None for _, p in tasks)
    if missing:
        logger.warning("%d of %d images have no prediction; counted as empty predictions",
                       missing, len(tasks))
    chunks = [tasks[i:i + _CHUNK] for i in range(0, len(tasks), _CHUNK)]
    stats = PQStats()
    if workers <= 1 or len(chunks) <= 1:
        for ch in chunks:
            stats.merge(_chunk_stats(ch, gt_dir, pred_dir, cats, mp, storage, merge_stuff))
    else:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(chunks)), mp_context=ctx) as pool:
            futures = [pool.submit(_chunk_stats, ch, gt_dir, pred_dir, cats, mp, storage, merge_stuff)
                       for ch in chunks]
            for fut in futures:  # merge in submission order: deterministic float sums
                stats.merge(fut.result())
    result = summarize(stats, cats)
    logger.info("PQ %.4f (things %.4f, stuff %.4f) over %d images", result["All"]["pq"],
                result["Things"]["pq"], result["Stuff"]["pq"], stats.images)
    return result
