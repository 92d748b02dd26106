"""CutLER's self-training rule: merge a trained model's confident predictions with the previous round's
pseudo masks, per image (pure numpy); :func:`relabel_image` turns the result into the image's next
panoptic label (the pipeline's self-training rounds, ``u2seg/pipeline/selftrain.py``).

Why: after a round of training the detector finds objects the pseudo-labels missed and outlines
known ones better; its confident predictions replace the old masks they cover, while old masks it
does not reproduce are kept so recall does not drop.

Decisions, each taken from CutLER's cutler/tools/get_self_training_ann.py:

- Predictions are kept when score >= score_threshold (CutLER: `confidence_score >= THRESHOLD`, 0.7),
  compared in float64 as CutLER compares its JSON floats (a float32 0.7 is 0.69999999 and fails).
- Overlap is *mask* IoU (CutLER's BatchIoU on the decoded masks, each binarised as `> 0.5`), not box IoU.
- An old mask is kept only when its IoU with *every* kept prediction is < iou_threshold (strictly:
  CutLER keeps `iou_max < 0.5`).
- Predictions are never deduplicated among themselves by CutLER; ``pred_nms`` (off by default) adds a
  greedy mask-IoU suppression among the confident predictions, highest score first, because a detector
  with many pseudo classes and per-class box NMS returns several boxes of different sizes around one
  object whose masks are the same object (measured on the synthetic world: 88 same-class pairs of mask
  IoU > 0.5 among 226 confident predictions on 32 images), and each would become a pseudo instance.
- Output order: the kept predictions in their input order, then the kept old masks in theirs
  (CutLER: `anns_pred + selected_pseudo`). No confident prediction: all old masks; no old mask:
  the confident predictions alone (CutLER's two fall-through branches).
- Classes: a prediction carries its predicted class, a kept old mask its old class (CutLER copies
  each annotation unchanged; there every class is the single "fg").
- Scores: a prediction keeps its score; an old mask has none (CutLER's annotations carry no score)
  and gets NaN here. `sources` says which is which ("pred" / "old").

Two edge cases CutLER leaves to accident, made explicit: the IoU of two empty masks is 0 (CutLER
divides 0 by 0, and its NaN then drops the old mask), and mismatched mask sizes raise ValueError
(CutLER's bare `except` silently keeps the old masks).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from u2seg.labels.panoptic import PanopticResult, panoptic_merge

SOURCE_PRED = "pred"
SOURCE_OLD = "old"


def _as_masks(masks: np.ndarray, name: str) -> np.ndarray:
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"{name} must be (N, H, W), got shape {masks.shape}")
    return masks if masks.dtype == bool else masks > 0.5


def _as_vector(values: np.ndarray, n: int, name: str, dtype: type) -> np.ndarray:
    values = np.asarray(values, dtype=dtype).reshape(-1)
    if values.shape[0] != n:
        raise ValueError(f"{name} has {values.shape[0]} entries for {n} masks")
    return values


def mask_iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) IoU of boolean masks a (N, H, W) and b (M, H, W); 0 where both masks are empty."""
    a2 = a.reshape(a.shape[0], -1).astype(np.float32)
    b2 = b.reshape(b.shape[0], -1).astype(np.float32)
    inter = a2 @ b2.T
    union = a2.sum(1)[:, None] + b2.sum(1)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def suppress_duplicates(masks: np.ndarray, scores: np.ndarray, iou_threshold: float, index: np.ndarray) -> np.ndarray:
    """Greedy mask NMS: the entries of ``index`` kept, in their input order; a mask whose IoU with a
    higher-scoring kept mask exceeds ``iou_threshold`` is dropped (equal scores: input order decides)."""
    iou = mask_iou_matrix(masks, masks)
    kept: list[int] = []
    for i in np.argsort(-scores, kind="stable"):
        if all(iou[i, j] <= iou_threshold for j in kept):
            kept.append(int(i))
    return index[np.sort(np.array(kept, dtype=np.int64))]


def selftrain_image(
    old_masks: np.ndarray,
    old_classes: np.ndarray,
    pred_masks: np.ndarray,
    pred_classes: np.ndarray,
    pred_scores: np.ndarray,
    *,
    score_threshold: float = 0.7,
    iou_threshold: float = 0.5,
    pred_nms: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One image's next-round pseudo instances -> (masks (M, H, W) bool, classes (M,) int64,
    scores (M,) float32 (NaN for old masks), sources (M,) "pred" | "old").

    old_masks (N, H, W) and pred_masks (P, H, W): bool, or 0/1 / probabilities binarised at > 0.5.
    ``pred_nms`` > 0: a confident prediction whose mask IoU with a higher-scoring kept one exceeds it is
    dropped (ties in score: the earlier one wins); 0 = CutLER's rule, no suppression.
    """
    old = _as_masks(old_masks, "old_masks")
    pred = _as_masks(pred_masks, "pred_masks")
    old_cls = _as_vector(old_classes, old.shape[0], "old_classes", np.int64)
    pred_cls = _as_vector(pred_classes, pred.shape[0], "pred_classes", np.int64)
    pred_sc = _as_vector(pred_scores, pred.shape[0], "pred_scores", np.float64)  # compare as CutLER's JSON floats
    if old.shape[0] and pred.shape[0] and old.shape[1:] != pred.shape[1:]:
        raise ValueError(f"old masks are {old.shape[1:]} but predictions {pred.shape[1:]}")
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
    if not 0.0 <= pred_nms <= 1.0:
        raise ValueError(f"pred_nms must be in [0, 1], got {pred_nms}")
    if np.isnan(pred_sc).any():
        raise ValueError("pred_scores contain NaN")

    confident = np.flatnonzero(pred_sc >= score_threshold)
    if pred_nms > 0 and confident.size > 1:
        confident = suppress_duplicates(pred[confident], pred_sc[confident], pred_nms, confident)
    kept_pred = pred[confident]
    if old.shape[0] and confident.size:
        keep_old = mask_iou_matrix(old, kept_pred).max(axis=1) < iou_threshold
    else:
        keep_old = np.ones(old.shape[0], dtype=bool)
    hw = pred.shape[1:] if pred.shape[0] else old.shape[1:]

    masks = np.concatenate([kept_pred.reshape(-1, *hw), old[keep_old].reshape(-1, *hw)])
    classes = np.concatenate([pred_cls[confident], old_cls[keep_old]])
    scores = np.concatenate([pred_sc[confident], np.full(int(keep_old.sum()), np.nan)]).astype(np.float32)
    sources = np.array([SOURCE_PRED] * confident.size + [SOURCE_OLD] * int(keep_old.sum()), dtype="<U4")
    return masks, classes, scores, sources


def panoptic_things(seg_ids: np.ndarray, segments: Sequence[Mapping[str, Any]], k_things: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """A panoptic label's thing segments as (masks (N, H, W) bool, 0-based classes (N,)), in segments order."""
    things = [s for s in segments if 1 <= int(s["category_id"]) <= k_things]
    masks = np.stack([seg_ids == int(s["id"]) for s in things]) if things else np.zeros((0, *seg_ids.shape), bool)
    return masks, np.array([int(s["category_id"]) - 1 for s in things], dtype=np.int64)


