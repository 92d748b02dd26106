"""Run one stage: check its upstream, skip it when nothing it depends on changed, claim its outputs, run it,
and mark it with what it consumed. The stage table (``stages.py``) says what each stage owns and reads."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from u2seg.config import U2SegConfig
from u2seg.errors import UpstreamError
from u2seg.io import RunRoot, layout
from u2seg.pipeline.lease import hold_lease
from u2seg.pipeline.markers import config_changes, mark_done, read_marker, write_resolved_config
from u2seg.pipeline.stages import Stage, stage

log = logging.getLogger(__name__)


def open_root(cfg: U2SegConfig) -> RunRoot:
    return RunRoot(cfg.run.run_root, cfg.run.storage.storage_options(), retry_s=cfg.run.storage.retry_s)


def consumed_fingerprints(root: RunRoot, st: Stage, cfg: U2SegConfig) -> dict[str, str]:
    """The output fingerprints of the stage's upstream stages; refuses missing, unfinished or foreign ones."""
    consumed = {}
    for name in st.upstream:
        up = stage(name)
        marker = read_marker(root, up)
        if marker is None:
            raise UpstreamError(f"{st.name}: {name} has not finished in {root.uri}: run `u2seg {name}` (or "
                                "`u2seg pipeline`) first")
        if marker["config_hash"] != up.config_hash(cfg):
            changes = config_changes(marker.get("config", {}), up.config_values(cfg))
            raise UpstreamError(f"{st.name}: {name} in {root.uri} was made with another config ({changes}); "
                                f"run `u2seg {name}` (or `u2seg pipeline`) with this config first")
        consumed[name] = marker["output"]
    return consumed


def why_run(st: Stage, marker: dict[str, Any] | None, config_hash: str, values: dict[str, Any],
            consumed: dict[str, str], cfg: U2SegConfig, started: bool = False) -> str | None:
    """Why the stage must run, or None when it is done with this config and these inputs."""
    if marker is None:
        return "interrupted: resuming" if started else "not run yet"
    if marker.get("config_hash") != config_hash:
        return "config changed: " + config_changes(marker.get("config", {}), values)
    changed = [name for name in st.upstream if marker.get("consumed", {}).get(name) != consumed.get(name)]
    if changed:
        return f"{', '.join(changed)} changed"
    if st.name == "manifest" and cfg.manifest.refresh:
        return "relisting the sources (manifest.refresh)"
    return None


def claim_outputs(root: RunRoot, st: Stage, config_hash: str, reset_hash: str,
                  consumed: dict[str, str] | None = None) -> None:
    """Make the stage's folder ready for a run with ``config_hash`` and ``consumed`` inputs.

    "reset" stages: outputs made with another config (or, unless the stage is incremental, from other
    upstream outputs) are removed first, so a rerun never mixes two configs; otherwise partial outputs are
    kept and the stage resumes or reconciles from them. Their ``_SUCCESS`` goes either way: the stage is
    not done until it has finished again. "when_done" stages keep everything, marker included, until they
    replace their results. Leftovers of killed writers are removed. A fresh run token fences late
    writers of a killed driver (extract checks it before each commit).
    """
    consumed = dict(consumed or {})
    started = st.marker(layout.STARTED)
    previous = root.read_json(started) if root.exists(started) else None
    if st.replace == "reset":
        stale = previous is not None and (previous.get("reset_hash") != reset_hash or (
            not st.incremental and previous.get("consumed", consumed) != consumed))
        if stale:
            log.info("%s: its outputs were made with another config or other inputs: removing %s", st.name,
                     st.outputs)
            for rel in st.outputs:
                root.remove(rel, recursive=True)
        root.remove(st.marker())
    root.remove(st.marker(layout.PROGRESS))  # the last run's progress is not this run's
    unfinished = sum(root.remove_unfinished_writes(rel) for rel in {st.folder, *st.outputs})
    if unfinished:
        log.info("%s: removed %d unfinished write(s) of an interrupted run", st.name, unfinished)
    root.write_json(started, {"config_hash": config_hash, "reset_hash": reset_hash, "consumed": consumed,
                              "started_at": time.time(), "run_token": uuid.uuid4().hex})


def run_stage(name: str, cfg: U2SegConfig, *, force: bool = False, wait_for_lease_s: float = 0.0) -> dict[str, Any]:
    """Run stage ``name`` unless it is done with this config and its upstream outputs; return its stats."""
    st = stage(name)
    root = open_root(cfg)
    root.ensure_writable()
    with hold_lease(root, cfg.run.lease_s, f"u2seg {name}", wait_s=wait_for_lease_s) as lease:
        write_resolved_config(root, cfg)
        h, values = st.config_hash(cfg), st.config_values(cfg)
        consumed = consumed_fingerprints(root, st, cfg)
        marker = read_marker(root, st)
        reason = "forced (--force)" if force else why_run(st, marker, h, values, consumed, cfg,
                                                          started=root.exists(st.marker(layout.STARTED)))
        if reason is None:
            log.info("%s: done with this config and inputs, skipped", name)
            stats = root.read_json(st.marker(layout.STATS)) if root.exists(st.marker(layout.STATS)) else {}
            return {**stats, "skipped": True}
        log.info("%s: running (%s) in %s", name, reason, root.uri)
        claim_outputs(root, st, h, st.reset_hash(cfg), consumed)
        if st.needs_ray:
            from u2seg.pipeline.ray_session import ensure_ray

            ensure_ray(cfg)
        t0 = time.time()
        stats = st.run_function()(cfg, root)
        output = stats.pop("output_fingerprint", None)
        stats = {**stats, "stage": name, "reason": reason, "config_hash": h, "wall_s": round(time.time() - t0, 3)}
        lease.check()
        new = mark_done(root, st, h, stats, config=values, consumed=consumed, output=output)
        if marker is not None and marker.get("output") == new["output"]:
            log.info("%s: its output is unchanged: downstream stages stay done", name)
        log.info("%s: done in %.1fs", name, stats["wall_s"])
        return stats
