"""Map pseudo categories to ground-truth categories by their overlap.

Cluster ids mean nothing to a labeled benchmark, so before any metric each predicted (pseudo)
category is mapped to a ground-truth category. The evidence is a confusion matrix of pixel counts
accumulated over the whole evaluation set: rows are predicted category ids, columns ground-truth
category ids.

Conventions (shared by every metric in this package):
- Ground-truth void pixels are ignored everywhere (they are never evidence).
- Predicted void pixels on valid ground truth are kept apart in `Confusion.unassigned`: they are
  misses for the ground-truth class, but no predicted class is charged for them.
- A mapping is a plain `dict[int, int]` (pred category id -> gt category id) of Python ints, so
  `json.dumps` works; `mapping_from_json` restores int keys after a JSON round trip.
- A predicted category absent from the mapping is "unmapped". Every metric treats its pixels or
  segments as predicted void: they can never be correct, and since they belong to no ground-truth
  category they are not charged as a false positive to any category either (PQ and AP count false
  positives per category; semantic IoU unions are per category). `panoptic_quality` reports how
  many such segments it dropped.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

logger = logging.getLogger(__name__)

_KEY_SHIFT = np.int64(1 << 31)


@dataclass
class Confusion:
    """Pixel overlap between predicted and ground-truth categories over an evaluation set."""

    pred_ids: np.ndarray  # int64 [n_pred], sorted category ids (rows)
    gt_ids: np.ndarray  # int64 [n_gt], sorted category ids (columns)
    counts: np.ndarray  # int64 [n_pred, n_gt], pixels predicted as row and labeled as column
    unassigned: np.ndarray  # int64 [n_gt], gt pixels whose prediction is void

    @classmethod
    def from_array(cls, counts: np.ndarray, unassigned: np.ndarray | None = None) -> Confusion:
        """Wrap a bare matrix; category ids are its row/column indices."""
        counts = np.asarray(counts, dtype=np.int64)
        if counts.ndim != 2:
            raise ValueError(f"confusion must be 2-D, got shape {counts.shape}")
        n_pred, n_gt = counts.shape
        if unassigned is None:
            unassigned = np.zeros(n_gt, dtype=np.int64)
        return cls(np.arange(n_pred, dtype=np.int64), np.arange(n_gt, dtype=np.int64), counts,
                   np.asarray(unassigned, dtype=np.int64))

    def subset(self, pred_ids: Iterable[int] | None = None, gt_ids: Iterable[int] | None = None) -> Confusion:
        """Restrict to some categories, e.g. to match thing clusters only to gt thing classes."""
        rows = self._index(self.pred_ids, pred_ids)
        cols = self._index(self.gt_ids, gt_ids)
        return Confusion(self.pred_ids[rows], self.gt_ids[cols], self.counts[np.ix_(rows, cols)],
                         self.unassigned[cols])

    @staticmethod
    def _index(ids: np.ndarray, wanted: Iterable[int] | None) -> np.ndarray:
        if wanted is None:
            return np.arange(len(ids))
        want = np.asarray(sorted({int(w) for w in wanted}), dtype=np.int64)
        return np.flatnonzero(np.isin(ids, want))

    def to_dict(self) -> dict:
        """JSON-ready form (saved next to the metrics so a mapping can be re-derived offline)."""
        return {"pred_ids": self.pred_ids.tolist(), "gt_ids": self.gt_ids.tolist(),
                "counts": self.counts.tolist(), "unassigned": self.unassigned.tolist()}

    @classmethod
    def from_dict(cls, obj: Mapping) -> Confusion:
        gt_ids = np.asarray(obj["gt_ids"], dtype=np.int64)
        counts = np.asarray(obj["counts"], dtype=np.int64).reshape(len(obj["pred_ids"]), len(gt_ids))
        return cls(np.asarray(obj["pred_ids"], dtype=np.int64), gt_ids, counts,
                   np.asarray(obj["unassigned"], dtype=np.int64))


@dataclass
class OverlapAccumulator:
    """Sparse running pixel overlap; picklable, so parallel workers can each fill one and merge.

    Category maps may use any non-negative ids; `pred_void` / `gt_void` mark unlabeled pixels.
    """

    pred_void: int = 0
    gt_void: int = 0
    pairs: Counter = field(default_factory=Counter)  # (pred_id, gt_id) -> pixels
    unassigned: Counter = field(default_factory=Counter)  # gt_id -> pixels with void prediction

    def add(self, pred_map: np.ndarray, gt_map: np.ndarray) -> None:
        """Count one image's pixel overlap of two category maps of equal shape."""
        if pred_map.shape != gt_map.shape:
            raise ValueError(f"shape mismatch: pred {pred_map.shape} vs gt {gt_map.shape}")
        pred = pred_map.astype(np.int64, copy=False).ravel()
        gt = gt_map.astype(np.int64, copy=False).ravel()
        if pred.size and (min(pred.min(), gt.min()) < 0 or max(pred.max(), gt.max()) >= _KEY_SHIFT):
            raise ValueError("category ids must be in [0, 2**31)")
        keep = gt != self.gt_void
        keys, cnt = np.unique(pred[keep] * _KEY_SHIFT + gt[keep], return_counts=True)
        for key, c in zip(keys.tolist(), cnt.tolist(), strict=True):
            p, g = divmod(key, int(_KEY_SHIFT))
            if p == self.pred_void:
                self.unassigned[g] += c
            else:
                self.pairs[(p, g)] += c

    def add_pairs(self, overlaps: Mapping[tuple[int, int], int]) -> None:
        """Add precomputed (pred_id, gt_id) -> pixels overlaps (e.g. instance masks)."""
        for (p, g), c in overlaps.items():
            self.pairs[(int(p), int(g))] += int(c)

    def merge(self, other: OverlapAccumulator) -> OverlapAccumulator:
        self.pairs.update(other.pairs)
        self.unassigned.update(other.unassigned)
        return self

    def result(self, pred_ids: Iterable[int] = (), gt_ids: Iterable[int] = ()) -> Confusion:
        """Dense matrix over the seen ids plus any declared ones (declared-but-unseen rows stay 0)."""
        p_all = {p for p, _ in self.pairs} | {int(p) for p in pred_ids}
        g_all = {g for _, g in self.pairs} | set(self.unassigned) | {int(g) for g in gt_ids}
        p_arr = np.asarray(sorted(p_all), dtype=np.int64)
        g_arr = np.asarray(sorted(g_all), dtype=np.int64)
        p_idx = {p: i for i, p in enumerate(p_arr.tolist())}
        g_idx = {g: j for j, g in enumerate(g_arr.tolist())}
        counts = np.zeros((len(p_arr), len(g_arr)), dtype=np.int64)
        for (p, g), c in self.pairs.items():
            counts[p_idx[p], g_idx[g]] += c
        unassigned = np.zeros(len(g_arr), dtype=np.int64)
        for g, c in self.unassigned.items():
            unassigned[g_idx[g]] += c
        return Confusion(p_arr, g_arr, counts, unassigned)


