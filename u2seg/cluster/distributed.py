"""Distributed spherical/L2 k-means on Ray: shard actors hold the vectors, the driver holds centroids.

Why this shape: the descriptors of a large dataset do not fit one process (docs/stages.md: streaming), but a
Lloyd step only needs per-cluster sums and counts, which add up across shards. Each `_KMeansShard`
actor reads only its own Parquet files into one float32 array and answers `partial_stats` for the
centroids the driver broadcasts; the driver reduces (in shard order, so results are deterministic) and
calls `update_centroids` — the same math as single-process `kmeans` (cluster/kmeans.py).

Determinism and resume: the empty-cluster rng of iteration i is `default_rng([seed, i])`, so the
checkpoint (centroids, iteration, inertia history, split count, converged flag; written atomically after
every iteration) is all the state a resumed run needs to finish exactly like an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
import resource
import time
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import faiss
import fsspec
import numpy as np
import psutil
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
import ray

from u2seg.cluster.arrow import iter_list_column
from u2seg.cluster.kmeans import (
    KMeansResult,
    as_matrix,
    content_keys,
    key_threshold,
    normalize_rows,
    partial_stats,
    update_centroids,
)
from u2seg.cluster.kmeans import init_centroids as sample_init_centroids

log = logging.getLogger(__name__)

_CKPT_VERSION = 2
_SUBSAMPLE_SALT = 0xD1
_INIT_SALT = 0x1417


# ----------------------------------------------------------------------------------------------- sources


def _to_fsspec(filesystem: Any) -> fsspec.AbstractFileSystem:
    """Accept an fsspec or a pyarrow filesystem; work with fsspec's API everywhere below."""
    if isinstance(filesystem, fsspec.AbstractFileSystem):
        return filesystem
    if isinstance(filesystem, pa.fs.FileSystem):
        from fsspec.implementations.arrow import ArrowFSWrapper

        return ArrowFSWrapper(filesystem)
    raise TypeError(f"filesystem must be an fsspec or pyarrow filesystem, got {type(filesystem)}")


