"""Starting or joining Ray for a stage: the configured cluster, the one `ray job submit` gives, or a local one."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any

from u2seg.config import U2SegConfig

log = logging.getLogger(__name__)

# Starting a local Ray on a busy machine can miss Ray's fixed 30 s raylet start-up wait; try this often.
LOCAL_RAY_START_ATTEMPTS = 3


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

    runtime_env = {"worker_process_setup_hook": "u2seg.pipeline.ray_session.quiet_worker_logs"}
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
