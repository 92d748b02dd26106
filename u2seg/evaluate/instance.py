"""Mask and box AP/AR with pycocotools' COCOeval, plus the overlap evidence for mapping instances.

Unmapped predicted categories (see `matching`) are dropped before evaluation: COCO AP charges false
positives per category, and such predictions belong to no gt category. Class-agnostic mode collapses
every gt and predicted category into one, as CutLER reports its unsupervised AP.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
from collections.abc import Iterable, Mapping, Sequence

import fsspec
import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from u2seg.evaluate.matching import OverlapAccumulator, instance_overlaps

logger = logging.getLogger(__name__)

# COCOeval.stats index of each reported number (maxDets = (1, 10, 100))
_STATS = {"AP": 0, "AP50": 1, "AP75": 2, "APs": 3, "APm": 4, "APl": 5, "AR1": 6, "AR10": 7, "AR100": 8}
_AGNOSTIC_ID = 1


def _load(obj: str | Mapping, storage_options: Mapping | None) -> dict:
    if isinstance(obj, str):
        with fsspec.open(obj, "rt", **dict(storage_options or {})) as f:
            return json.load(f)
    return copy.deepcopy(dict(obj))


def _rle(seg: Mapping, h: int, w: int) -> dict:
    """Compressed RLE for pycocotools (accepts uncompressed RLE and str/bytes counts)."""
    if isinstance(seg, list):  # polygons
        return mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    if isinstance(seg.get("counts"), list):
        return mask_utils.frPyObjects(dict(seg), h, w)
    counts = seg["counts"]
    return {"size": list(seg["size"]), "counts": counts.encode() if isinstance(counts, str) else counts}


def _prepare_gt(gt: dict, class_agnostic: bool) -> dict:
    imgs = {im["id"]: im for im in gt["images"]}
    anns = []
    for k, a in enumerate(gt.get("annotations", [])):
        a = dict(a)
        a.setdefault("id", k + 1)
        a.setdefault("iscrowd", 0)
        if "area" not in a or "bbox" not in a:
            im = imgs[a["image_id"]]
            rle = _rle(a["segmentation"], im["height"], im["width"])
            a.setdefault("area", float(mask_utils.area(rle)))
            a.setdefault("bbox", mask_utils.toBbox(rle).tolist())
        if class_agnostic:
            a["category_id"] = _AGNOSTIC_ID
        anns.append(a)
    cats = [{"id": _AGNOSTIC_ID, "name": "object"}] if class_agnostic else gt["categories"]
    return {"images": gt["images"], "annotations": anns, "categories": cats}


def _prepare_preds(preds: Iterable[Mapping], gt: dict, mapping: Mapping[int, int] | None,
                   class_agnostic: bool) -> tuple[list[dict], dict]:
    known_imgs = {im["id"] for im in gt["images"]}
    known_cats = {int(c["id"]) for c in gt["categories"]}
    out: list[dict] = []
    diag = {"predictions": 0, "unmapped": 0, "unknown_image": 0}
    for p in preds:
        diag["predictions"] += 1
        cat = int(p["category_id"])
        if mapping is not None:
            if cat not in mapping:
                diag["unmapped"] += 1
                continue
            cat = int(mapping[cat])
        if p["image_id"] not in known_imgs:
            diag["unknown_image"] += 1
            continue
        if not class_agnostic and cat not in known_cats:
            raise ValueError(f"prediction category {cat} is not a gt category; pass a mapping")
        q = {"image_id": p["image_id"], "category_id": _AGNOSTIC_ID if class_agnostic else cat,
             "score": float(p["score"])}
        if "segmentation" in p:
            q["segmentation"] = _rle(p["segmentation"], *p["segmentation"]["size"])
        if "bbox" in p:
            q["bbox"] = [float(v) for v in p["bbox"]]
        elif "segmentation" in q:
            q["bbox"] = mask_utils.toBbox(q["segmentation"]).tolist()
        out.append(q)
    if diag["unknown_image"]:
        logger.warning("%d predictions name images absent from the ground truth; dropped",
                       diag["unknown_image"])
    return out, diag


def _coco(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _evaluate(coco_gt: COCO, preds: list[dict], iou_type: str) -> dict[str, float | None]:
    if iou_type == "segm":
        # without a bbox, loadRes sets area from the mask (area ranges are mask areas, as detectron2 does)
        dets = [{k: v for k, v in p.items() if k != "bbox"} for p in preds if "segmentation" in p]
    elif iou_type == "bbox":
        dets = [dict(p) for p in preds if "bbox" in p]
    else:
        raise ValueError(f"unsupported iou type {iou_type!r}")
    if not dets:
        return dict.fromkeys(_STATS, 0.0)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        coco_dt = coco_gt.loadRes(dets)
        coco_eval = COCOeval(coco_gt, coco_dt, iou_type)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    logger.debug("COCOeval %s:\n%s", iou_type, buf.getvalue())
    # COCOeval writes -1 where nothing could be measured (e.g. no gt in an area range): report None
    return {k: (float(coco_eval.stats[i]) if coco_eval.stats[i] >= 0 else None) for k, i in _STATS.items()}


def instance_metrics(gt_instances_json: str | Mapping, pred_annotations: Sequence[Mapping], *,
                     mapping: Mapping[int, int] | None = None, iou_types: Sequence[str] = ("segm", "bbox"),
                     class_agnostic: bool = False, storage_options: Mapping | None = None) -> dict:
    """COCO AP/AR (values in [0, 1]) of instance predictions against COCO instances ground truth.

    `pred_annotations`: dicts with image_id, category_id, score, segmentation (RLE) and/or bbox (xywh).
    Returns {iou_type: {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100"},
    "diagnostics": {...}}. No (mapped) predictions give zeros, not an error; a number COCOeval cannot
    measure (e.g. APl when no gt object is large) is None.
    """
    gt = _load(gt_instances_json, storage_options)
    if not gt.get("annotations"):
        raise ValueError("ground truth has no instance annotations: AP is undefined")
    mp = None if mapping is None else {int(k): int(v) for k, v in mapping.items()}
    preds, diag = _prepare_preds(pred_annotations, gt, mp, class_agnostic)
    coco_gt = _coco(_prepare_gt(gt, class_agnostic))
    out: dict = {t: _evaluate(coco_gt, preds, t) for t in iou_types}
    out["diagnostics"] = diag
    return out


def instance_overlap(gt_instances_json: str | Mapping, pred_annotations: Sequence[Mapping], *,
                     score_threshold: float = 0.0, storage_options: Mapping | None = None
                     ) -> OverlapAccumulator:
    """Pixel overlap between predicted and gt instance categories, the evidence for a mapping.

    Predictions under `score_threshold` are left out so low-confidence noise does not steer the match.
    """
    gt = _load(gt_instances_json, storage_options)
    imgs = {im["id"]: im for im in gt["images"]}
    by_img_gt: dict = {}
    for a in gt.get("annotations", []):
        by_img_gt.setdefault(a["image_id"], []).append(a)
    by_img_pred: dict = {}
    for p in pred_annotations:
        if float(p.get("score", 1.0)) >= score_threshold and p["image_id"] in imgs:
            by_img_pred.setdefault(p["image_id"], []).append(p)
    acc = OverlapAccumulator()
    for img_id, preds in by_img_pred.items():
        gts = by_img_gt.get(img_id, [])
        if not gts:
            continue
        h, w = imgs[img_id]["height"], imgs[img_id]["width"]
        pm = _decode([p["segmentation"] for p in preds], h, w)
        gm = _decode([a["segmentation"] for a in gts], h, w)
        acc.add_pairs(instance_overlaps(pm, [p["category_id"] for p in preds], gm,
                                        [a["category_id"] for a in gts]))
    return acc


def _decode(segs: Sequence, h: int, w: int) -> np.ndarray:
    rles = [_rle(s, h, w) for s in segs]
    return np.moveaxis(mask_utils.decode(rles), -1, 0)  # [n, h, w] uint8
