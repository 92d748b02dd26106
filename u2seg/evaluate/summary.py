"""Flat headline numbers of an evaluation, and the text tables that show them (log, CLI, pipeline summary)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

_AP_KEYS = ("AP", "AP50", "AP75", "AR100")
SUMMARY_COLUMNS = ("pq", "sq", "rq", "pq_things", "pq_stuff", "miou", "pixel_accuracy", "ap_segm",
                   "ap_agnostic_segm")


def flat_stats(metrics: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Flat numbers for the pipeline summary table (fractions in [0, 1]; absent metrics left out)."""
    im, pan, sem = metrics["images"], metrics["panoptic"], metrics["semantic"]
    stats: dict[str, Any] = {"predictions": prefix, "images": im["evaluated"], "gt_images": im["gt"],
                             "gt_without_prediction": im["gt_without_prediction"],
                             "predictions_without_gt": im["predictions_without_gt"],
                             "mapped_categories": metrics["summary"]["mapped_categories"]}
    for part, suffix in (("All", ""), ("Things", "_things"), ("Stuff", "_stuff")):
        for k in ("pq", "sq", "rq"):
            stats[k + suffix] = pan[part][k]
    stats["miou"] = sem["miou"]
    stats["pixel_accuracy"] = sem["pixel_accuracy"]
    inst = metrics.get("instance") or {}
    for mode, infix in (("class_aware", ""), ("class_agnostic", "_agnostic")):
        for iou in ("segm", "bbox"):
            res = (inst.get(mode) or {}).get(iou) or {}
            for key in _AP_KEYS:
                if res.get(key) is not None:
                    stats[f"{key.lower()}{infix}_{iou}"] = res[key]
    return stats


def format_table(stats: Mapping[str, Any]) -> str:
    """A compact, log-friendly table of the headline numbers (percentages)."""

    def pct(key: str) -> str:
        v = stats.get(key)
        return f"{100 * v:6.1f}" if isinstance(v, (int, float)) else "     -"

    lines = [f"  {stats['predictions']}: {stats['images']} images ({stats['gt_without_prediction']} gt "
             f"without prediction, {stats['predictions_without_gt']} predictions without gt), "
             f"{stats['mapped_categories']} categories mapped",
             "            PQ     SQ     RQ"]
    for name, suffix in (("all", ""), ("things", "_things"), ("stuff", "_stuff")):
        lines.append(f"  {name:<7} {pct('pq' + suffix)} {pct('sq' + suffix)} {pct('rq' + suffix)}")
    lines.append(f"  mIoU {pct('miou')}   pixel acc {pct('pixel_accuracy')}")
    if any(k.startswith("ap") for k in stats):
        lines.append("            AP   AP50   AP75  AR100")
        for name, infix in (("segm", ""), ("bbox", ""), ("segm", "_agnostic"), ("bbox", "_agnostic")):
            label = name + (" ag." if infix else "")
            cells = " ".join(pct(f"{k.lower()}{infix}_{name}") for k in _AP_KEYS)
            lines.append(f"  {label:<9}{cells}")
    return "\n".join(lines)


def metric_rows(rows: Sequence[tuple[str, Mapping[str, Any]]], columns: Sequence[str] = SUMMARY_COLUMNS,
                label_width: int = 16) -> list[str]:
    """One line per (label, flat stats), scores in percent, for the pipeline summary."""
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
