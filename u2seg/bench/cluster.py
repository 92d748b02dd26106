"""Benchmark: single-process faiss k-means vs Ray-sharded k-means on the same synthetic descriptors.

Answers two questions for the cluster stage: what does distribution cost (or gain) in wall time on the
same CPUs, and does it reach the same objective; and does each shard actor hold only its shard (peak
RSS per actor vs the driver), which is the point of sharding (docs/stages.md, non-negotiables: streaming).

    python -m u2seg.bench.cluster --n 1000000 --d 256 --k 800 --niter 10 --workdir /tmp/bench_cluster
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import threading
import time

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from u2seg.cluster.arrow import list_column_to_numpy, matrix_to_list_array
from u2seg.cluster.distributed import distributed_kmeans
from u2seg.cluster.kmeans import kmeans, normalize_rows

log = logging.getLogger(__name__)

_MB = 1024**2


def write_synthetic_vectors(
    out_dir: str, n: int, d: int, *, n_parts: int, n_modes: int, noise: float = 1.0, seed: int = 0
) -> list[str]:
    """Normalised Gaussian-mixture vectors as Parquet parts (list<float32> `descriptor`), part by part.

    Never holds more than one part in memory, so the benchmark can write more data than it clusters.
    """
    os.makedirs(out_dir, exist_ok=True)
    centers = np.random.default_rng([seed, 0]).normal(size=(n_modes, d)).astype(np.float32)
    bounds = np.linspace(0, n, n_parts + 1).astype(np.int64)
    paths = []
    for i in range(n_parts):
        rng = np.random.default_rng([seed, 1, i])
        m = int(bounds[i + 1] - bounds[i])
        x = centers[rng.integers(n_modes, size=m)]
        x += noise * rng.standard_normal(size=(m, d), dtype=np.float32)
        normalize_rows(x, inplace=True)
        path = os.path.join(out_dir, f"part-{i:05d}.parquet")
        pq.write_table(pa.table({"descriptor": matrix_to_list_array(x)}), path, row_group_size=16384)
        paths.append(path)
    return paths


def _read_rows(paths: list[str], rows: np.ndarray) -> np.ndarray:
    """Rows at global indices (sorted) from the parts, reading one part at a time."""
    out, offset = [], 0
    for p in paths:
        m = pq.ParquetFile(p).metadata.num_rows
        lo, hi = np.searchsorted(rows, [offset, offset + m])
        if hi > lo:
            part = list_column_to_numpy(pq.read_table(p, columns=["descriptor"]).column(0))
            out.append(part[rows[lo:hi] - offset])
        offset += m
    return np.concatenate(out)


def _cpu_s() -> float:
    """CPU seconds (user + system, all threads) of this process so far."""
    t = psutil.Process().cpu_times()
    return t.user + t.system


class _PeakRSS:
    """Samples this process's RSS in a thread: the driver's peak during one phase."""

    def __init__(self, interval: float = 0.05) -> None:
        self.proc = psutil.Process()
        self.interval = interval
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> _PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def bench_cluster(
    n: int = 1_000_000,
    d: int = 256,
    k: int = 800,
    niter: int = 10,
    num_shards: int = 2,
    workdir: str | None = None,
    *,
    seed: int = 0,
    n_parts: int | None = None,
    keep_data: bool = False,
) -> dict:
    """Run both k-means paths on the same data and initial centroids; return timings, objectives, memory.

    Both use all n points (no max_points_per_centroid subsampling) and exactly `niter` iterations
    (tol=0). Starts a local Ray (num_cpus=4) only if none is initialised, and stops only that one.
    """
    own_ray = not ray.is_initialized()
    if own_ray:
        ray.init(address="local", num_cpus=4, log_to_driver=False)  # never join a stray cluster
    tmp = workdir or tempfile.mkdtemp(prefix="bench_cluster_")
    data_dir = os.path.join(tmp, "vectors")
    try:
        t0 = time.perf_counter()
        n_parts = n_parts or max(4 * num_shards, n // 50_000)
        paths = write_synthetic_vectors(data_dir, n, d, n_parts=n_parts, n_modes=k, seed=seed)
        t_write = time.perf_counter() - t0
        rows = np.sort(np.random.default_rng([seed, 2]).choice(n, size=k, replace=False))
        init = _read_rows(paths, rows)
        log.info("wrote %d x %d vectors in %d parts (%.1f s)", n, d, n_parts, t_write)

        with _PeakRSS() as drv:
            t1, c1 = time.perf_counter(), _cpu_s()
            dist = distributed_kmeans(
                data_dir, k, num_shards=num_shards, niter=niter, tol=0, seed=seed,
                init_centroids=init, max_points_per_centroid=None,
            )  # fmt: skip
            t_dist, cpu_driver = time.perf_counter() - t1, _cpu_s() - c1
        log.info("distributed: %.1f s, final inertia %.6g", t_dist, dist.final_inertia)

        t2 = time.perf_counter()
        x = np.concatenate([list_column_to_numpy(pq.read_table(p, columns=["descriptor"])[0]) for p in paths])
        t_load = time.perf_counter() - t2
        t3, c3 = time.perf_counter(), _cpu_s()
        single = kmeans(x, k, niter=niter, seed=seed, init_centroids=init, max_points_per_centroid=None)
        t_single, cpu_single = time.perf_counter() - t3, _cpu_s() - c3
        del x
        log.info("single: %.1f s (+%.1f s load), final inertia %.6g", t_single, t_load, single.final_inertia)
    finally:
        if not keep_data:
            shutil.rmtree(data_dir if workdir else tmp, ignore_errors=True)
        if own_ray:
            ray.shutdown()

    rel = abs(dist.final_inertia - single.final_inertia) / single.final_inertia
    return {
        "n": n, "d": d, "k": k, "niter": niter, "num_shards": num_shards, "n_parts": n_parts,
        "data_bytes": n * d * 4,
        "write_s": t_write,
        "single_s": t_single,
        "single_load_s": t_load,
        "single_timings": single.timings,
        "distributed_s": t_dist,
        "distributed_timings": dist.timings,
        "ratio_distributed_over_single": t_dist / t_single,
        # CPU seconds: robust to other load on a shared machine (wall times are not)
        "single_cpu_s": cpu_single,
        "distributed_cpu_s": cpu_driver + sum(s["cpu_s"] for s in dist.shard_info),
        "distributed_driver_cpu_s": cpu_driver,
        "single_final_inertia": single.final_inertia,
        "distributed_final_inertia": dist.final_inertia,
        "relative_inertia_diff": rel,
        "single_inertia": single.inertia,
        "distributed_inertia": dist.inertia,
        "max_centroid_abs_diff": float(np.abs(dist.centroids - single.centroids).max()),
        "shards": [
            {"rows": s["rows"], "shard_mb": s["shard_bytes"] / _MB, "rss_mb": s["rss_bytes"] / _MB,
             "peak_rss_mb": s["peak_rss_bytes"] / _MB, "cpu_s": s["cpu_s"], "node": s["node"][:12],
             "pid": s["pid"]}
            for s in dist.shard_info
        ],
        "max_shard_peak_rss_mb": max(s["peak_rss_bytes"] for s in dist.shard_info) / _MB,
        "driver_rss_base_mb": drv.base / _MB,
        "driver_peak_rss_during_distributed_mb": drv.peak / _MB,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--k", type=int, default=800)
    ap.add_argument("--niter", type=int, default=10)
    ap.add_argument("--num-shards", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    res = bench_cluster(args.n, args.d, args.k, args.niter, args.num_shards, args.workdir)
    text = json.dumps(res, indent=2)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text)
    print(text)  # the CLI's output


if __name__ == "__main__":
    main()
