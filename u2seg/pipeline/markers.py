"""Stage markers: what a finished stage ran with and what it consumed, so a rerun knows what is stale.

``<stage folder>/_SUCCESS`` (written last) holds the stage's config hash and knob values, the output
fingerprints of the upstream stages it consumed, and its own output fingerprint, which downstream stages
record in turn. A stage is done iff its config hash and every consumed fingerprint still match.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from typing import Any

from u2seg.config import U2SegConfig
from u2seg.io import RunRoot, layout
from u2seg.pipeline.stages import Stage


def read_marker(root: RunRoot, st: Stage) -> dict[str, Any] | None:
    """The stage's ``_SUCCESS`` marker, or None when it has not finished (or the marker is unreadable)."""
    try:
        marker = json.loads(root.read_bytes(st.marker()))
    except (FileNotFoundError, ValueError):
        return None
    return marker if isinstance(marker, dict) and "config_hash" in marker else None


def is_done(root: RunRoot, st: Stage, config_hash: str, consumed: Mapping[str, str] | None = None) -> bool:
    """True when the stage finished with this config hash and (when given) these consumed fingerprints."""
    marker = read_marker(root, st)
    if marker is None or marker.get("config_hash") != config_hash:
        return False
    return consumed is None or marker.get("consumed", {}) == dict(consumed)


def mark_done(root: RunRoot, st: Stage, config_hash: str, stats: dict[str, Any], *,
              config: Mapping[str, Any] | None = None, consumed: Mapping[str, str] | None = None,
              output: str | None = None) -> dict[str, Any]:
    """Write `<folder>/stats.json`, then `<folder>/_SUCCESS` last; return the marker."""
    consumed = dict(consumed or {})
    marker = {"config_hash": config_hash, "config": dict(config or {}), "consumed": consumed,
              "output": output or fingerprint(config_hash, consumed), "finished_at": time.time()}
    root.write_json(st.marker(layout.STATS), stats)
    root.write_json(st.marker(), marker)
    return marker


def fingerprint(*parts: Any) -> str:
    """A short digest of JSON-able parts (the identity of a stage's output)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 4) -> str:
    """``cluster.things_k 4 -> 6, label.min_stuff_area 0.002 -> 0`` (the knobs that differ)."""
    keys = sorted(k for k in set(old) | set(new) if old.get(k, "<unset>") != new.get(k, "<unset>"))
    text = ", ".join(f"{k} {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in keys[:limit])
    return text + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "") if keys else "an unrecorded knob"


def write_resolved_config(root: RunRoot, cfg: U2SegConfig) -> None:
    """The resolved config (secrets redacted) and its hash, at the run root."""
    root.write_text(layout.CONFIG, f"# config_hash: {cfg.hash()}\n" + cfg.to_yaml(redact=True))
