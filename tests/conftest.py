"""Shared fixtures: a real S3 server, a 2-node local Ray cluster, the synthetic world."""

from __future__ import annotations

import os
import sys
import uuid

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from servers import ray_two_node_cluster, s3_server

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A SeaweedFS S3 server on free loopback ports for the whole session."""
    with s3_server(str(tmp_path_factory.mktemp("weed"))) as server:
        yield server


@pytest.fixture
def s3_root(s3):
    """A fresh, empty s3:// prefix (a RunRoot) per test."""
    from u2seg.io import RunRoot

    return RunRoot(s3.uri(f"t-{uuid.uuid4().hex[:10]}"), s3.storage_options())


@pytest.fixture(params=["local", "s3"])
def any_root(request, tmp_path):
    """The same test through a local run root and an S3 run root."""
    from u2seg.io import RunRoot

    if request.param == "local":
        return RunRoot(str(tmp_path / "run"))
    server = request.getfixturevalue("s3")
    return RunRoot(server.uri(f"t-{uuid.uuid4().hex[:10]}"), server.storage_options())


@pytest.fixture(scope="session")
def ray_cluster():
    """Two local Ray nodes with 4 logical CPUs each (more than the real cores, or Ray Data stalls)."""
    with ray_two_node_cluster(num_cpus=4) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def synthetic_world(tmp_path_factory):
    """24 synthetic images with exact panoptic ground truth, on local disk."""
    from u2seg.data.synthetic import make_synthetic

    out = tmp_path_factory.mktemp("synth")
    make_synthetic(str(out), 24, seed=0, min_size=160, max_size=256)
    return out


@pytest.fixture(scope="session")
def write_odd_corpus():
    """`write_odd_corpus(dir) -> {name: expected}`: one file of each odd format plus junk."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "data", "odd_images", "corpus.py")
    spec = importlib.util.spec_from_file_location("odd_images_corpus", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_odd_corpus
