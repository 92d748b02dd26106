"""Run one stage: open the run root, skip when already done with the same config, time it, mark it."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

from u2seg.config import U2SegConfig
from u2seg.io import RunRoot
from u2seg.pipeline.markers import is_done, mark_done, write_resolved_config

log = logging.getLogger(__name__)

# stage -> (module, function); imported lazily so `u2seg manifest` does not import torch.
STAGE_FUNCTIONS: dict[str, tuple[str, str]] = {
    "manifest": ("u2seg.pipeline.manifest", "run_manifest"),
    "extract": ("u2seg.pipeline.extract", "run_extract"),
    "cluster": ("u2seg.pipeline.cluster", "run_cluster"),
    "label": ("u2seg.pipeline.label", "run_label"),
    "train": ("u2seg.pipeline.train", "run_train"),
    "evaluate": ("u2seg.pipeline.evaluate", "run_evaluate"),
}
NEEDS_RAY = {"extract", "cluster", "label", "train"}
# Starting a local Ray on a busy machine can miss Ray's fixed 30 s raylet start-up wait; try this often.
LOCAL_RAY_START_ATTEMPTS = 3
# What each stage writes besides its `<stage>/` marker folder: wiped when the stage's config changes.
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "manifest": ("manifest",), "extract": ("extract",), "cluster": ("cluster",), "label": ("labels",),
    "train": ("train", "predict", "selftrain"), "evaluate": ("eval",),
}


def open_root(cfg: U2SegConfig) -> RunRoot:
    return RunRoot(cfg.run.run_root, cfg.run.storage.storage_options(),
                   retry_s=cfg.run.storage.retry_s)


def ensure_ray(cfg: U2SegConfig) -> None:
    """Join the configured cluster (run.ray_address), the one `ray job submit` gives, or start a local one."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"log_to_driver": True, "logging_level": logging.WARNING}
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")  # the env var: set by `ray job submit`
    if address and address != "local":
        ray.init(address=address, **kwargs)
    else:  # never join some other cluster that happens to run on this machine
        start_local_ray(num_cpus=cfg.run.ray_num_cpus, **kwargs)
    quiet_ray_data()
    log.info("ray: %s", ray.cluster_resources())


def start_local_ray(attempts: int = LOCAL_RAY_START_ATTEMPTS, **kwargs: Any) -> None:
    """Start a private local Ray, retrying a start-up that timed out (an overloaded laptop or CI box)."""
    import ray

    runtime_env = {"worker_process_setup_hook": "u2seg.pipeline.runner.quiet_worker_logs"}
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address="local", runtime_env=runtime_env, **kwargs)
            return
        except Exception as exc:  # Ray raises a bare Exception when its raylet does not come up in time
            ray.shutdown()
            if attempt == attempts or "timed out during startup" not in str(exc):
                raise
            stopped = stop_ray_children()  # the failed attempt's GCS/raylet would only add to the load
            log.warning("ray: local start-up attempt %d/%d timed out (%s); stopped %d of its processes, "
                        "retrying", attempt, attempts, exc, stopped)
            time.sleep(2.0 * attempt)


def quiet_worker_logs() -> None:
    """Runs in each worker of a local Ray. `ray[data,train]` has no dashboard, so Ray Train's placement-group
    cleaner cannot reach the state API and would warn about it every second of training."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def stop_ray_children(timeout: float = 10.0) -> int:
    """Kill the Ray processes this process started (GCS, raylet, dashboard, workers) after a failed start."""
    import psutil

    def is_ray(p: psutil.Process) -> bool:
        try:
            name, cmd = p.name(), " ".join(p.cmdline())
        except psutil.Error:
            return False
        return name in ("gcs_server", "raylet") or "/ray/" in cmd or cmd.startswith("ray::")

    procs = [p for p in psutil.Process().children(recursive=True) if is_ray(p)]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(procs, timeout=timeout)
    return len(procs)


def quiet_ray_data() -> None:
    """Our own progress bar and stats replace Ray Data's per-operator console dumps."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def stage_function(stage: str) -> Callable[[U2SegConfig, RunRoot], dict[str, Any]]:
    module, name = STAGE_FUNCTIONS[stage]
    return getattr(importlib.import_module(module), name)


def _claim_outputs(root: RunRoot, stage: str, config_hash: str) -> None:
    """Partial outputs of an interrupted run with the same config are kept (the stage resumes from them);
    outputs made with another config are removed first, so a rerun never mixes two configs."""
    started = f"{stage}/_STARTED"
    if root.exists(started) and root.read_json(started).get("config_hash") != config_hash:
        log.info("%s: config changed since the last run: removing its outputs %s", stage, STAGE_OUTPUTS[stage])
        for rel in (*STAGE_OUTPUTS[stage], f"{stage}/_SUCCESS"):
            root.remove(rel, recursive=True)
    unfinished = sum(root.remove_unfinished_writes(rel) for rel in {stage, *STAGE_OUTPUTS[stage]})
    if unfinished:
        log.info("%s: removed %d unfinished write(s) of an interrupted run", stage, unfinished)
    # run_token fences writers: workers of an older, killed driver that are still finishing a task see a
    # newer token and commit nothing (extract checks it before each commit)
    root.write_json(started, {"config_hash": config_hash, "started_at": time.time(), "run_token": uuid.uuid4().hex})


def run_stage(stage: str, cfg: U2SegConfig, *, force: bool = False) -> dict[str, Any]:
    """Run ``stage`` unless its ``_SUCCESS`` marker holds this config's stage hash; return its stats."""
    root = open_root(cfg)
    root.ensure_writable()
    write_resolved_config(root, cfg)
    h = cfg.stage_hash(stage)
    if not force and is_done(root, stage, h):
        log.info("%s: already done with config %s, skipped", stage, h)
        stats = root.read_json(stage, "stats.json") if root.exists(stage, "stats.json") else {}
        return {**stats, "skipped": True}
    _claim_outputs(root, stage, h)
    if stage in NEEDS_RAY:
        ensure_ray(cfg)
    t0 = time.time()
    log.info("%s: starting (run root %s)", stage, root.uri)
    stats = stage_function(stage)(cfg, root)
    stats = {**stats, "stage": stage, "config_hash": h, "wall_s": round(time.time() - t0, 3)}
    mark_done(root, stage, h, stats)
    log.info("%s: done in %.1fs", stage, stats["wall_s"])
    return stats