def panoptic_category_map(ids: np.ndarray, segments: Sequence[Mapping], *, void: int = 0) -> np.ndarray:
    """Turn a panoptic segment-id map into a category-id map (unknown ids and id 0 -> `void`).

    Crowd segments keep their category: their pixels are genuine evidence of what the class looks like.
    """
    lut_ids = np.asarray([int(s["id"]) for s in segments], dtype=np.int64)
    lut_cat = np.asarray([int(s["category_id"]) for s in segments], dtype=np.int64)
    out = np.full(ids.shape, void, dtype=np.int64)
    if len(lut_ids) == 0:
        return out
    order = np.argsort(lut_ids)
    lut_ids, lut_cat = lut_ids[order], lut_cat[order]
    pos = np.clip(np.searchsorted(lut_ids, ids), 0, len(lut_ids) - 1)
    hit = lut_ids[pos] == ids
    out[hit] = lut_cat[pos[hit]]
    return out


def instance_overlaps(pred_masks: np.ndarray, pred_cats: Sequence[int], gt_masks: np.ndarray,
                      gt_cats: Sequence[int]) -> dict[tuple[int, int], int]:
    """Pixel overlap between categories of (possibly overlapping) instance masks of one image.

    Sum over masks of category a and b of |m_a ∩ m_b| equals (sum of a-masks) . (sum of b-masks), so
    masks are first summed per category: cost is per category pair, not per mask pair.
    """
    pred_sum = _per_category_sum(pred_masks, pred_cats)
    gt_sum = _per_category_sum(gt_masks, gt_cats)
    out: dict[tuple[int, int], int] = {}
    for p, pm in pred_sum.items():
        for g, gm in gt_sum.items():
            c = int(np.dot(pm, gm))
            if c:
                out[(p, g)] = c
    return out