def _is_part(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return name.endswith(".parquet") and not name.startswith(("_", "."))


def resolve_parquet_files(
    source: str | os.PathLike | Sequence[str],
    *,
    storage_options: dict | None = None,
    filesystem: Any = None,
) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """(filesystem, sorted Parquet part paths) for a directory URI, a single file, or a list of files.

    Hidden / underscore files (_SUCCESS, temp names) are skipped in directories.
    """
    uris = [os.fspath(source)] if isinstance(source, (str, os.PathLike)) else [os.fspath(s) for s in source]
    if not uris:
        raise ValueError("empty list of Parquet files")
    if filesystem is not None:
        fs = _to_fsspec(filesystem)
        paths = [fs._strip_protocol(u) for u in uris]
    else:
        fs, _ = fsspec.core.url_to_fs(uris[0], **(storage_options or {}))
        paths = [fs._strip_protocol(u) for u in uris]
    files: list[str] = []
    for p in paths:
        if fs.isdir(p):
            files.extend(sorted(f for f in fs.find(p) if _is_part(f)))
        else:
            files.append(p)
    if not files:
        raise FileNotFoundError(f"no Parquet parts under {uris}")
    return fs, files


# ----------------------------------------------------------------------------------------------- shards


class _KMeansShard:
    """Holds one shard of vectors in memory and computes Lloyd statistics on it (one faiss index/iter)."""

    def __init__(self, shard_index: int, column: str, spherical: bool, num_threads: int) -> None:
        self.shard_index = shard_index
        self.column = column
        self.spherical = spherical
        faiss.omp_set_num_threads(max(1, num_threads))  # do not oversubscribe the CPUs Ray gave us
        self.x = np.zeros((0, 0), dtype=np.float32)
        self._init_keys: np.ndarray | None = None  # content keys of x for the init sample, once loaded

    # -- loading
    def count_rows(self, fs: fsspec.AbstractFileSystem, files: list[str]) -> int:
        total = 0
        for f in files:
            with fs.open(f, "rb") as fh:
                total += pq.ParquetFile(fh).metadata.num_rows
        return total

    def _tables(self, fs: fsspec.AbstractFileSystem, files: list[str]):
        """Yield Arrow tables holding only the descriptor column, a row group at a time."""
        for f in files:
            with fs.open(f, "rb") as fh:
                pf = pq.ParquetFile(fh)
                for rg in range(pf.num_row_groups):
                    yield pf.read_row_group(rg, columns=[self.column])

    def load(self, fs: fsspec.AbstractFileSystem, files: list[str], n_rows: int, fraction: float,
             seed: int) -> tuple[int, int]:
        """Read this shard into one float32 array, keeping about `fraction` of its `n_rows` rows.

        The rows kept are those whose content key (:func:`content_keys`) falls below a threshold: the
        same rows whatever the part layout or shard count. Without subsampling the array is preallocated
        once and filled block by block, so the peak is the shard plus one row group; with subsampling the
        kept blocks (bounded by k * max_points_per_centroid overall) are concatenated at the end.
        """
        keep_all = fraction >= 1.0
        threshold = key_threshold(fraction)
        x: np.ndarray | None = None
        kept: list[np.ndarray] = []
        offset = 0  # rows of the shard seen so far
        d: int | None = None
        for table in self._tables(fs, files):
            col = table.column(self.column)
            for mat in iter_list_column(col):
                m = len(mat)
                if d is None:
                    d = mat.shape[1]
                    if keep_all:
                        x = np.empty((n_rows, d), dtype=np.float32)
                elif mat.shape[1] != d:
                    raise ValueError(f"shard {self.shard_index}: dimension {mat.shape[1]} != {d}")
                if keep_all:
                    x[offset : offset + m] = mat  # type: ignore[index]
                else:
                    kept.append(mat[content_keys(mat, seed, _SUBSAMPLE_SALT) < threshold].copy())
                offset += m
        if offset != n_rows:
            raise RuntimeError(f"shard {self.shard_index}: read {offset}/{n_rows} rows")
        if not keep_all:
            x = np.concatenate(kept, axis=0) if kept else None
        self.x = x if x is not None else np.zeros((0, 0), dtype=np.float32)
        if self.spherical and len(self.x):
            normalize_rows(self.x, inplace=True)
        if len(self.x) and not np.isfinite(self.x).all():
            raise ValueError(f"shard {self.shard_index}: descriptors contain NaN or Inf")
        self._init_keys = None
        return self.x.shape

    # -- Lloyd
    def _keys(self, seed: int) -> np.ndarray:
        if self._init_keys is None:
            self._init_keys = content_keys(self.x, seed, _INIT_SALT) if len(self.x) else np.zeros(0, np.uint64)
        return self._init_keys

    def smallest_keys(self, m: int, seed: int) -> np.ndarray:
        """The m smallest init keys of this shard, sorted (round 1 of picking the init sample)."""
        keys = self._keys(seed)
        if m < len(keys):
            keys = keys[np.argpartition(keys, m - 1)[:m]]
        return np.sort(keys)

    def rows_up_to(self, threshold: np.uint64, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(keys, rows) of this shard whose init key is <= threshold (round 2)."""
        keys = self._keys(seed)
        sel = np.flatnonzero(keys <= threshold)
        return keys[sel], self.x[sel].copy()

    def stats(self, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        k, d = centroids.shape
        if len(self.x) == 0:
            return np.zeros((k, d)), np.zeros(k, dtype=np.int64), 0.0
        return partial_stats(self.x, centroids, self.spherical)

    def memory(self) -> dict:
        """Shard size, this actor's memory (current/peak RSS) and CPU time, for benchmarks/monitoring."""
        proc = psutil.Process()
        rss = int(proc.memory_info().rss)
        cpu = proc.cpu_times()
        return {
            "shard": self.shard_index,
            "rows": len(self.x),
            "shard_bytes": int(self.x.nbytes),
            "rss_bytes": rss,
            # ru_maxrss is the kernel's high-water mark (KiB), updated lazily: never report below current
            "peak_rss_bytes": max(rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
            "cpu_s": cpu.user + cpu.system,  # this actor's CPU time so far (load + all iterations)
            "node": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
        }


KMeansShard = ray.remote(_KMeansShard)


def init_sample(actors: Sequence[Any], m: int, seed: int) -> np.ndarray:
    """The m rows with the smallest content keys over all shards, in key order: the same sample (and so
    the same initial centroids) whatever the part layout. Two rounds: the m-th smallest key overall,
    then the rows up to it; only m keys per shard and about m rows in total cross the network."""
    keys = np.sort(np.concatenate(ray.get([a.smallest_keys.remote(m, seed) for a in actors])))
    if len(keys) < m:
        raise ValueError(f"cannot draw an init sample of {m} from {len(keys)} points")
    parts = ray.get([a.rows_up_to.remote(keys[m - 1], seed) for a in actors])
    all_keys = np.concatenate([p[0] for p in parts])
    rows = np.concatenate([p[1] for p in parts if len(p[1])], axis=0)
    order = np.argsort(all_keys, kind="stable")[:m]
    return rows[order]


# ----------------------------------------------------------------------------------------------- checkpoint


def _write_atomic(uri: str, data: bytes, storage_options: dict | None) -> None:
    """Local: write a temp file then rename (atomic on POSIX). Object stores: one PUT (atomic by design)."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    if "file" in fs.protocol or "local" in fs.protocol:
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def _read_checkpoint(uri: str, storage_options: dict | None) -> dict | None:
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    if not fs.exists(path):
        return None
    with np.load(io.BytesIO(fs.cat_file(path)), allow_pickle=False) as z:
        return {name: z[name] for name in z.files}


def _save_checkpoint(uri: str, storage_options: dict | None, **state: Any) -> None:
    buf = io.BytesIO()
    np.savez(buf, version=_CKPT_VERSION, **state)
    _write_atomic(uri, buf.getvalue(), storage_options)


def _signature(**parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------- driver


@dataclass
class _Lloyd:
    """The state a Lloyd loop carries between iterations (and through a checkpoint)."""

    centroids: np.ndarray
    iteration: int = 0
    history: list[float] = field(default_factory=list)
    n_splits: int = 0
    converged: bool = False


def distributed_kmeans(
    source: str | os.PathLike | Sequence[str],
    k: int,
    *,
    column: str = "descriptor",
    num_shards: int = 2,
    niter: int = 20,
    seed: int = 0,
    spherical: bool = True,
    tol: float = 1e-4,
    checkpoint_uri: str | None = None,
    storage_options: dict | None = None,
    filesystem: Any = None,
    init_sample_size: int | None = None,
    max_points_per_centroid: int | None = 256,
    init_centroids: np.ndarray | None = None,
    init_method: str = "random",
    shard_num_cpus: float = 1,
) -> KMeansResult:
    """k-means over Parquet parts (a folder URI, or a list of files), with Ray shard actors.

    Stops after `niter` Lloyd iterations or when the relative inertia change drops below `tol` (0
    disables). When n > k * max_points_per_centroid each shard keeps a content-keyed subsample so that
    about k * max_points_per_centroid points are clustered in total (faiss's rule; None disables it).
    The checkpoint's signature names the parts by file name, not location, so a moved run root resumes.
    `init_centroids` ([k, d]) fixes the start (e.g. to compare with `kmeans`); otherwise k distinct
    points are drawn (`init_method` "random" or "kmeans++") from a sample of `init_sample_size` points
    (default min(n, 10k)) picked by content key across the shards. `checkpoint_uri` (a file URI, local
    or s3://; `storage_options` apply) is written after every iteration and resumed from when its
    signature (k, d, seed, data, ...) matches. `filesystem` (fsspec or pyarrow) overrides how the
    Parquet source is opened. Ray must be initialised by the caller.
    """
    t0 = time.perf_counter()
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not ray.is_initialized():
        raise RuntimeError("distributed_kmeans needs Ray: call ray.init(...) first")
    fs, files = resolve_parquet_files(source, storage_options=storage_options, filesystem=filesystem)
    if num_shards > len(files):
        log.warning("only %d Parquet files: using as many shards instead of %d", len(files), num_shards)
        num_shards = len(files)
    shard_files = [files[i::num_shards] for i in range(num_shards)]
    threads = max(1, int(shard_num_cpus))
    actors = [KMeansShard.options(num_cpus=shard_num_cpus, scheduling_strategy="SPREAD").remote(
        i, column, spherical, threads) for i in range(num_shards)]
    try:
        rows, kept, d, n_train = _load_shards(actors, fs, shard_files, k, seed, max_points_per_centroid)
        t_load = time.perf_counter()
        init_given = None
        if init_centroids is not None:
            init_given = as_matrix(init_centroids)
            if init_given.shape != (k, d):
                raise ValueError(f"init_centroids must be [{k}, {d}], got {init_given.shape}")
        sig = _signature(
            k=k, d=d, seed=seed, spherical=spherical, tol=tol, column=column,
            source=[posixpath.basename(f) for f in files], rows=rows, n_train=n_train,
            max_points_per_centroid=max_points_per_centroid, num_shards=len(actors),
            init=None if init_given is None else hashlib.sha1(init_given.tobytes()).hexdigest(),
            init_sample_size=init_sample_size, init_method=init_method,
        )  # fmt: skip
        state = _resume_or_init(actors, sig, checkpoint_uri, storage_options, init_given, k, seed, spherical,
                                max(k, min(kept, init_sample_size or 10 * k)), init_method)
        t_init = time.perf_counter()
        _lloyd(actors, state, niter=niter, seed=seed, spherical=spherical, tol=tol, sig=sig,
               checkpoint_uri=checkpoint_uri, storage_options=storage_options)
        t_iter = time.perf_counter()
        ref = ray.put(state.centroids)
        parts = ray.get([a.stats.remote(ref) for a in actors])
        sizes = np.sum([p[1] for p in parts], axis=0).astype(np.int64)
        final = float(sum(p[2] for p in parts))
        shard_info = ray.get([a.memory.remote() for a in actors])
        t_end = time.perf_counter()
    finally:
        for a in actors:
            ray.kill(a)
    return KMeansResult(
        centroids=state.centroids, inertia=state.history, sizes=sizes, n_splits=state.n_splits,
        final_inertia=final, n_points=kept,
        timings={"load": t_load - t0, "init": t_init - t_load, "iterations": t_iter - t_init,
                 "final_assign": t_end - t_iter, "total": t_end - t0},
        shard_info=shard_info,
    )


def _load_shards(actors: Sequence[Any], fs: fsspec.AbstractFileSystem, shard_files: list[list[str]], k: int,
                 seed: int, max_points_per_centroid: int | None) -> tuple[list[int], int, int, int]:
    """Count and load every shard (subsampled when large); returns (rows per shard, points kept, d, n_train)."""
    rows = [int(r) for r in ray.get([a.count_rows.remote(fs, f) for a, f in zip(actors, shard_files, strict=True)])]
    n = sum(rows)
    if k > n:
        raise ValueError(f"k-means with k={k} clusters needs at least k points, got n={n}")
    n_train = n
    if max_points_per_centroid and n > k * max_points_per_centroid:
        n_train = k * max_points_per_centroid
        log.info("clustering a subsample of about %d / %d points (max_points_per_centroid)", n_train, n)
    fraction = n_train / n
    shapes = ray.get([a.load.remote(fs, f, r, fraction, seed)
                      for a, f, r in zip(actors, shard_files, rows, strict=True)])
    kept = sum(int(s[0]) for s in shapes)
    if fraction < 1.0:
        log.info("content-keyed subsample kept %d points (expected %d)", kept, n_train)
        if kept < k:
            raise ValueError(f"the subsample kept {kept} points, fewer than k={k}: raise max_points_per_centroid")
    dims = {int(s[1]) for s in shapes if s[0] > 0}
    if len(dims) != 1:
        raise ValueError(f"shards disagree on the descriptor dimension: {sorted(dims)}")
    return rows, kept, dims.pop(), n_train


def _resume_or_init(actors: Sequence[Any], sig: str, checkpoint_uri: str | None, storage_options: dict | None,
                    init_given: np.ndarray | None, k: int, seed: int, spherical: bool, sample_size: int,
                    init_method: str) -> _Lloyd:
    """The checkpointed state of this exact run, else fresh centroids (given, or drawn from the shards)."""
    state = _read_checkpoint(checkpoint_uri, storage_options) if checkpoint_uri else None
    if state is not None and str(state["signature"]) != sig:
        warnings.warn(f"ignoring k-means checkpoint {checkpoint_uri}: signature mismatch (another run's)",
                      stacklevel=3)
        state = None
    if state is not None:
        log.info("resuming k-means from %s at iteration %d", checkpoint_uri, int(state["iteration"]))
        return _Lloyd(centroids=state["centroids"].astype(np.float32), iteration=int(state["iteration"]),
                      history=[float(v) for v in state["inertia"]], n_splits=int(state["n_splits"]),
                      converged=bool(state["converged"]))
    if init_given is not None:
        centroids = init_given.copy()
    else:
        centroids = sample_init_centroids(init_sample(actors, sample_size, seed), k, seed, init_method)
    return _Lloyd(centroids=normalize_rows(centroids) if spherical else centroids)


def _lloyd(actors: Sequence[Any], state: _Lloyd, *, niter: int, seed: int, spherical: bool, tol: float, sig: str,
           checkpoint_uri: str | None, storage_options: dict | None) -> None:
    """Lloyd iterations from ``state.iteration`` to ``niter`` (or convergence), checkpointing each one."""
    for it in range(state.iteration, niter):
        if state.converged:
            break
        ref = ray.put(state.centroids)
        parts = ray.get([a.stats.remote(ref) for a in actors])
        sums = parts[0][0].copy()
        counts = parts[0][1].copy()
        inertia = parts[0][2]
        for s, c, i in parts[1:]:  # reduced in shard order: deterministic
            sums += s
            counts += c
            inertia += i
        state.history.append(float(inertia))
        rng = np.random.default_rng([seed, it])  # per-iteration: a resumed run draws the same splits
        state.centroids, ns = update_centroids(sums, counts, state.centroids, spherical, rng)
        state.n_splits += ns
        state.iteration = it + 1
        if tol > 0 and len(state.history) >= 2:
            prev = state.history[-2]
            state.converged = abs(prev - state.history[-1]) <= tol * max(abs(prev), np.finfo(np.float64).tiny)
        log.info("k-means iteration %d: inertia=%.6g splits=%d", it, inertia, ns)
        if checkpoint_uri:
            _save_checkpoint(
                checkpoint_uri, storage_options, signature=sig, centroids=state.centroids,
                iteration=state.iteration, inertia=np.asarray(state.history, dtype=np.float64),
                n_splits=state.n_splits, converged=state.converged,
            )  # fmt: skip
