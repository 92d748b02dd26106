"""U2Seg's own evaluation protocol: clusters mapped many-to-one to the classes they vote for most.

The strict protocol (`matching.hungarian_mapping`) pairs pseudo and gt classes one to one. U2Seg's paper
numbers come from its modified detectron2 evaluators instead, which this module reproduces as pure
functions (verified equal to that code on random inputs, see the report of issue 16):

Things (instance clusters -> gt thing classes), evidence from the detector's boxes, image by image:
- detections with score < 0.6 are left out (`THING_SCORE_THRESHOLD`, kept when >=);
- box IoU (COCO xywh boxes, pycocotools, no crowd rule) against every gt box of the image, crowd
  boxes included;
- every gt box with IoU > 0.7 (`THING_IOU_THRESHOLD`, strict) adds one vote (cluster, gt class): a
  detection may vote several times; votes are counts, weighted neither by score nor by IoU.
Stuff (semantic clusters -> gt stuff classes, COCO stuff supercategories in U2Seg), evidence from
semantic maps, image by image:
- for every predicted cluster and every gt class present in the image, except the "things" class on
  either side and gt ignore, IoU = |p & g| / |p | g| over the whole image (pixels of gt things and gt
  ignore count in the union); IoU > 0.15 (`STUFF_IOU_THRESHOLD`, strict) adds one vote per image.
  Pixel counts are not the evidence: a cluster that covers a class in many images beats one that
  covers it widely in a few.
Mapping (both): each cluster -> the gt class with most votes; ties go to the lowest gt id (U2Seg's
`argmax` over contiguous ids, which run in gt id order); a cluster without votes is unmapped (U2Seg's
-1): dropped from AP, void in PQ. Several clusters may share a class. Things never map to stuff nor
stuff to things, since each side only votes among its own gt classes; U2Seg's semantic "things"
class maps to the gt "things" class by fiat (`combine_mappings(..., extra=...)`).

Scoring the way U2Seg does, with this package's scorers:
- PQ: `panoptic_quality(..., mapping=m, merge_stuff=False)` against the supercategory ground truth of
  `supercategory.write_supercategory_set` (default, unmerged). U2Seg relabels segments and leaves
  them apart: two stuff clusters mapped to one class stay two segments (one can match, the other is a
  false positive unless it lies mostly on void), and gt segments of one supercategory stay apart too.
  Unmapped segments become void, as here.
- semantic: `semantic_metrics(conf, m, unmapped="ignore", average="gt")`: U2Seg sends unmapped pixels
  to its ignore label (scored nowhere) and averages IoU over classes with gt pixels; its 16 classes
  are the 15 stuff supercategories plus one "things" class (`collapse_things`).
  U2Seg applies the mapping in place, key after key, so a cluster mapped to a label that is itself a
  later cluster id is relabeled twice: `u2seg_inplace_semantic_mapping` gives the mapping its
  semantic numbers really used (its PQ and AP use dict look-ups and are not affected).
- AP: `instance_metrics(..., mapping=m, iou_types=("bbox",))`: U2Seg drops unmapped detections and
  reports box AP only (its evaluator skips "segm").
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from pycocotools import mask as mask_utils

from u2seg.evaluate.matching import Confusion, OverlapAccumulator

logger = logging.getLogger(__name__)

THING_SCORE_THRESHOLD = 0.6  # detections below this cast no vote
THING_IOU_THRESHOLD = 0.7  # box IoU must exceed this for a vote
STUFF_IOU_THRESHOLD = 0.15  # per-image mask IoU must exceed this for a vote

Votes = Counter  # (pseudo_id, gt_id) -> votes


@dataclass
class VoteMapping:
    """A many-to-one mapping and the votes that explain it."""

    mapping: dict[int, int]  # pseudo id -> gt id (mapped clusters only)
    votes: Confusion  # votes per (pseudo, gt) pair: rows pseudo ids, columns gt ids
    unmatched: list[int] = field(default_factory=list)  # declared or seen pseudo ids without a vote

    def to_dict(self) -> dict:
        """JSON-ready record: mapping, winning vote counts, unmatched clusters, the full vote table."""
        conf = self.votes
        row = {int(p): i for i, p in enumerate(conf.pred_ids.tolist())}
        col = {int(g): j for j, g in enumerate(conf.gt_ids.tolist())}
        return {"mapping": {str(p): int(g) for p, g in sorted(self.mapping.items())},
                "winning_votes": {str(p): int(conf.counts[row[p], col[g]]) for p, g in sorted(self.mapping.items())},
                "cluster_votes": {str(p): int(conf.counts[row[p]].sum()) for p in sorted(self.mapping)},
                "unmatched": [int(p) for p in self.unmatched],
                "votes": {"pred_ids": conf.pred_ids.tolist(), "gt_ids": conf.gt_ids.tolist(),
                          "counts": conf.counts.tolist()}}


def _boxes(boxes: Sequence | np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.size == 0:
        return arr.reshape(0, 4)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"{what} must be [n, 4] COCO xywh boxes, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contain non-finite values")
    return arr


def box_iou_xywh(boxes_a: Sequence | np.ndarray, boxes_b: Sequence | np.ndarray) -> np.ndarray:
    """[n_a, n_b] IoU of COCO xywh boxes (pycocotools' arithmetic, as U2Seg computes it)."""
    a, b = _boxes(boxes_a, "boxes_a"), _boxes(boxes_b, "boxes_b")
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), dtype=np.float64)
    return np.asarray(mask_utils.iou(a, b, [0] * len(b)), dtype=np.float64).reshape(len(a), len(b))


