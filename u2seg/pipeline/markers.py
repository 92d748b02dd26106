"""Stage markers and stats: `<stage>/_SUCCESS` holds the config hash a finished stage ran with."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from u2seg.config import U2SegConfig
from u2seg.io import RunRoot

log = logging.getLogger(__name__)


def is_done(root: RunRoot, stage: str, config_hash: str) -> bool:
    """True when the stage finished with the same config hash (a rerun would redo the same work)."""
    if not root.exists(stage, "_SUCCESS"):
        return False
    try:
        marker = json.loads(root.read_bytes(stage, "_SUCCESS"))
    except ValueError:
        return False
    return marker.get("config_hash") == config_hash


def mark_done(root: RunRoot, stage: str, config_hash: str, stats: dict[str, Any]) -> None:
    """Write `<stage>/stats.json`, then `<stage>/_SUCCESS` last."""
    root.write_json(f"{stage}/stats.json", stats)
    root.write_json(f"{stage}/_SUCCESS", {"config_hash": config_hash, "finished_at": time.time()})


def clear_marker(root: RunRoot, stage: str) -> None:
    root.remove(f"{stage}/_SUCCESS")


def write_resolved_config(root: RunRoot, cfg: U2SegConfig) -> None:
    """The resolved config (secrets redacted) and its hash, at the run root."""
    root.write_text("config.yaml", f"# config_hash: {cfg.hash()}\n" + cfg.to_yaml(redact=True))
