"""The whole pipeline as one job: each stage skipped when its marker holds the same config hash."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from u2seg.config import U2SegConfig
from u2seg.pipeline.runner import open_root, run_stage

log = logging.getLogger(__name__)

PIPELINE_STAGES = ("manifest", "extract", "cluster", "label", "train", "evaluate")


def _has_ground_truth(cfg: U2SegConfig) -> bool:
    return bool(cfg.evaluate.gt_panoptic_json and cfg.evaluate.gt_panoptic_dir)


def run_pipeline(cfg: U2SegConfig, *, force: bool = False, stages: tuple[str, ...] = PIPELINE_STAGES
                 ) -> dict[str, Any]:
    """Run ``stages`` in order; return (and print) a summary with counts, timings and metrics."""
    t0 = time.time()
    summary: dict[str, Any] = {"run_root": open_root(cfg).uri, "stages": {}, "ok": True}
    for stage in stages:
        if stage == "evaluate" and not _has_ground_truth(cfg):
            log.info("evaluate: no ground truth configured (evaluate.gt_panoptic_json), skipped")
            continue
        if stage == "evaluate":
            summary["stages"]["evaluate"] = run_stage("evaluate", cfg, force=force)
            if "train" in stages:
                model_cfg = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, target="model"))
                summary["stages"]["evaluate_model"] = _evaluate_model(model_cfg, force)
            continue
        summary["stages"][stage] = run_stage(stage, cfg, force=force)
    summary["wall_s"] = round(time.time() - t0, 1)
    log.info("pipeline: %d stage(s) in %.1fs; summary below", len(summary["stages"]), summary["wall_s"])
    print(format_summary(summary), flush=True)  # stdout, once: the table is the run's result
    return summary


def _evaluate_model(cfg: U2SegConfig, force: bool) -> dict[str, Any]:
    """Evaluate the trained model's predictions into eval/model/ (the labels' eval stays in eval/)."""
    from u2seg.pipeline.evaluate import run_evaluate

    root = open_root(cfg)
    return run_evaluate(cfg, root)


def format_summary(summary: dict[str, Any]) -> str:
    """A plain-text table: stage, wall time, what it produced; then the metric table."""
    lines = [f"u2seg run root: {summary['run_root']}", f"{'stage':<16}{'time':>9}  result"]
    for stage, st in summary["stages"].items():
        wall = "skipped" if st.get("skipped") else f"{st.get('wall_s', 0):.1f}s"
        keys = [k for k in ("images", "manifest_images", "errors", "masks_assigned", "instances", "segments_now",
                            "steps", "pq", "miou") if k in st]
        desc = ", ".join(f"{k}={_fmt(st[k])}" for k in keys)
        lines.append(f"{stage:<16}{wall:>9}  {desc}")
    metric_rows = [(name, st) for name, st in summary["stages"].items() if name.startswith("evaluate")]
    if metric_rows:
        cols = ("pq", "sq", "rq", "pq_things", "pq_stuff", "miou", "pixel_accuracy", "ap_segm",
                "ap_agnostic_segm")
        lines.append("")
        lines.append(f"{'metrics':<16}" + "".join(f"{c:>17}" for c in cols))
        for name, st in metric_rows:
            target = "model" if name.endswith("model") else "pseudo-labels"
            lines.append(f"{target:<16}" + "".join(f"{_fmt(st.get(c)):>17}" for c in cols))
    lines.append(f"outputs: {summary['run_root']} (labels/, eval/report.html, train/)  total {summary.get('wall_s')}s")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v * 100:.1f}" if v <= 1.0 else f"{v:.1f}"
    return str(v)