def thing_votes(pred_boxes: Sequence | np.ndarray, pred_scores: Sequence[float], pred_classes: Sequence[int],
                gt_boxes: Sequence | np.ndarray, gt_classes: Sequence[int], *,
                score_threshold: float = THING_SCORE_THRESHOLD,
                iou_threshold: float = THING_IOU_THRESHOLD) -> Votes:
    """One image's votes: (cluster, gt class) for every kept detection and gt box with IoU > threshold.

    Boxes are COCO xywh. Pass all gt boxes of the image, crowd ones included (U2Seg does).
    """
    pb, gb = _boxes(pred_boxes, "pred_boxes"), _boxes(gt_boxes, "gt_boxes")
    scores = np.asarray(pred_scores, dtype=np.float64).reshape(-1)
    pcls = np.asarray(pred_classes).reshape(-1)
    gcls = np.asarray(gt_classes).reshape(-1)
    if not len(pb) == len(scores) == len(pcls):
        raise ValueError(f"{len(pb)} pred boxes, {len(scores)} scores and {len(pcls)} classes differ in number")
    if len(gb) != len(gcls):
        raise ValueError(f"{len(gb)} gt boxes but {len(gcls)} gt classes")
    votes: Votes = Counter()
    keep = scores >= score_threshold
    if not keep.any() or len(gb) == 0:
        return votes
    kept_cls = pcls[keep]
    iou = box_iou_xywh(pb[keep], gb)
    for i, j in zip(*np.nonzero(iou > iou_threshold), strict=True):
        votes[(int(kept_cls[i]), int(gcls[j]))] += 1
    return votes


def thing_votes_coco(gt_instances: Mapping, pred_annotations: Iterable[Mapping], *,
                     score_threshold: float = THING_SCORE_THRESHOLD,
                     iou_threshold: float = THING_IOU_THRESHOLD) -> OverlapAccumulator:
    """Votes over a COCO instances ground truth (loaded dict) and COCO result dicts with `bbox` and `score`.

    Predictions must use the gt file's image ids; those of other images cast no vote.
    """
    gt_by_img: dict = {}
    for a in gt_instances.get("annotations", []):
        gt_by_img.setdefault(a["image_id"], []).append(a)
    pred_by_img: dict = {}
    for k, p in enumerate(pred_annotations):
        if "bbox" not in p or "score" not in p:
            raise ValueError(f"prediction {k} (image {p.get('image_id')}) lacks 'bbox' or 'score': U2Seg's "
                             "thing mapping votes with the detector's scored boxes")
        pred_by_img.setdefault(p["image_id"], []).append(p)
    acc = OverlapAccumulator()
    for img, preds in pred_by_img.items():
        gts = gt_by_img.get(img, [])
        if not gts:
            continue
        acc.add_pairs(thing_votes([p["bbox"] for p in preds], [float(p["score"]) for p in preds],
                                  [int(p["category_id"]) for p in preds], [a["bbox"] for a in gts],
                                  [int(a["category_id"]) for a in gts],
                                  score_threshold=score_threshold, iou_threshold=iou_threshold))
    return acc


