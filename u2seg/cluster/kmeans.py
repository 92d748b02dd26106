"""k-means on faiss, plus the Lloyd building blocks the distributed version reuses.

Single-process `kmeans` drives faiss's own `Clustering`; `distributed_kmeans` (cluster/distributed.py)
runs the same Lloyd step as `partial_stats` on each shard + `update_centroids` on the driver, so both
paths share the definitions of assignment, objective, empty-cluster handling and renormalisation.

Conventions (both paths):
- spherical=True: vectors and centroids are L2-normalised, assignment is by maximum inner product
  (faiss IndexFlatIP); for unit centroids this is the same as nearest in L2.
- `inertia` is always the sum of squared L2 distances of points to their assigned centroid (lower is
  better). For unit vectors this is 2n - 2 * sum(cosine), so it is comparable between the two paths.
- Empty clusters are re-seeded like faiss's `split_clusters`: a large cluster is picked with probability
  proportional to (size - 1), its centroid is copied and the pair is pushed apart by a (1 +/- 1/1024)
  symmetric perturbation, and its count is split between the two.

No Ray here: this module must stay importable in any worker.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import faiss
import numpy as np
import scipy.sparse as sp

log = logging.getLogger(__name__)

SPLIT_EPS = 1.0 / 1024.0  # faiss's EPS: a bit above float16 resolution, so the split pair separates
_CHUNK = 16384  # rows per block in partial_stats: bounds search/one-hot temporaries


@dataclass
class KMeansResult:
    """Outcome of a k-means run (single-process or distributed)."""

    centroids: np.ndarray  # float32 [k, d]; unit rows when spherical
    inertia: list[float]  # objective at the assignment step of each Lloyd iteration
    sizes: np.ndarray  # int64 [k]: training points nearest each returned centroid
    n_splits: int  # empty clusters re-seeded over the whole run (many = bad init or k too large)
    final_inertia: float = float("nan")  # objective of the returned centroids on the training points
    n_points: int = 0  # training points actually clustered (after max_points_per_centroid subsampling)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase
    shard_info: list[dict] = field(default_factory=list)  # distributed only: rows / memory per shard

    @property
    def n_iter(self) -> int:
        return len(self.inertia)

    def stats(self) -> dict:
        """JSON-ready summary (what the cluster stage stores next to the centroids)."""
        return {
            "k": int(self.centroids.shape[0]),
            "d": int(self.centroids.shape[1]),
            "n_points": int(self.n_points),
            "n_iter": self.n_iter,
            "inertia": [float(v) for v in self.inertia],
            "final_inertia": float(self.final_inertia),
            "sizes": [int(v) for v in self.sizes],
            "n_splits": int(self.n_splits),
            "empty_clusters": int((self.sizes == 0).sum()),
            "timings": {k: float(v) for k, v in self.timings.items()},
        }


def as_matrix(x: np.ndarray) -> np.ndarray:
    """Validate and return a C-contiguous float32 [n, d] array (faiss needs exactly this)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D [n, d] array, got shape {x.shape}")
    return x


def normalize_rows(x: np.ndarray, *, inplace: bool = False) -> np.ndarray:
    """L2-normalise rows (zero rows stay zero). In place only when asked, to never surprise callers."""
    x = as_matrix(x)
    if not inplace:
        x = x.copy()
    faiss.normalize_L2(x)
    return x


def is_unit(x: np.ndarray, atol: float = 1e-4) -> bool:
    """True when every row already has unit L2 norm (skips a full copy for pre-normalised data)."""
    if len(x) == 0:
        return True
    sq = np.einsum("ij,ij->i", x, x)
    return bool(np.abs(sq - 1.0).max() <= atol)


def build_index(centroids: np.ndarray, spherical: bool) -> faiss.Index:
    """Exact faiss index over the centroids: IP for spherical, L2 otherwise; on GPU if faiss has one."""
    c = as_matrix(centroids)
    index = faiss.IndexFlatIP(c.shape[1]) if spherical else faiss.IndexFlatL2(c.shape[1])
    if faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(c)
    return index


