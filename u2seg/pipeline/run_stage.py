"""Run one stage: open the run root, skip it when already done with the same config, claim its outputs,
run it, and mark it done. The stage table (``stages.py``) says what each stage owns and hashes."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from u2seg.config import U2SegConfig
from u2seg.io import RunRoot, layout
from u2seg.pipeline.markers import is_done, mark_done, write_resolved_config
from u2seg.pipeline.stages import Stage, stage

log = logging.getLogger(__name__)


def open_root(cfg: U2SegConfig) -> RunRoot:
    return RunRoot(cfg.run.run_root, cfg.run.storage.storage_options(), retry_s=cfg.run.storage.retry_s)


def claim_outputs(root: RunRoot, st: Stage, config_hash: str, reset_hash: str) -> None:
    """Make the stage's folder ready for a run with ``config_hash``.

    "reset" stages: partial outputs of an interrupted run with the same config are kept (the stage
    resumes from them); outputs made with another config are removed first, so a rerun never mixes two
    configs. "when_done" stages keep everything: they replace their outputs themselves once complete.
    Leftovers of killed writers are removed either way. A fresh run token fences late writers of a
    killed driver (extract checks it before each commit).
    """
    started = st.marker(layout.STARTED)
    previous = root.read_json(started) if root.exists(started) else None
    if st.replace == "reset" and previous is not None and previous.get("reset_hash") != reset_hash:
        log.info("%s: config changed since the last run: removing its outputs %s", st.name, st.outputs)
        for rel in st.outputs:
            root.remove(rel, recursive=True)
        root.remove(st.marker())
    unfinished = sum(root.remove_unfinished_writes(rel) for rel in {st.folder, *st.outputs})
    if unfinished:
        log.info("%s: removed %d unfinished write(s) of an interrupted run", st.name, unfinished)
    root.write_json(started, {"config_hash": config_hash, "reset_hash": reset_hash, "started_at": time.time(),
                              "run_token": uuid.uuid4().hex})


def run_stage(name: str, cfg: U2SegConfig, *, force: bool = False) -> dict[str, Any]:
    """Run stage ``name`` unless its ``_SUCCESS`` marker holds this config's stage hash; return its stats."""
    st = stage(name)
    root = open_root(cfg)
    root.ensure_writable()
    write_resolved_config(root, cfg)
    h = st.config_hash(cfg)
    if not force and is_done(root, st, h):
        log.info("%s: already done with config %s, skipped", name, h)
        stats = root.read_json(st.marker(layout.STATS)) if root.exists(st.marker(layout.STATS)) else {}
        return {**stats, "skipped": True}
    claim_outputs(root, st, h, st.reset_hash(cfg))
    if st.needs_ray:
        from u2seg.pipeline.ray_session import ensure_ray

        ensure_ray(cfg)
    t0 = time.time()
    log.info("%s: starting (run root %s)", name, root.uri)
    stats = st.run_function()(cfg, root)
    stats = {**stats, "stage": name, "config_hash": h, "wall_s": round(time.time() - t0, 3)}
    mark_done(root, st, h, stats)
    log.info("%s: done in %.1fs", name, stats["wall_s"])
    return stats
