"""Manifest listing: streaming parts against listing everything into one list first.

Both list the same local tree of ``n`` files in one run; the ratio of their peak traced memory is what
streaming saves (the naive way grows with n, the streaming one with rows_per_part).
"""

from __future__ import annotations

import os
import tempfile
import time
import tracemalloc
from typing import Any

import fsspec

from u2seg.config import load_config
from u2seg.io import RunRoot
from u2seg.pipeline.manifest import run_manifest


def _traced(fn) -> tuple[Any, float, float]:
    tracemalloc.start()
    t0 = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return out, wall, peak / 2**20


def bench_manifest(n: int = 200_000, per_dir: int = 2_000, rows_per_part: int = 2_000) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "images")
        for i in range(n):
            d = os.path.join(src, f"d{i // per_dir:04d}")
            if i % per_dir == 0:
                os.makedirs(d)
            open(os.path.join(d, f"{i:08d}.jpg"), "wb").close()
        cfg = load_config(None, [f"run.run_root={tmp}/run", f"manifest.inputs=[{src}]",
                                 f"manifest.rows_per_part={rows_per_part}"])
        stats, stream_s, stream_mb = _traced(lambda: run_manifest(cfg, RunRoot(f"{tmp}/run")))
        found, naive_s, naive_mb = _traced(lambda: fsspec.filesystem("file").find(src, detail=True))
    return {"n": n, "rows_per_part": rows_per_part, "parts": stats["parts"], "naive_found": len(found),
            "streaming": {"seconds": round(stream_s, 3), "peak_traced_mib": round(stream_mb, 2)},
            "find_all": {"seconds": round(naive_s, 3), "peak_traced_mib": round(naive_mb, 2)},
            "memory_ratio_find_all_over_streaming": round(naive_mb / max(stream_mb, 1e-6), 2)}