def assign(
    index_or_centroids: faiss.Index | np.ndarray, x: np.ndarray, *, spherical: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of each row of x.

    Returns (labels int64 [n], scores float32 [n]); scores are faiss's: inner products for an IP index
    (spherical, higher = closer), squared L2 distances for an L2 index. `spherical` only matters when
    raw centroids are passed (it picks the index type).
    """
    index = (
        index_or_centroids
        if isinstance(index_or_centroids, faiss.Index)
        else build_index(index_or_centroids, spherical)
    )
    x = as_matrix(x)
    if len(x) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    scores, labels = index.search(x, 1)
    return labels[:, 0].astype(np.int64, copy=False), scores[:, 0]


def partial_stats(
    x: np.ndarray, centroids: np.ndarray, spherical: bool, *, chunk_size: int = _CHUNK
) -> tuple[np.ndarray, np.ndarray, float]:
    """One shard's share of a Lloyd step: per-cluster float64 sums, counts, and squared-L2 inertia.

    Sums of several shards add up to the sums over their union, which is what makes the distributed
    reduction exact. Processed in row blocks so the temporaries stay small.
    """
    c = as_matrix(centroids)
    x = as_matrix(x)
    k, d = c.shape
    if x.shape[1] != d and len(x):
        raise ValueError(f"points have d={x.shape[1]}, centroids d={d}")
    index = build_index(c, spherical)
    c_sq = np.einsum("ij,ij->i", c, c).astype(np.float64)
    sums = np.zeros((k, d), dtype=np.float64)
    counts = np.zeros(k, dtype=np.int64)
    inertia = 0.0
    for i0 in range(0, len(x), chunk_size):
        block = x[i0 : i0 + chunk_size]
        labels, scores = assign(index, block)
        if spherical:
            x_sq = np.einsum("ij,ij->i", block, block).astype(np.float64)
            dist = x_sq - 2.0 * scores.astype(np.float64) + c_sq[labels]
        else:
            dist = scores.astype(np.float64)
        inertia += float(np.maximum(dist, 0.0).sum())
        m = len(block)
        # block sums in float32 (<= chunk_size terms, ~1e-5 relative) accumulated in float64 across blocks;
        # 2-3x cheaper than converting every block to float64 first
        onehot = sp.csr_matrix((np.ones(m, dtype=np.float32), (labels, np.arange(m))), shape=(k, m))
        sums += onehot @ block
        counts += np.bincount(labels, minlength=k)
    return sums, counts, inertia


def _split_empty(
    centroids: np.ndarray, counts: np.ndarray, rng: np.random.Generator
) -> tuple[int, np.ndarray]:
    """Re-seed empty clusters in place, faiss-style (see module doc). Returns (n_splits, unfixed mask)."""
    k, d = centroids.shape
    hassign = counts.astype(np.float64).copy()
    plus = np.where(np.arange(d) % 2 == 0, 1.0 + SPLIT_EPS, 1.0 - SPLIT_EPS)
    minus = 2.0 - plus  # the mirror factor (1 -/+ eps) for the donor
    n_splits = 0
    unfixed = np.zeros(k, dtype=bool)
    for ci in np.flatnonzero(hassign == 0):
        weights = np.maximum(hassign - 1.0, 0.0)
        total = weights.sum()
        if total <= 0:  # every cluster has <= 1 point: nothing can be split
            unfixed[ci] = True
            continue
        cj = int(np.searchsorted(np.cumsum(weights), rng.random() * total, side="right"))
        cj = min(cj, k - 1)
        centroids[ci] = centroids[cj] * plus
        centroids[cj] = centroids[cj] * minus
        hassign[ci] = hassign[cj] / 2.0
        hassign[cj] -= hassign[ci]
        n_splits += 1
    return n_splits, unfixed


def update_centroids(
    sums: np.ndarray,
    counts: np.ndarray,
    prev_centroids: np.ndarray,
    spherical: bool,
    rng: np.random.Generator,
) -> tuple[np.ndarray, int]:
    """New centroids from reduced Lloyd statistics: means, empty-cluster splits, spherical renorm.

    `rng` drives only the choice of which cluster to split; pass a generator seeded per iteration so a
    resumed run makes the same choices. A cluster that cannot be re-seeded (only possible when there
    are fewer points than clusters) keeps its previous centroid.
    """
    counts = np.asarray(counts)
    k = len(counts)
    if sums.shape[0] != k or prev_centroids.shape != sums.shape:
        raise ValueError(f"shapes: sums {sums.shape} counts {counts.shape} prev {prev_centroids.shape}")
    cent = np.zeros(sums.shape, dtype=np.float64)
    nonempty = counts > 0
    cent[nonempty] = sums[nonempty] / counts[nonempty, None]
    n_splits, unfixed = _split_empty(cent, counts, rng)
    if unfixed.any():
        log.warning("%d empty clusters cannot be re-seeded; keeping their previous centroids", unfixed.sum())
        cent[unfixed] = prev_centroids[unfixed]
    out = cent.astype(np.float32)
    if spherical:
        faiss.normalize_L2(out)
    return out, n_splits


_FMIX = (np.uint64(33), np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53))


def content_keys(x: np.ndarray, seed: int, salt: int = 0, chunk: int = 65536) -> np.ndarray:
    """A pseudo-random uint64 per row that depends only on the row's values (and seed, salt).

    Why: choosing "the rows with the smallest keys" picks the same rows however the data is split into
    Parquet parts and shards, so a run resumed after a crash (whose parts group images differently)
    initialises k-means exactly like an uninterrupted one. Hash: a seeded linear combination of the
    float32 bit patterns mod 2^64, then murmur3's 64-bit finaliser.
    """
    bits = np.ascontiguousarray(as_matrix(x)).view(np.uint32)
    rng = np.random.default_rng([seed, salt, 0x5EED])
    mult = rng.integers(1, 2**63, size=bits.shape[1], dtype=np.uint64) | np.uint64(1)
    out = np.empty(len(bits), dtype=np.uint64)
    shift, m1, m2 = _FMIX
    for lo in range(0, len(bits), chunk):
        h = (bits[lo: lo + chunk].astype(np.uint64) * mult).sum(axis=1, dtype=np.uint64)
        h ^= h >> shift
        h *= m1
        h ^= h >> shift
        h *= m2
        h ^= h >> shift
        out[lo: lo + chunk] = h
    return out


def key_threshold(fraction: float) -> np.uint64:
    """Keys below this are a ``fraction`` of all uint64 keys (a Bernoulli sample by content)."""
    if fraction >= 1.0:
        return np.uint64(2**64 - 1)
    return np.uint64(int(fraction * 2.0**64))


def init_centroids(sample: np.ndarray, k: int, seed: int, method: str = "random") -> np.ndarray:
    """Initial centroids drawn from `sample` (float32 [k, d], rows not renormalised).

    "random" (faiss's default): k distinct rows chosen uniformly, the same distribution as picking k
    points from the full data when the sample itself is a uniform subsample. "kmeans++": D^2 sampling
    (Arthur & Vassilvitskii), O(n k d) on the sample — better starts for large k, slower.
    """
    sample = as_matrix(sample)
    n = len(sample)
    if k > n:
        raise ValueError(f"cannot pick {k} initial centroids from {n} points (need k <= n)")
    rng = np.random.default_rng(seed)
    if method == "random":
        return sample[rng.choice(n, size=k, replace=False)].copy()
    if method != "kmeans++":
        raise ValueError(f"unknown init method {method!r} (use 'random' or 'kmeans++')")
    chosen = [int(rng.integers(n))]
    x_sq = np.einsum("ij,ij->i", sample, sample).astype(np.float64)
    best = np.full(n, np.inf)
    for _ in range(1, k):
        c = sample[chosen[-1]]
        dist = np.maximum(x_sq - 2.0 * (sample @ c).astype(np.float64) + float(c @ c), 0.0)
        best = np.minimum(best, dist)
        best[chosen] = 0.0
        total = best.sum()
        if total <= 0:  # all remaining points coincide with chosen ones: fall back to uniform distinct picks
            rest = np.setdiff1d(np.arange(n), chosen)
            chosen.extend(rng.choice(rest, size=k - len(chosen), replace=False).tolist())
            break
        chosen.append(int(np.searchsorted(np.cumsum(best), rng.random() * total, side="right")))
    return sample[np.asarray(chosen)].copy()


_init_centroids = init_centroids  # kmeans() has a parameter of the same name


def _faiss_lloyd(
    xt: np.ndarray, init: np.ndarray, *, niter: int, seed: int, spherical: bool
) -> tuple[np.ndarray, list[float], int]:
    """faiss.Kmeans from fixed initial centroids -> (centroids, squared-L2 inertia per iteration, splits)."""
    k, d = init.shape
    gpus = faiss.get_num_gpus()
    km = faiss.Kmeans(
        d,
        k,
        niter=niter,
        seed=seed,
        spherical=spherical,
        max_points_per_centroid=len(xt) + 1,  # subsampling is done by the caller, deterministically
        min_points_per_centroid=1,
        gpu=gpus if gpus > 0 else False,
    )
    km.train(xt, init_centroids=init.copy())
    centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
    obj = [float(s["obj"]) for s in km.iteration_stats]
    if spherical:
        # faiss reports sum of inner products; convert to squared L2 (centroids are unit at every step)
        x_sq = float(np.einsum("ij,ij->", xt, xt, dtype=np.float64))
        obj = [x_sq + len(xt) - 2.0 * o for o in obj]
    return centroids, obj, int(sum(s["nsplit"] for s in km.iteration_stats))


def train_subsample(n: int, k: int, max_points_per_centroid: int | None, seed: int) -> np.ndarray | None:
    """Sorted row indices to train on when n > k * max_points_per_centroid (faiss's rule), else None."""
    if not max_points_per_centroid or n <= k * max_points_per_centroid:
        return None
    rng = np.random.default_rng([seed, 0x5EED])
    return np.sort(rng.choice(n, size=k * max_points_per_centroid, replace=False))


def kmeans(
    x: np.ndarray,
    k: int,
    *,
    niter: int = 20,
    seed: int = 0,
    spherical: bool = True,
    max_points_per_centroid: int | None = 256,
    init_centroids: np.ndarray | None = None,
    init_method: str = "random",
) -> KMeansResult:
    """Single-process k-means with faiss (GPU when faiss sees one).

    x: float32 [n, d]; normalised (on a copy) when spherical and not already unit. When
    n > k * max_points_per_centroid a uniform subsample of that size is clustered (faiss's rule; None
    disables it). init_centroids: [k, d] start (e.g. to compare with the distributed run); otherwise
    `init_centroids(train, k, seed, init_method)`. sizes/final_inertia are computed on the training
    points with the returned centroids.
    """
    t0 = time.perf_counter()
    x = as_matrix(x)
    n, d = x.shape
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > n:
        raise ValueError(f"k-means with k={k} clusters needs at least k points, got n={n}")
    if spherical and not is_unit(x):
        x = normalize_rows(x)
    idx = train_subsample(n, k, max_points_per_centroid, seed)
    xt = x if idx is None else x[idx]
    if init_centroids is None:
        init = _init_centroids(xt, k, seed, init_method)
    else:
        init = as_matrix(init_centroids)
        if init.shape != (k, d):
            raise ValueError(f"init_centroids must be [{k}, {d}], got {init.shape}")
    t1 = time.perf_counter()
    if len(xt) == k:  # every point is a centroid (faiss would copy them and report a fake iteration)
        centroids, inertia, n_splits = xt.copy(), [], 0
    else:
        centroids, inertia, n_splits = _faiss_lloyd(xt, init, niter=niter, seed=seed, spherical=spherical)
    t2 = time.perf_counter()
    _, counts, final = partial_stats(xt, centroids, spherical)
    t3 = time.perf_counter()
    return KMeansResult(
        centroids=centroids,
        inertia=inertia,
        sizes=counts,
        n_splits=n_splits,
        final_inertia=final,
        n_points=len(xt),
        timings={"prepare": t1 - t0, "train": t2 - t1, "final_assign": t3 - t2, "total": t3 - t0},
    )
