"""k-means building blocks against plain numpy, faiss parity, empty-cluster splits, Arrow conversion."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from u2seg.cluster.arrow import list_column_to_numpy, matrix_to_list_array
from u2seg.cluster.kmeans import (
    SPLIT_EPS,
    assign,
    init_centroids,
    kmeans,
    normalize_rows,
    partial_stats,
    update_centroids,
)

pytestmark = pytest.mark.unit


def _mixture(n: int = 3000, d: int = 16, m: int = 8, noise: float = 0.3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(m, d))
    return (centers[rng.integers(m, size=n)] + noise * rng.normal(size=(n, d))).astype(np.float32)


def _numpy_lloyd_step(x: np.ndarray, c: np.ndarray, spherical: bool):
    """Reference Lloyd step in float64 numpy (no empty clusters expected)."""
    x64, c64 = x.astype(np.float64), c.astype(np.float64)
    d2 = (x64**2).sum(1)[:, None] - 2 * x64 @ c64.T + (c64**2).sum(1)[None, :]
    labels = (x64 @ c64.T).argmax(1) if spherical else d2.argmin(1)
    inertia = d2[np.arange(len(x)), labels].sum()
    new = np.stack([x64[labels == j].mean(0) for j in range(len(c))])
    if spherical:
        new /= np.linalg.norm(new, axis=1, keepdims=True)
    return labels, inertia, new


@pytest.mark.parametrize("spherical", [True, False])
def test_partial_stats_and_update_reproduce_numpy_lloyd_step(spherical):
    x = _mixture()
    if spherical:
        x = normalize_rows(x)
    c = x[:: len(x) // 8][:8].copy()
    labels, ref_inertia, ref_new = _numpy_lloyd_step(x, c, spherical)

    sums, counts, inertia = partial_stats(x, c, spherical, chunk_size=700)  # several blocks
    np.testing.assert_array_equal(counts, np.bincount(labels, minlength=8))
    np.testing.assert_allclose(inertia, ref_inertia, rtol=1e-5)
    new, n_splits = update_centroids(sums, counts, c, spherical, np.random.default_rng(0))
    assert n_splits == 0
    assert new.dtype == np.float32
    np.testing.assert_allclose(new, ref_new, atol=1e-5)

    # shards add up: the stats of two halves reduce to the stats of the whole
    s1, n1, i1 = partial_stats(x[:1234], c, spherical)
    s2, n2, i2 = partial_stats(x[1234:], c, spherical)
    np.testing.assert_allclose(s1 + s2, sums, rtol=1e-6, atol=1e-5)  # float32 block sums
    np.testing.assert_array_equal(n1 + n2, counts)
    assert i1 + i2 == pytest.approx(inertia, rel=1e-12)


def test_assign_matches_bruteforce_and_index_reuse():
    x = normalize_rows(_mixture(n=500))
    c = normalize_rows(x[:10])
    labels, scores = assign(c, x, spherical=True)
    np.testing.assert_array_equal(labels, (x @ c.T).argmax(1))
    np.testing.assert_allclose(scores, (x @ c.T).max(1), atol=1e-5)
    labels_l2, d2 = assign(c, x, spherical=False)
    ref = ((x[:, None, :] - c[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(labels_l2, ref.argmin(1))
    np.testing.assert_allclose(d2, ref.min(1), atol=1e-5)


def test_empty_cluster_is_split_from_a_large_cluster_faiss_style():
    d = 6
    c = np.arange(3 * d, dtype=np.float64).reshape(3, d) + 1.0
    sums = c * np.array([0, 1, 5])[:, None]  # cluster 0 empty, 1 has one point, 2 has five
    counts = np.array([0, 1, 5])
    new, n_splits = update_centroids(sums, counts, c.astype(np.float32), False, np.random.default_rng(7))
    assert n_splits == 1
    # only cluster 2 has size-1 > 0, so it must be the donor; the pair is pushed apart symmetrically
    up = np.where(np.arange(d) % 2 == 0, 1 + SPLIT_EPS, 1 - SPLIT_EPS)
    np.testing.assert_allclose(new[0], c[2] * up, rtol=1e-6)
    np.testing.assert_allclose(new[2], c[2] * (2 - up), rtol=1e-6)
    np.testing.assert_allclose(new[1], c[1], rtol=1e-6)
    assert not np.allclose(new[0], new[2])


def test_split_donor_probability_follows_size_minus_one_and_is_seeded():
    d, k = 4, 4
    c = np.eye(k, d)
    counts = np.array([0, 2, 11, 1])  # weights (size-1): 0, 1, 10, 0
    sums = c * counts[:, None]
    donors = []
    for s in range(400):
        new, _ = update_centroids(sums, counts, c.astype(np.float32), False, np.random.default_rng(s))
        donors.append(int(np.argmax(np.abs(new[0]))))  # the donor's axis survives the copy
    donors = np.array(donors)
    assert set(donors) <= {1, 2}
    assert 0.85 < (donors == 2).mean() < 0.97  # expected 10/11
    a, _ = update_centroids(sums, counts, c.astype(np.float32), False, np.random.default_rng([3, 5]))
    b, _ = update_centroids(sums, counts, c.astype(np.float32), False, np.random.default_rng([3, 5]))
    np.testing.assert_array_equal(a, b)


def test_several_empty_clusters_split_and_spherical_rows_stay_unit():
    rng = np.random.default_rng(1)
    x = normalize_rows(rng.normal(size=(200, 8)).astype(np.float32))
    # three centroids far from the data direction distribution: duplicates of one point -> empties
    c = normalize_rows(np.concatenate([x[:5], np.repeat(x[5:6], 3, axis=0)]))
    sums, counts, _ = partial_stats(x, c, True)
    assert (counts == 0).sum() >= 2  # ties go to the first duplicate
    new, n_splits = update_centroids(sums, counts, c, True, np.random.default_rng(0))
    assert n_splits == (counts == 0).sum()
    np.testing.assert_allclose(np.linalg.norm(new, axis=1), 1.0, atol=1e-6)
    assert len(np.unique(new.round(6), axis=0)) == len(new)  # every centroid distinct after splitting


def test_kmeans_matches_building_block_lloyd_and_faiss_objective():
    x = normalize_rows(_mixture(n=4000, d=24, m=12, seed=3))
    init = normalize_rows(init_centroids(x, 12, seed=0))
    res = kmeans(x, 12, niter=8, init_centroids=init, max_points_per_centroid=None)
    c, hist = init.copy(), []
    for it in range(8):
        sums, counts, inertia = partial_stats(x, c, True)
        hist.append(inertia)
        c, _ = update_centroids(sums, counts, c, True, np.random.default_rng([0, it]))
    assert res.n_splits == 0
    np.testing.assert_allclose(res.centroids, c, atol=1e-5)
    np.testing.assert_allclose(res.inertia, hist, rtol=1e-4)  # faiss sums the objective in float32
    assert res.sizes.sum() == len(x) and res.sizes.dtype == np.int64
    np.testing.assert_allclose(np.linalg.norm(res.centroids, axis=1), 1.0, atol=1e-5)


def test_kmeans_objective_is_sane_on_a_separated_mixture():
    rng = np.random.default_rng(5)
    centers = 3.0 * rng.normal(size=(6, 16))
    truth = rng.integers(6, size=3000)
    x = (centers[truth] + 0.05 * rng.normal(size=(3000, 16))).astype(np.float32)
    optimum = float(((x - centers[truth]) ** 2).sum())  # ~ the objective of the true partition
    res = kmeans(
        x, 6, niter=20, spherical=False, seed=1, max_points_per_centroid=None, init_method="kmeans++"
    )
    # Lloyd never increases the objective
    assert all(b <= a * (1 + 1e-5) for a, b in zip(res.inertia, res.inertia[1:], strict=False))
    assert res.final_inertia < 1.05 * optimum
    assert res.final_inertia <= res.inertia[-1] * (1 + 1e-5)
    labels, _ = assign(res.centroids, x, spherical=False)
    assert len({(t, lab) for t, lab in zip(truth, labels, strict=True)}) == 6  # clusters = true groups
    assert res.centroids.shape == (6, 16) and res.centroids.dtype == np.float32
    assert res.stats()["n_points"] == 3000


def test_kmeans_spherical_normalises_a_copy_and_subsamples():
    x = _mixture(n=5000, d=8, m=4)
    before = x.copy()
    res = kmeans(x, 4, niter=3, max_points_per_centroid=100)
    np.testing.assert_array_equal(x, before)  # caller's array untouched
    assert res.n_points == 400 and res.sizes.sum() == 400
    np.testing.assert_allclose(np.linalg.norm(res.centroids, axis=1), 1.0, atol=1e-5)
    again = kmeans(x, 4, niter=3, max_points_per_centroid=100)
    np.testing.assert_array_equal(res.centroids, again.centroids)  # deterministic for a seed


def test_k_larger_than_n_raises_clear_error():
    x = np.ones((3, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="at least k points"):
        kmeans(x, 5)
    with pytest.raises(ValueError, match="k <= n"):
        init_centroids(x, 5, seed=0)
    pts = normalize_rows(_mixture(n=5, d=4, m=5))
    exact = kmeans(pts, 5, niter=3)  # k == n: every point is its own centroid
    assert exact.final_inertia == pytest.approx(0.0, abs=1e-5) and exact.sizes.tolist() == [1] * 5


@pytest.mark.parametrize("method", ["random", "kmeans++"])
def test_init_centroids_picks_distinct_sample_rows(method):
    x = _mixture(n=300, d=5, m=3)
    c = init_centroids(x, 20, seed=4, method=method)
    rows = {tuple(r) for r in x}
    assert c.shape == (20, 5) and all(tuple(r) in rows for r in c)
    assert len({tuple(r) for r in c}) == 20
    np.testing.assert_array_equal(c, init_centroids(x, 20, seed=4, method=method))
    with pytest.raises(ValueError, match="unknown init"):
        init_centroids(x, 2, seed=0, method="nope")


def test_kmeanspp_spreads_over_separated_clusters():
    x = _mixture(n=600, d=4, m=5, noise=0.01, seed=2)
    c = init_centroids(x, 5, seed=0, method="kmeans++")
    labels, _ = assign(c, x, spherical=False)
    assert len(np.unique(labels)) == 5 and np.bincount(labels).min() > 60


def test_list_column_roundtrip_sliced_chunked_and_errors():
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    arr = matrix_to_list_array(x)
    np.testing.assert_array_equal(list_column_to_numpy(arr), x)
    np.testing.assert_array_equal(list_column_to_numpy(arr.slice(3, 4)), x[3:7])  # offsets respected
    chunked = pa.chunked_array([arr.slice(0, 6), arr.slice(6)])
    np.testing.assert_array_equal(list_column_to_numpy(chunked), x)
    f64 = pa.array([[1.0, 2.0], [3.0, 4.0]], type=pa.list_(pa.float64()))
    assert list_column_to_numpy(f64).dtype == np.float32
    with pytest.raises(ValueError, match="different lengths"):
        list_column_to_numpy(pa.array([[1.0, 2.0], [3.0]], type=pa.list_(pa.float32())))
    with pytest.raises(ValueError, match="null"):
        list_column_to_numpy(pa.array([[1.0, 2.0], None], type=pa.list_(pa.float32())))
