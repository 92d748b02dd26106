"""The whole pipeline as one job: every stage of the stage table in order, each skipped when its marker
holds the same config hash; ends with one summary table (stage times and counts, then the metrics)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from u2seg.config import U2SegConfig
from u2seg.evaluate.summary import format_value, metric_rows, per_protocol
from u2seg.pipeline.lease import hold_lease
from u2seg.pipeline.run_stage import open_root, run_stage
from u2seg.pipeline.stages import EVALUATION_STAGES, PIPELINE

log = logging.getLogger(__name__)

_RESULT_KEYS = ("images", "manifest_images", "errors", "masks_assigned", "instances", "segments_now", "steps",
                "protocol", "pq", "miou")
_METRIC_LABELS = {"evaluate": "pseudo-labels", "evaluate_model": "model"}


def has_ground_truth(cfg: U2SegConfig) -> bool:
    """Evaluation runs when a labeled set is configured (its PNG folder may be derived from the JSON)."""
    return bool(cfg.evaluate.gt_panoptic_json)


def run_pipeline(cfg: U2SegConfig, *, force: bool = False, stages: Sequence[str] = PIPELINE,
                 wait_for_lease_s: float = 0.0) -> dict[str, Any]:
    """Run ``stages`` in order under one lease of the run root; return (and print) a summary."""
    t0 = time.time()
    root = open_root(cfg)
    root.ensure_writable()
    summary: dict[str, Any] = {"run_root": root.uri, "stages": {}}
    with hold_lease(root, cfg.run.lease_s, "u2seg pipeline", wait_s=wait_for_lease_s):
        for name in stages:
            if name in (*EVALUATION_STAGES, "predict") and not has_ground_truth(cfg):
                # predictions serve the model's evaluation; `u2seg predict` makes them on demand
                log.info("%s: no ground truth configured (evaluate.gt_panoptic_json), skipped", name)
                continue
            summary["stages"][name] = run_stage(name, cfg, force=force)
    summary["wall_s"] = round(time.time() - t0, 1)
    log.info("pipeline: %d stage(s) in %.1fs; summary below", len(summary["stages"]), summary["wall_s"])
    print(format_summary(summary), flush=True)  # stdout, once: the table is the run's result
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """A plain-text table: stage, wall time, what it produced; then the metric table."""
    lines = [f"u2seg run root: {summary['run_root']}", f"{'stage':<16}{'time':>9}  result"]
    for name, st in summary["stages"].items():
        wall = "skipped" if st.get("skipped") else f"{st.get('wall_s', 0):.1f}s"
        desc = ", ".join(f"{k}={format_value(st[k])}" for k in _RESULT_KEYS if k in st)
        if not st.get("skipped") and st.get("reason"):
            desc += f"  ({st['reason']})"
        lines.append(f"{name:<16}{wall:>9}  {desc}")
    rows = [(f"{_METRIC_LABELS[n]}/{p}" if p else _METRIC_LABELS[n], pst)  # one row per (target, protocol)
            for n, st in summary["stages"].items() if n in _METRIC_LABELS for p, pst in per_protocol(st).items()]
    if rows:
        lines += ["", *metric_rows(rows)]
    lines.append(f"outputs: {summary['run_root']} (labels/, eval/labels/report.html, eval/model/, train/)  "
                 f"total {summary.get('wall_s')}s")
    return "\n".join(lines)
