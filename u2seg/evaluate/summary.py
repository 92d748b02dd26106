"""Flat headline numbers of an evaluation, and the text tables that show them (log, CLI, pipeline summary).

A metrics.json holds one block per evaluation protocol (`protocol_blocks`); the flat stats keep the
same key names for every protocol (pq, sq, ..., ap_segm), the first protocol's at top level (so code
reading ``stats["pq"]`` keeps working) and every protocol's under ``stats["protocols"][name]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

_AP_KEYS = ("AP", "AP50", "AP75", "AR100")
SUMMARY_COLUMNS = ("pq", "sq", "rq", "pq_things", "pq_stuff", "miou", "pixel_accuracy", "ap_segm",
                   "ap_agnostic_segm", "ap_bbox")

# Headline rows of the side-by-side tables (report, notebook): label, path into a protocol block, percent?
HEADLINE_ROWS: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("mapped categories", ("summary", "mapped_categories"), False),
    ("PQ", ("panoptic", "All", "pq"), True),
    ("SQ", ("panoptic", "All", "sq"), True),
    ("RQ", ("panoptic", "All", "rq"), True),
    ("PQ things", ("panoptic", "Things", "pq"), True),
    ("PQ stuff", ("panoptic", "Stuff", "pq"), True),
    ("mIoU", ("semantic", "miou"), True),
    ("pixel accuracy", ("semantic", "pixel_accuracy"), True),
    ("mIoU (U2Seg in-place relabel)", ("semantic_inplace", "miou"), True),
    ("AP mask", ("instance", "class_aware", "segm", "AP"), True),
    ("AP50 mask", ("instance", "class_aware", "segm", "AP50"), True),
    ("AP box", ("instance", "class_aware", "bbox", "AP"), True),
    ("AP50 box", ("instance", "class_aware", "bbox", "AP50"), True),
    ("AR100 mask", ("instance", "class_aware", "segm", "AR100"), True),
    ("class-agnostic AP mask", ("instance", "class_agnostic", "segm", "AP"), True),
    ("class-agnostic AP50 mask", ("instance", "class_agnostic", "segm", "AP50"), True),
)


def protocol_blocks(metrics: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """{protocol: block} of a metrics.json, in the order they were configured.

    A metrics.json written before protocols existed (one mapping, its blocks at top level) reads as one
    block named after its ``summary.matching``.
    """
    if "protocols" in metrics:
        return dict(metrics["protocols"])
    summary = metrics.get("summary") or {}
    return {str(summary.get("matching", "hungarian")): metrics}


def dig(obj: Any, path: Sequence[str]) -> Any:
    """``obj[p0][p1]...``, or None where a key is missing."""
    for p in path:
        if not isinstance(obj, Mapping) or p not in obj:
            return None
        obj = obj[p]
    return obj


def block_stats(block: Mapping[str, Any]) -> dict[str, Any]:
    """One protocol's flat numbers (fractions in [0, 1]; absent metrics left out)."""
    pan, sem = block["panoptic"], block["semantic"]
    stats: dict[str, Any] = {"mapped_categories": (block.get("summary") or {}).get("mapped_categories")}
    for part, suffix in (("All", ""), ("Things", "_things"), ("Stuff", "_stuff")):
        for k in ("pq", "sq", "rq"):
            stats[k + suffix] = pan[part][k]
    stats["miou"] = sem["miou"]
    stats["pixel_accuracy"] = sem["pixel_accuracy"]
    if "semantic_inplace" in block:
        stats["miou_inplace"] = block["semantic_inplace"]["miou"]
        stats["pixel_accuracy_inplace"] = block["semantic_inplace"]["pixel_accuracy"]
    inst = block.get("instance") or {}
    for mode, infix in (("class_aware", ""), ("class_agnostic", "_agnostic")):
        for iou in ("segm", "bbox"):
            res = (inst.get(mode) or {}).get(iou) or {}
            for key in _AP_KEYS:
                if res.get(key) is not None:
                    stats[f"{key.lower()}{infix}_{iou}"] = res[key]
    return stats


def flat_stats(metrics: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Flat numbers for the stage's stats and the pipeline summary: image counts, the first protocol's
    numbers at top level (and its name as ``protocol``), every protocol's under ``protocols``."""
    im = metrics["images"]
    per = {name: block_stats(block) for name, block in protocol_blocks(metrics).items()}
    first = next(iter(per))
    return {"predictions": prefix, "images": im["evaluated"], "gt_images": im["gt"],
            "gt_without_prediction": im["gt_without_prediction"],
            "predictions_without_gt": im["predictions_without_gt"],
            "protocol": first, **per[first], "protocols": per}


def per_protocol(stats: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """{protocol: flat numbers} of flat stats (stats from before protocols read as one, named '')."""
    return dict(stats.get("protocols") or {str(stats.get("protocol", "")): stats})


_TABLE = (("PQ", "pq"), ("SQ", "sq"), ("RQ", "rq"), ("PQth", "pq_things"), ("PQst", "pq_stuff"),
          ("mIoU", "miou"), ("pixAcc", "pixel_accuracy"), ("APmask", "ap_segm"), ("APbox", "ap_bbox"),
          ("agAPmask", "ap_agnostic_segm"))


def format_table(stats: Mapping[str, Any]) -> str:
    """A compact, log-friendly table of the headline numbers (percentages), one row per protocol."""

    def pct(st: Mapping[str, Any], key: str) -> str:
        v = st.get(key)
        return f"{100 * v:.1f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"

    per = per_protocol(stats)
    width = max(10, *(len(p) + 2 for p in per))
    lines = [f"  {stats['predictions']}: {stats['images']} images ({stats['gt_without_prediction']} gt "
             f"without prediction, {stats['predictions_without_gt']} predictions without gt)",
             "  " + f"{'protocol':<{width}}" + "".join(f"{h:>9}" for h, _ in _TABLE) + f"{'mapped':>8}"]
    for name, st in per.items():
        lines.append("  " + f"{name:<{width}}" + "".join(f"{pct(st, k):>9}" for _, k in _TABLE)
                     + f"{format_value(st.get('mapped_categories')):>8}")
        if "miou_inplace" in st:
            lines.append("  " + " " * width + f"  mIoU {pct(st, 'miou_inplace')} / pixel acc "
                         f"{pct(st, 'pixel_accuracy_inplace')} with U2Seg's in-place relabel")
    return "\n".join(lines)


def metric_rows(rows: Sequence[tuple[str, Mapping[str, Any]]], columns: Sequence[str] = SUMMARY_COLUMNS,
                label_width: int | None = None) -> list[str]:
    """One line per (label, flat stats), scores in percent, for the pipeline summary."""
    if label_width is None:
        label_width = max(16, *(len(label) + 2 for label, _ in rows)) if rows else 16
    lines = [f"{'metrics':<{label_width}}" + "".join(f"{c:>17}" for c in columns)]
    for label, st in rows:
        lines.append(f"{label:<{label_width}}" + "".join(f"{format_value(st.get(c)):>17}" for c in columns))
    return lines


def format_value(v: Any) -> str:
    """Fractions as percentages with one decimal, other numbers as they are, None as '-'."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v * 100:.1f}" if v <= 1.0 else f"{v:.1f}"
    return str(v)
