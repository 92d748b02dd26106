"""Stage markers and stats: `<stage folder>/_SUCCESS` holds the config hash a finished stage ran with."""

from __future__ import annotations

import json
import time
from typing import Any

from u2seg.config import U2SegConfig
from u2seg.io import RunRoot, layout
from u2seg.pipeline.stages import Stage


def is_done(root: RunRoot, st: Stage, config_hash: str) -> bool:
    """True when the stage finished with the same config hash (a rerun would redo the same work)."""
    if not root.exists(st.marker()):
        return False
    try:
        marker = json.loads(root.read_bytes(st.marker()))
    except ValueError:
        return False
    return marker.get("config_hash") == config_hash


def mark_done(root: RunRoot, st: Stage, config_hash: str, stats: dict[str, Any]) -> None:
    """Write `<folder>/stats.json`, then `<folder>/_SUCCESS` last."""
    root.write_json(st.marker(layout.STATS), stats)
    root.write_json(st.marker(), {"config_hash": config_hash, "finished_at": time.time()})


def write_resolved_config(root: RunRoot, cfg: U2SegConfig) -> None:
    """The resolved config (secrets redacted) and its hash, at the run root."""
    root.write_text(layout.CONFIG, f"# config_hash: {cfg.hash()}\n" + cfg.to_yaml(redact=True))
