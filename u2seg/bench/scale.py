"""How the pipeline's own overhead grows with the number of images, when the model costs almost nothing.

Tiny images (``--image-px``, default 48) through manifest -> stuff (k-means baseline) -> extract -> cluster ->
label with a tiny ViT at 64 px, at two dataset sizes in one run (default 10,000 and 100,000). For each size, a
fresh driver process runs the stages and reports: wall and CPU seconds per stage (of the driver and the Ray
processes it started, so other jobs on the machine do not count; CPU ms per image is the orchestration overhead:
decode, Ray Data, commits, listing), the driver's peak RSS (it must stay flat: nothing per image on the driver),
files written per 10k images, and the time to list and count the manifest and the ledger.
The ratios between the two sizes are the result.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

STAGES = ("manifest", "stuff", "extract", "cluster", "label")
KNOBS = ["extract.backbone=vit_tiny_patch16_224", "extract.image_size=64", "extract.n_masks=1",
         "extract.batch_size=64", "extract.rows_per_part=1024", "extract.stuff_grid=4", "extract.stuff_dim=8",
         "extract.patches_per_image=2", "extract.amp=none", "extract.refine=none", "extract.descriptor=mask_pool",
         "stuff.method=kmeans", "cluster.things_k=16", "cluster.stuff_k=4", "cluster.niter=3",
         "cluster.num_shards=2", "label.write_semantic=false", "manifest.rows_per_part=10000",
         "run.max_error_fraction=1.0", "run.ray_num_cpus=4"]


def write_images(folder: str, n: int, side: int, seed: int = 0) -> None:
    """``n`` small PNGs (a few coloured blocks each) in sub-folders of 10,000 (as a bucket would be laid out)."""
    import cv2

    rng = np.random.default_rng(seed)
    for i in range(n):
        sub = os.path.join(folder, f"{i // 10_000:04d}")
        if i % 10_000 == 0:
            os.makedirs(sub, exist_ok=True)
        img = np.full((side, side, 3), rng.integers(0, 255, 3), np.uint8)
        y, x = rng.integers(0, side // 2, 2)
        img[y:y + side // 2, x:x + side // 2] = rng.integers(0, 255, 3)
        ok, buf = cv2.imencode(".png", img)
        if not ok:
            raise RuntimeError("PNG encoding failed")
        with open(os.path.join(sub, f"{i:07d}.png"), "wb") as fh:
            fh.write(buf.tobytes())


def _proc_table() -> dict[int, tuple[int, int, int]]:
    """pid -> (ppid, start time, own utime + stime in ticks) of every process now running."""
    table: dict[int, tuple[int, int, int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:  # exited while we looked
                continue
            table[int(entry)] = (int(fields[1]), int(fields[19]), int(fields[11]) + int(fields[12]))
    return table


def _own_cpu_seconds() -> float:
    """The driver process's own CPU (all its threads, the sampler's too: an upper bound): work done on the driver."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class TreeCpu:
    """CPU seconds (user + system) used by this process and every process it started (the Ray processes).

    A thread samples ``/proc`` every ``interval_s`` and keeps, for each descendant ever seen (keyed by pid and
    start time, so a reused pid is a new process), the last CPU time it showed; a process that exits keeps
    its last sample. Other jobs on the machine are not counted (a machine-wide figure would be, which made
    the result depend on load); what a process burns after its last sample, or a process that lives less
    than one interval, is missed: a small undercount, never a negative stage.
    """

    def __init__(self, interval_s: float = 0.5) -> None:
        import threading

        self._seen: dict[tuple[int, int], int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._interval = interval_s
        self._own = 0.0  # CPU seconds of the sampling thread
        self._last = 0.0  # the largest figure returned: ticks are 10 ms, the thread's own CPU finer
        self._thread = threading.Thread(target=self._run, name="tree-cpu", daemon=True)
        self.sample()
        self._thread.start()

    def sample(self) -> None:
        table = _proc_table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        todo, found = [os.getpid()], []
        while todo:
            pid = todo.pop()
            if pid in table:
                found.append(pid)
            todo.extend(children.get(pid, ()))
        with self._lock:
            for pid in found:
                _, start, ticks = table[pid]
                key = (pid, start)
                self._seen[key] = max(self._seen.get(key, 0), ticks)

    def seconds(self) -> float:
        """CPU so far, less what the sampling thread itself spent; never less than an earlier answer (the
        process times come in clock ticks, the thread's own CPU finer, so their difference can dip)."""
        self.sample()
        with self._lock:
            self._last = max(self._last, sum(self._seen.values()) / os.sysconf("SC_CLK_TCK") - self._own)
            return self._last

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            t0 = time.thread_time()
            self.sample()
            with self._lock:
                self._own += time.thread_time() - t0


def scale_driver(config_yaml: str, out_json: str) -> None:
    """The measured driver (a fresh process per size): every stage, then list/count timings and peak RSS."""
    from u2seg.config import load_config
    from u2seg.io import layout
    from u2seg.pipeline.extract_commit import ledger_ids
    from u2seg.pipeline.run_stage import open_root, run_stage

    logging.basicConfig(level=logging.WARNING)
    cfg = load_config(config_yaml)
    stages: dict[str, Any] = {}
    cpu = TreeCpu()
    for name in STAGES:
        t0, c0, d0 = time.time(), cpu.seconds(), _own_cpu_seconds()
        stats = run_stage(name, cfg)
        stages[name] = {"wall_s": round(time.time() - t0, 2), "cpu_s": round(cpu.seconds() - c0, 2),
                        "driver_cpu_s": round(_own_cpu_seconds() - d0, 2),
                        "images": stats.get("images") or stats.get("manifest_images")}
    cpu.close()
    root = open_root(cfg)
    t0 = time.time()
    manifest_rows = layout.count_rows(root, layout.MANIFEST)
    t1 = time.time()
    ledger = len(ledger_ids(root))
    t2 = time.time()
    files = sum(len(fs) for _, _, fs in os.walk(root.path()))
    out = {"stages": stages, "manifest_rows": manifest_rows, "ledger_rows": ledger,
           "count_manifest_s": round(t1 - t0, 4), "read_ledger_ids_s": round(t2 - t1, 4), "files": files,
           "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    with open(out_json, "w") as fh:
        json.dump(out, fh)


def bench_scale(sizes: tuple[int, ...] = (10_000, 100_000), image_px: int = 48,
                workdir: str | None = None) -> dict[str, Any]:
    from u2seg.config import load_config

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for n in sizes:
            images, run = os.path.join(tmp, f"images-{n}"), os.path.join(tmp, f"run-{n}")
            t0 = time.time()
            write_images(images, n, image_px)
            gen_s = time.time() - t0
            cfg = load_config(None, [f"run.run_root={run}", f"manifest.inputs=[{images}]", *KNOBS])
            cfg_path, out_path = os.path.join(tmp, f"cfg-{n}.yaml"), os.path.join(tmp, f"out-{n}.json")
            with open(cfg_path, "w") as fh:
                fh.write(cfg.to_yaml(redact=False))
            t0 = time.time()
            code = f"from u2seg.bench.scale import scale_driver; scale_driver({cfg_path!r}, {out_path!r})"
            subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "RAY_ADDRESS": "local"})
            with open(out_path) as fh:
                r = json.load(fh)
            r["generate_s"] = round(gen_s, 1)
            r["pipeline_wall_s"] = round(time.time() - t0, 1)
            r["cpu_ms_per_image"] = {k: round(1000 * v["cpu_s"] / n, 3) for k, v in r["stages"].items()}
            r["driver_cpu_ms_per_image"] = {k: round(1000 * v["driver_cpu_s"] / n, 3) for k, v in r["stages"].items()}
            r["images_per_s"] = {k: round(n / v["wall_s"], 1) for k, v in r["stages"].items() if v["wall_s"] > 0}
            r["files_per_10k_images"] = round(r["files"] * 10_000 / n, 1)
            results[str(n)] = r
            log.info("bench scale %d: %s", n, r)
    small, large = (results[str(s)] for s in (sizes[0], sizes[-1]))
    return {
        "config": {"sizes": list(sizes), "image_px": image_px, "knobs": KNOBS},
        "runs": results,
        "driver_peak_rss_ratio": round(large["driver_peak_rss_mb"] / small["driver_peak_rss_mb"], 3),
        "cpu_ms_per_image_ratio": {k: round(large["cpu_ms_per_image"][k] / max(small["cpu_ms_per_image"][k], 1e-9), 3)
                                   for k in STAGES},
        "driver_cpu_ms_per_image_ratio": {
            k: round(large["driver_cpu_ms_per_image"][k] / max(small["driver_cpu_ms_per_image"][k], 1e-9), 3)
            for k in STAGES},
    }