def _per_category_sum(masks: np.ndarray, cats: Sequence[int]) -> dict[int, np.ndarray]:
    if len(cats) != len(masks):
        raise ValueError(f"{len(masks)} masks but {len(cats)} categories")
    out: dict[int, np.ndarray] = {}
    for m, c in zip(masks, cats, strict=True):
        flat = m.reshape(-1).astype(np.int64)
        c = int(c)
        out[c] = out[c] + flat if c in out else flat
    return out


def as_confusion(confusion: Confusion | np.ndarray) -> Confusion:
    return confusion if isinstance(confusion, Confusion) else Confusion.from_array(confusion)


def hungarian_mapping(confusion: Confusion | np.ndarray) -> dict[int, int]:
    """One-to-one pred -> gt mapping that maximises the total matched overlap.

    Rectangular matrices are fine: with more predicted than gt categories, the surplus stays unmapped
    (void, see module doc). Pairs the solver forms with zero overlap are dropped: they carry no
    evidence, and keeping them would make results depend on index order among ties.
    A bare ndarray maps row index -> column index.
    """
    conf = as_confusion(confusion)
    if conf.counts.size == 0:
        return {}
    rows, cols = linear_sum_assignment(conf.counts, maximize=True)
    return {int(conf.pred_ids[r]): int(conf.gt_ids[c])
            for r, c in zip(rows, cols, strict=True) if conf.counts[r, c] > 0}


def majority_mapping(confusion: Confusion | np.ndarray) -> dict[int, int]:
    """Many-to-one mapping: each pred category -> the gt category it overlaps most.

    Not the paper's protocol (that is `hungarian_mapping`); useful as an upper bound on how well the
    clusters could be labeled, since several clusters may share one class. Rows with no overlap stay
    unmapped; ties go to the lowest gt id.
    """
    conf = as_confusion(confusion)
    if conf.counts.size == 0:
        return {}
    best = conf.counts.argmax(axis=1)
    return {int(conf.pred_ids[r]): int(conf.gt_ids[c])
            for r, c in enumerate(best.tolist()) if conf.counts[r, c] > 0}


def mapping_from_json(obj: Mapping) -> dict[int, int]:
    """Restore int keys after `json.loads` (JSON object keys are always strings)."""
    return {int(k): int(v) for k, v in obj.items()}


def compute_mapping(conf: Confusion, method: str, pred_cats: Sequence[Mapping],
                    gt_cats: Sequence[Mapping]) -> dict[int, int]:
    """pseudo -> gt category mapping, things to things and stuff to stuff (see module doc).

    Without ``isthing`` flags on both sides the whole confusion is matched at once.
    """
    if method not in ("hungarian", "majority"):
        raise ValueError(f"matching must be 'hungarian' or 'majority', got {method!r}")
    solve = hungarian_mapping if method == "hungarian" else majority_mapping
    if not pred_cats or not all("isthing" in c for c in [*pred_cats, *gt_cats]):
        logger.warning("evaluate: categories lack 'isthing'; matching things and stuff together")
        return solve(conf)
    mapping: dict[int, int] = {}
    for flag in (1, 0):
        p = [int(c["id"]) for c in pred_cats if int(c["isthing"]) == flag]
        g = [int(c["id"]) for c in gt_cats if int(c["isthing"]) == flag]
        mapping.update(solve(conf.subset(p, g)))
    return mapping


def mapping_record(conf: Confusion, mapping: Mapping[int, int], method: str,
                   gt_cats: Sequence[Mapping]) -> dict[str, Any]:
    """mapping.json: the mapping, gt names, and the confusion it came from (to re-derive offline)."""
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in gt_cats}
    return {"matching": method, "partition": "things->things, stuff->stuff",
            "mapping": {str(p): int(g) for p, g in sorted(mapping.items())},
            "mapped_names": {str(p): names.get(int(g), str(g)) for p, g in sorted(mapping.items())},
            "confusion": conf.to_dict()}


def matched_pixel_fraction(conf: Confusion, mapping: Mapping[int, int]) -> float:
    """Share of valid ground-truth pixels whose predicted category maps onto their gt category."""
    rows = {int(p): i for i, p in enumerate(conf.pred_ids)}
    cols = {int(g): j for j, g in enumerate(conf.gt_ids)}
    matched = sum(int(conf.counts[rows[p], cols[g]]) for p, g in mapping.items() if p in rows and g in cols)
    total = int(conf.counts.sum() + conf.unassigned.sum())
    return matched / total if total else 0.0