def stuff_votes(pred_map: np.ndarray, gt_map: np.ndarray, *, pred_ignore: Iterable[int] = (),
                gt_ignore: Iterable[int] = (), iou_threshold: float = STUFF_IOU_THRESHOLD) -> Votes:
    """One image's votes: (cluster, gt class) for each pair present whose IoU over the image > threshold.

    `pred_ignore` (e.g. the "things" class and void) casts no vote, `gt_ignore` (e.g. things, void,
    ignore) receives none; their pixels still count in the other side's areas, as in U2Seg.
    """
    if pred_map.shape != gt_map.shape:
        raise ValueError(f"shape mismatch: pred {pred_map.shape} vs gt {gt_map.shape}")
    p = np.asarray(pred_map).astype(np.int64, copy=False).ravel()
    g = np.asarray(gt_map).astype(np.int64, copy=False).ravel()
    votes: Votes = Counter()
    if p.size == 0:
        return votes
    p_ids, p_inv = np.unique(p, return_inverse=True)
    g_ids, g_inv = np.unique(g, return_inverse=True)
    joint = np.bincount(p_inv * len(g_ids) + g_inv, minlength=len(p_ids) * len(g_ids)).reshape(len(p_ids), -1)
    area_p, area_g = joint.sum(axis=1), joint.sum(axis=0)
    skip_p = np.isin(p_ids, np.asarray(list(pred_ignore), dtype=np.int64))
    skip_g = np.isin(g_ids, np.asarray(list(gt_ignore), dtype=np.int64))
    for i, j in zip(*np.nonzero(joint), strict=True):
        if skip_p[i] or skip_g[j]:
            continue
        inter = int(joint[i, j])
        if inter / (int(area_p[i]) + int(area_g[j]) - inter) > iou_threshold:
            votes[(int(p_ids[i]), int(g_ids[j]))] += 1
    return votes


def vote_mapping(votes: OverlapAccumulator | Confusion | Mapping[tuple[int, int], int],
                 pseudo_ids: Iterable[int] = ()) -> VoteMapping:
    """Each cluster -> the gt class with most votes (ties: lowest gt id); no vote -> unmatched.

    `pseudo_ids` declares clusters that may have cast no vote, so they are listed as unmatched.
    """
    if isinstance(votes, Confusion):
        conf = votes
        extra = sorted({int(p) for p in pseudo_ids} - set(conf.pred_ids.tolist()))
        if extra:
            conf = Confusion(np.concatenate([conf.pred_ids, np.asarray(extra, dtype=np.int64)]), conf.gt_ids,
                             np.vstack([conf.counts, np.zeros((len(extra), len(conf.gt_ids)), dtype=np.int64)]),
                             conf.unassigned)
            order = np.argsort(conf.pred_ids, kind="stable")
            conf = Confusion(conf.pred_ids[order], conf.gt_ids, conf.counts[order], conf.unassigned)
    else:
        acc = votes if isinstance(votes, OverlapAccumulator) else _accumulator(votes)
        conf = acc.result(pred_ids=pseudo_ids)
    if (conf.counts < 0).any():
        raise ValueError("vote counts must be non-negative")
    if np.any(np.diff(conf.gt_ids) <= 0):
        raise ValueError("vote table gt ids must be sorted and unique (ties go to the lowest id)")
    mapping: dict[int, int] = {}
    unmatched: list[int] = []
    for r, p in enumerate(conf.pred_ids.tolist()):
        row = conf.counts[r]
        if row.size == 0 or row.max() <= 0:
            unmatched.append(int(p))
        else:
            mapping[int(p)] = int(conf.gt_ids[int(row.argmax())])  # argmax: first (lowest id) of the ties
    if unmatched:
        logger.info("u2seg mapping: %d of %d clusters got no vote and stay unmapped", len(unmatched),
                    len(conf.pred_ids))
    return VoteMapping(mapping, conf, unmatched)


def _accumulator(votes: Mapping[tuple[int, int], int]) -> OverlapAccumulator:
    acc = OverlapAccumulator()
    acc.add_pairs(votes)
    return acc


def combine_mappings(*mappings: Mapping[int, int], extra: Mapping[int, int] | None = None) -> dict[int, int]:
    """Union of thing and stuff mappings (plus e.g. {pred things class: gt things class}); keys must not clash."""
    out: dict[int, int] = {}
    for m in (*mappings, extra or {}):
        for p, g in m.items():
            p, g = int(p), int(g)
            if p in out:
                raise ValueError(f"pseudo id {p} is mapped twice: thing and stuff pseudo ids must differ")
            out[p] = g
    return out


def collapse_things(category_map: np.ndarray, thing_ids: Iterable[int], things_id: int) -> np.ndarray:
    """Category map with every thing category replaced by one "things" id (U2Seg's semantic class 0)."""
    out = np.asarray(category_map).astype(np.int64, copy=True)
    out[np.isin(out, np.asarray(list(thing_ids), dtype=np.int64))] = int(things_id)
    return out