def panoptic_stuff(seg_ids: np.ndarray, segments: Sequence[Mapping[str, Any]], k_things: int) -> np.ndarray:
    """The stuff map of a panoptic label: 0-based stuff id per pixel, -1 under things and void."""
    lut = np.full(int(seg_ids.max(initial=0)) + 1, -1, dtype=np.int32)
    for s in segments:
        sid, cat = int(s["id"]), int(s["category_id"])
        if cat > k_things and sid < lut.size:
            lut[sid] = cat - k_things - 1
    return lut[seg_ids]


def semantic_stuff(categories: np.ndarray, k_things: int) -> np.ndarray:
    """The stuff map of a category-id map (a semantic PNG): 0-based stuff id, -1 for things and void (0)."""
    categories = np.asarray(categories, dtype=np.int32)
    return np.where(categories > k_things, categories - k_things - 1, -1).astype(np.int32)


@dataclass
class RelabelResult:
    """One image's next-round label: the panoptic merge, the score of each thing segment (in segments
    order: a prediction's score, 1.0 for a kept pseudo thing) and what happened to the old things."""

    panoptic: PanopticResult
    thing_scores: list[float]
    pred_things: int  # confident predictions taken as pseudo things
    old_kept: int  # previous pseudo things kept (no prediction reproduces them)
    old_replaced: int  # previous pseudo things dropped for a prediction overlapping them


def relabel_image(
    old_seg: np.ndarray,
    old_segments: Sequence[Mapping[str, Any]],
    pred_masks: np.ndarray,
    pred_classes: np.ndarray,
    pred_scores: np.ndarray,
    stuff: np.ndarray,
    *,
    k_things: int,
    k_stuff: int,
    score_threshold: float = 0.7,
    iou_threshold: float = 0.5,
    pred_nms: float = 0.0,
    min_stuff_area: float = 0,
    min_thing_area: float = 0,
    thing_order: str = "score",
    stuff_overlap_drop: float | None = None,
) -> RelabelResult:
    """Self-training's label of one image: CutLER's rule (:func:`selftrain_image`) on the previous label's
    thing segments (``old_seg`` + ``old_segments``, a panoptic label) and the model's full predicted masks,
    then the panoptic merge of the new things over ``stuff`` (0-based stuff ids, -1 = none: the previous
    label's stuff or the model's semantic head) with the label stage's rules.

    Paint order under ``thing_order="score"``: predictions by score, then the kept old things in their
    previous order (they have no score); ``"bbox_area"`` ignores scores (U2Seg's order).
    """
    stuff = np.asarray(stuff)
    if stuff.shape != old_seg.shape:
        raise ValueError(f"stuff map is {stuff.shape} but the label {old_seg.shape}")
    old_masks, old_classes = panoptic_things(old_seg, old_segments, k_things)
    pred_masks = np.asarray(pred_masks)
    if pred_masks.ndim != 3:
        raise ValueError(f"pred_masks must be (N, H, W), got shape {pred_masks.shape}")
    if pred_masks.shape[0] and pred_masks.shape[1:] != old_seg.shape:
        raise ValueError(f"predicted masks are {pred_masks.shape[1:]} but the label {old_seg.shape}")
    masks, classes, scores, sources = selftrain_image(old_masks, old_classes, pred_masks, pred_classes, pred_scores,
                                                      score_threshold=score_threshold, iou_threshold=iou_threshold,
                                                      pred_nms=pred_nms)
    priority = np.where(np.isnan(scores), -np.inf, scores.astype(np.float64))  # old things after predictions
    result = panoptic_merge(list(masks), classes.tolist(), priority.tolist(), stuff, k_things=k_things,
                            k_stuff=k_stuff, min_stuff_area=min_stuff_area, min_thing_area=min_thing_area,
                            thing_order=thing_order, stuff_overlap_drop=stuff_overlap_drop)
    thing_scores = [1.0 if sources[i] == SOURCE_OLD else float(scores[i])
                    for _, i in sorted(result.thing_sources.items())]
    n_old_kept = int((sources == SOURCE_OLD).sum())
    return RelabelResult(panoptic=result, thing_scores=thing_scores, pred_things=int((sources == SOURCE_PRED).sum()),
                         old_kept=n_old_kept, old_replaced=int(old_masks.shape[0]) - n_old_kept)
