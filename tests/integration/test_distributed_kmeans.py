"""Distributed k-means on a 2-node local Ray cluster: faiss parity, exact resume after SIGKILL, S3 I/O."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from u2seg.cluster.arrow import matrix_to_list_array
from u2seg.cluster.distributed import _read_checkpoint, distributed_kmeans, resolve_parquet_files
from u2seg.cluster.kmeans import init_centroids, kmeans, normalize_rows

pytestmark = pytest.mark.integration

K = 48


def _mixture(n: int, d: int, m: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(m, d))
    return (centers[rng.integers(m, size=n)] + 0.6 * rng.normal(size=(n, d))).astype(np.float32)


def _write_parts(x: np.ndarray, n_parts: int, out: str, storage_options: dict | None = None) -> None:
    fs, root = fsspec.core.url_to_fs(out, **(storage_options or {}))
    fs.makedirs(root, exist_ok=True)
    for i, block in enumerate(np.array_split(x, n_parts)):
        table = pa.table(
            {"image_id": pa.array([f"img{i}"] * len(block)), "descriptor": matrix_to_list_array(block)}
        )
        with fs.open(f"{root}/part-{i:03d}.parquet", "wb") as fh:
            pq.write_table(table, fh, row_group_size=1000)
    fs.pipe_file(f"{root}/_SUCCESS", b"")  # must be skipped by the reader


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    x = _mixture(24_000, 32, 64, seed=0)
    out = str(tmp_path_factory.mktemp("kmeans") / "parts")
    _write_parts(x, 6, out)
    xn = normalize_rows(x)
    return {"x": xn, "raw": x, "dir": out, "init": normalize_rows(init_centroids(xn, K, seed=0))}


_FIXED = dict(num_shards=2, niter=6, tol=0, max_points_per_centroid=None)  # all points, exactly 6 iterations


@pytest.fixture(scope="module")
def local_run(ray_cluster, data):
    """The reference distributed run on local Parquet (shared by the parity and S3 tests)."""
    return distributed_kmeans(data["dir"], K, init_centroids=data["init"], **_FIXED)


def test_file_resolution(data):
    _, files = resolve_parquet_files(data["dir"])
    assert [f.rsplit("/", 1)[-1] for f in files] == [f"part-{i:03d}.parquet" for i in range(6)]  # no _SUCCESS
    _, via_arrow = resolve_parquet_files(data["dir"], filesystem=pafs.LocalFileSystem())
    assert via_arrow == files
    _, listed = resolve_parquet_files(files[:2])
    assert listed == files[:2]


def test_parity_with_faiss_and_each_shard_holds_only_its_rows(local_run, data):
    single = kmeans(data["x"], K, niter=6, init_centroids=data["init"], max_points_per_centroid=None)
    dist = local_run
    assert dist.n_iter == single.n_iter == 6
    assert abs(dist.final_inertia - single.final_inertia) / single.final_inertia < 0.01
    np.testing.assert_allclose(dist.inertia, single.inertia, rtol=0.01)
    assert dist.sizes.sum() == len(data["x"]) == dist.n_points
    np.testing.assert_allclose(np.linalg.norm(dist.centroids, axis=1), 1.0, atol=1e-5)
    rows = [s["rows"] for s in dist.shard_info]
    assert sorted(rows) == [12_000, 12_000]  # 6 parts round-robin: each actor read 3 parts, not all
    assert all(s["shard_bytes"] == 12_000 * 32 * 4 for s in dist.shard_info)
    assert len({s["node"] for s in dist.shard_info}) == 2  # SPREAD: one shard per node


def test_subsampling_and_sampled_init(ray_cluster, data):
    res = distributed_kmeans(data["dir"], K, num_shards=3, niter=3, tol=0, max_points_per_centroid=100)
    assert res.n_points == res.sizes.sum() == sum(s["rows"] for s in res.shard_info)
    assert abs(res.n_points - K * 100) < 5 * (K * 100) ** 0.5   # a Bernoulli sample by content key
    assert all(1300 < s["rows"] < 1900 for s in res.shard_info)  # each shard keeps ~1/5 of its 8000
    with pytest.raises(ValueError, match="at least k points"):
        distributed_kmeans(data["dir"], 10**6, num_shards=2, niter=1)


@pytest.mark.parametrize("max_points", [None, 100])
def test_same_clusters_whatever_the_part_layout(ray_cluster, data, tmp_path, max_points):
    """The same vectors, shuffled into 11 parts on 3 shards instead of 6 parts on 2: a resumed extract
    groups images into other parts, and must still give the clusters of an uninterrupted run."""
    perm = np.random.default_rng(5).permutation(len(data["raw"]))
    other = str(tmp_path / "other")
    _write_parts(data["raw"][perm], 11, other)
    kw = dict(niter=5, tol=0, seed=7, max_points_per_centroid=max_points)
    a = distributed_kmeans(data["dir"], K, num_shards=2, **kw)
    b = distributed_kmeans(other, K, num_shards=3, **kw)
    assert a.n_points == b.n_points
    np.testing.assert_allclose(a.centroids, b.centroids, atol=1e-5)
    assert a.sizes.tolist() == b.sizes.tolist()
    np.testing.assert_allclose(a.inertia, b.inertia, rtol=1e-6)


_CHILD = textwrap.dedent(
    """
    import sys, ray
    from u2seg.cluster.distributed import distributed_kmeans
    ray.init(address=sys.argv[1], log_to_driver=False)
    distributed_kmeans(sys.argv[2], 64, num_shards=2, niter=int(sys.argv[4]), tol=0, seed=3,
                       checkpoint_uri=sys.argv[3], max_points_per_centroid=None)
    """
)


def test_resume_after_sigkill_equals_uninterrupted_run(ray_cluster, tmp_path, caplog):
    big = str(tmp_path / "big")
    _write_parts(_mixture(60_000, 64, 96, seed=1), 4, big)
    ckpt = str(tmp_path / "ckpt" / "things.npz")
    niter = 40
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, ray_cluster.address, big, ckpt, str(niter)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    reached = None
    deadline = time.time() + 120
    try:
        while time.time() < deadline and child.poll() is None:
            if os.path.exists(ckpt):
                reached = int(_read_checkpoint(ckpt, None)["iteration"])
                if reached >= 2:
                    child.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.01)
    finally:
        if child.poll() is None:
            child.kill()
        _, err = child.communicate(timeout=30)
    assert reached is not None and reached >= 2, f"child never checkpointed: {err.decode()[-2000:]}"
    interrupted_at = int(_read_checkpoint(ckpt, None)["iteration"])
    assert 2 <= interrupted_at < niter, "the child finished before it was killed: make its iterations slower"

    with caplog.at_level(logging.INFO, logger="u2seg.cluster.distributed"):
        resumed = distributed_kmeans(
            big,
            64,
            num_shards=2,
            niter=niter,
            tol=0,
            seed=3,
            checkpoint_uri=ckpt,
            max_points_per_centroid=None,
        )
    assert any("resuming" in r.getMessage() for r in caplog.records)
    whole = distributed_kmeans(
        big, 64, num_shards=2, niter=niter, tol=0, seed=3, max_points_per_centroid=None
    )
    assert resumed.n_iter == whole.n_iter == niter
    np.testing.assert_allclose(resumed.centroids, whole.centroids, rtol=0, atol=1e-7)
    np.testing.assert_allclose(resumed.inertia, whole.inertia, rtol=1e-12)
    np.testing.assert_array_equal(resumed.sizes, whole.sizes)
    assert int(_read_checkpoint(ckpt, None)["iteration"]) == niter

    # a checkpoint of another run (different seed) is ignored, loudly
    with pytest.warns(UserWarning, match="signature mismatch"):
        other = distributed_kmeans(
            big, 64, num_shards=2, niter=2, tol=0, seed=4, checkpoint_uri=ckpt, max_points_per_centroid=None
        )
    assert other.n_iter == 2


def test_s3_source_and_checkpoint_match_local(local_run, s3, data):
    so = s3.storage_options()
    src = s3.uri("kmeans-parts")
    _write_parts(data["x"], 6, src, so)
    ckpt = s3.uri("kmeans-ckpt", "things.npz")
    kw = dict(init_centroids=data["init"], checkpoint_uri=ckpt, storage_options=so, **_FIXED)
    remote = distributed_kmeans(src, K, **kw)
    np.testing.assert_allclose(remote.centroids, local_run.centroids, atol=1e-7)
    state = _read_checkpoint(ckpt, so)
    assert int(state["iteration"]) == 6 and len(state["inertia"]) == 6
    resumed = distributed_kmeans(src, K, **kw)  # finished checkpoint: nothing left to do
    np.testing.assert_array_equal(resumed.centroids, remote.centroids)
    assert resumed.timings["iterations"] < 0.5
