"""Pure pieces of reruns: batch plans fixed by the seed, row keys, knob diffs, listing of odd files, the lease."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from u2seg.config import ConfigError, load_config
from u2seg.errors import LeaseHeldError
from u2seg.io import RunRoot
from u2seg.io.listing import DANGLING_LINK, SYMLINK_LOOP, ListStats, iter_local
from u2seg.pipeline import lease as lease_module
from u2seg.pipeline.extract_commit import ManifestIndex, row_keys
from u2seg.pipeline.lease import LEASE, RunLease, hold_lease
from u2seg.pipeline.markers import config_changes
from u2seg.pipeline.train_data import batch_indices

pytestmark = pytest.mark.unit


def test_batch_plan_covers_every_image_each_epoch_and_resumes_anywhere():
    plan = {(r, s): batch_indices(s, n_rows=10, batch_size=2, rank=r, world=2, seed=7) for r in (0, 1)
            for s in range(6)}
    # 10 images, 2 ranks, batch 2: 5 images per rank -> 3 steps per epoch (the last batch holds 1)
    epoch0 = sorted(i for r in (0, 1) for s in range(3) for i in plan[(r, s)])
    assert epoch0 == list(range(10))
    assert [len(plan[(0, s)]) for s in range(3)] == [2, 2, 1]
    assert plan[(0, 3)] != plan[(0, 0)] or plan[(0, 4)] != plan[(0, 1)]  # a new permutation per epoch
    again = batch_indices(4, n_rows=10, batch_size=2, rank=1, world=2, seed=7)
    assert again == plan[(1, 4)]                                          # resuming at step 4: the same batch
    assert batch_indices(0, n_rows=10, batch_size=2, rank=0, world=2, seed=8) != plan[(0, 0)] or \
        batch_indices(1, n_rows=10, batch_size=2, rank=0, world=2, seed=8) != plan[(0, 1)]
    # fewer images than ranks: every rank still gets a batch (wrapping)
    assert batch_indices(0, n_rows=1, batch_size=2, rank=1, world=3, seed=0) == [0]
    with pytest.raises(ValueError, match="bad batch plan"):
        batch_indices(0, n_rows=0, batch_size=2, rank=0, world=1, seed=0)


def test_row_keys_change_with_the_version_and_the_manifest_index_counts_missing_ids():
    a = row_keys(["a" * 16, "b" * 16], ["1-10", "2-20"])
    b = row_keys(["a" * 16, "b" * 16], ["1-10", "2-21"])
    assert a[0] == b[0] and a[1] != b[1]
    index = ManifestIndex(np.sort(np.array([b"a" * 16, b"b" * 16, b"c" * 16], dtype="S16")), np.sort(a))
    assert index.missing(np.array([b"a" * 16], dtype="S16")) == 2
    assert index.missing(np.array([b"a" * 16, b"b" * 16, b"c" * 16, b"d" * 16], dtype="S16")) == 0


def test_config_changes_name_the_knobs():
    assert config_changes({"cluster.things_k": 4, "x": 1}, {"cluster.things_k": 6, "x": 1}) == \
        "cluster.things_k 4 -> 6"
    assert "(+1 more)" in config_changes({f"k{i}": i for i in range(5)}, {f"k{i}": -i - 1 for i in range(5)}, limit=4)


def test_image_size_must_fit_the_backbone_patch_at_config_time():
    with pytest.raises(ConfigError, match="multiple of the backbone's patch size 8"):
        load_config(None, ["extract.backbone=vit_small_patch8_224.dino", "extract.image_size=250"])
    load_config(None, ["extract.backbone=vit_small_patch16_224", "extract.image_size=224"])
    with pytest.raises(ConfigError, match="patch size 16"):
        load_config(None, ["extract.backbone=vit_small_patch16_224", "extract.image_size=232"])


def test_the_run_root_is_not_in_any_hash():
    from u2seg.pipeline.stages import STAGES

    a, b = load_config("demo", ["run.run_root=/x"]), load_config("demo", ["run.run_root=./runs/x/"])
    assert a.hash() == b.hash() and all(st.config_hash(a) == st.config_hash(b) for st in STAGES)


def test_listing_turns_links_into_errors_counts_skips_and_never_lists_the_run_root(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.jpg").write_bytes(b"x")
    (src / "b.gif").write_bytes(b"x")
    (src / ".hidden.png").write_bytes(b"x")
    os.symlink(src / "a.jpg", src / "link_to_a.jpg")
    os.symlink(src / "nowhere.jpg", src / "dangling.jpg")
    os.symlink(src / "loop2.jpg", src / "loop1.jpg")
    os.symlink(src / "loop1.jpg", src / "loop2.jpg")
    os.symlink(src / "sub", src / "linked_dir")
    (src / "run" / "labels").mkdir(parents=True)
    (src / "run" / "labels" / "x.png").write_bytes(b"x")
    stats = ListStats()
    entries = list(iter_local(str(src), exclude=os.path.realpath(src / "run"), stats=stats))
    images = sorted(e.uri for e in entries if not e.error)
    assert images == [str(src / "a.jpg"), str(src / "a.jpg")]  # the symlink is its target (dropped later)
    errors = {os.path.basename(e.uri): e.error for e in entries if e.error}
    assert errors == {"dangling.jpg": DANGLING_LINK, "loop1.jpg": SYMLINK_LOOP, "loop2.jpg": SYMLINK_LOOP}
    assert stats.to_dict() == {"not_listed_suffixes": {".gif": 1},
                               "not_listed": {"hidden": 1, "run_root": 1, "symlinked_folder": 1}}
    version = next(e.version for e in entries if not e.error)
    (src / "a.jpg").write_bytes(b"xy")
    assert next(e.version for e in iter_local(str(src)) if not e.error) != version


def test_a_second_driver_fails_fast_and_an_expired_lease_is_taken_over(tmp_path, monkeypatch):
    monkeypatch.setattr(lease_module, "VERIFY_PAUSE_S", 0.0)
    root = RunRoot(str(tmp_path))
    first = RunLease(root, ttl_s=30, what="u2seg pipeline")
    first.acquire()
    try:
        with pytest.raises(LeaseHeldError, match=r"in use by another driver: u2seg pipeline \(pid"):
            RunLease(root, ttl_s=30, what="u2seg extract").acquire()
    finally:
        first.release()
    assert not root.exists(LEASE)
    # a killed driver's lease (expired) is taken over
    root.write_json(LEASE, {"token": "dead", "what": "u2seg label", "pid": 1, "host": "h",
                            "heartbeat_at": time.time() - 100, "expires_at": time.time() - 1})
    with hold_lease(root, 30, "u2seg pipeline") as held, hold_lease(root, 30, "nested") as nested:
        assert nested is held and json.loads(root.read_bytes(LEASE))["token"] == held.token
    assert not root.exists(LEASE)


def test_a_lease_whose_process_died_on_this_host_is_taken_over_at_once(tmp_path, monkeypatch):
    import socket
    import subprocess
    import sys

    monkeypatch.setattr(lease_module, "VERIFY_PAUSE_S", 0.0)
    root = RunRoot(str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    live_for = {"heartbeat_at": time.time(), "expires_at": time.time() + 600}
    root.write_json(LEASE, {"token": "killed", "what": "u2seg extract", "pid": int(dead.stdout), **live_for,
                            "host": socket.gethostname()})
    with hold_lease(root, 30, "u2seg extract") as held:
        assert json.loads(root.read_bytes(LEASE))["token"] == held.token
    # the same dead pid on another host proves nothing: that lease stands until it expires
    root.write_json(LEASE, {"token": "elsewhere", "what": "u2seg extract", "pid": int(dead.stdout), **live_for,
                            "host": socket.gethostname() + "-other"})
    with pytest.raises(LeaseHeldError, match="expires in"):
        RunLease(root, ttl_s=30, what="u2seg extract").acquire()


def test_waiting_for_a_lease_until_its_owner_releases_it(tmp_path, monkeypatch):
    import threading

    monkeypatch.setattr(lease_module, "VERIFY_PAUSE_S", 0.0)
    root = RunRoot(str(tmp_path))
    owner = RunLease(root, ttl_s=30, what="owner")
    owner.acquire()
    threading.Timer(1.0, owner.release).start()
    t0 = time.time()
    waiter = RunLease(root, ttl_s=30, what="waiter")
    waiter.acquire(wait_s=20)
    assert 0.9 < time.time() - t0 < 15
    waiter.release()