def u2seg_inplace_semantic_mapping(mapping: Mapping[int, int], *, n_clusters: int,
                                   ignore_label: int) -> dict[int, int]:
    """The mapping U2Seg's semantic evaluation effectively applies, in U2Seg's own numbering.

    U2Seg relabels its prediction in place, `pred[pred == k] = m[k]` for k = 1..n_clusters, then 0
    (the order of its mapping JSON), with unmapped clusters sent to `ignore_label`. A pixel relabeled
    to a value that is a later key is relabeled again. Input: clusters 1..n_clusters (and the things
    class 0) -> contiguous gt labels (supercategories 1..15, things 0); absent = unmapped. Output: the
    final label of each cluster, clusters ending on `ignore_label` left out (unmapped).
    """
    if n_clusters < 0:
        raise ValueError(f"n_clusters must be >= 0, got {n_clusters}")
    m = {int(k): int(v) for k, v in mapping.items()}
    bad = sorted(k for k in m if not 0 <= k <= n_clusters)
    if bad:
        raise ValueError(f"mapping keys {bad[:5]} lie outside U2Seg's cluster range 0..{n_clusters}")
    assign = {k: m.get(k, ignore_label) for k in range(1, n_clusters + 1)}
    assign[0] = m.get(0, 0)
    final = {k: k for k in range(n_clusters + 1)}
    for key in [*range(1, n_clusters + 1), 0]:
        for src, cur in final.items():
            if cur == key:
                final[src] = assign[key]
    return {k: v for k, v in final.items() if v != ignore_label}


THINGS_ID = 0  # U2Seg's semantic "things" class; free in a `Confusion` (void is never a row or a column)


def collapse_confusion(conf: Confusion, pred_thing_ids: Iterable[int], gt_thing_ids: Iterable[int], *,
                       things_id: int = THINGS_ID) -> Confusion:
    """The confusion U2Seg's semantic evaluation sees: every thing category, on each side, summed into one id.

    Pixel counts add, so this equals accumulating the `collapse_things` maps image by image (no second
    pass over the PNGs). `things_id` must not be a stuff id of either side.
    """
    pred_things = {int(i) for i in pred_thing_ids}
    gt_things = {int(i) for i in gt_thing_ids}
    for side, ids, things in (("pred", conf.pred_ids, pred_things), ("gt", conf.gt_ids, gt_things)):
        if things_id in {int(i) for i in ids.tolist()} - things:
            raise ValueError(f"things_id {things_id} is a non-thing {side} category id")

    def relabel(ids: np.ndarray, things: set[int]) -> tuple[np.ndarray, np.ndarray]:
        new = np.asarray([things_id if int(i) in things else int(i) for i in ids.tolist()], dtype=np.int64)
        out, inv = np.unique(new, return_inverse=True)
        return out, inv.reshape(-1)

    p_ids, p_inv = relabel(conf.pred_ids, pred_things)
    g_ids, g_inv = relabel(conf.gt_ids, gt_things)
    counts = np.zeros((len(p_ids), len(g_ids)), dtype=np.int64)
    np.add.at(counts, (p_inv[:, None], g_inv[None, :]), conf.counts)
    unassigned = np.zeros(len(g_ids), dtype=np.int64)
    np.add.at(unassigned, g_inv, conf.unassigned)
    return Confusion(p_ids, g_ids, counts, unassigned)


def inplace_semantic_mapping(stuff_mapping: Mapping[int, int], *, pred_stuff_ids: Iterable[int],
                             gt_stuff_ids: Iterable[int], things_id: int = THINGS_ID) -> dict[int, int]:
    """`u2seg_inplace_semantic_mapping` in this package's ids: what U2Seg's semantic numbers really used.

    Numbered as U2Seg numbers its semantic head and ground truth: pseudo stuff ids in ascending order
    are clusters 1..K, gt stuff ids in ascending order are labels 1..n, things are 0 on both sides and
    the ignore label is n + 1. The relabel chain therefore depends on the order of the cluster ids (a
    permutation of the k-means ids changes it). Returns pseudo stuff id -> gt stuff id (or `things_id`)
    plus {things_id: things_id}; clusters that end on the ignore label are left out (unmapped).
    """
    pred = sorted({int(i) for i in pred_stuff_ids})
    gt = sorted({int(i) for i in gt_stuff_ids})
    rank = {p: r for r, p in enumerate(pred, start=1)}
    label = {g: k for k, g in enumerate(gt, start=1)}
    numbered: dict[int, int] = {0: 0}
    for p, g in stuff_mapping.items():
        p, g = int(p), int(g)
        if p not in rank:
            raise ValueError(f"stuff mapping key {p} is not one of the pseudo stuff ids")
        if g not in label:
            raise ValueError(f"stuff mapping sends {p} to {g}, not one of the gt stuff ids")
        numbered[rank[p]] = label[g]
    final = u2seg_inplace_semantic_mapping(numbered, n_clusters=len(pred), ignore_label=len(gt) + 1)
    back = {0: int(things_id), **{k: g for g, k in label.items()}}
    out = {pred[r - 1]: back[v] for r, v in final.items() if r != 0}
    out[int(things_id)] = back[final.get(0, 0)]
    return out
