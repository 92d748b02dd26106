"""Reruns that are always right: a changed bucket, a changed config, a stage run alone, a moved run root, a
run root inside its input folder, odd links, two drivers. Each ends with the whole-run-root check.

The numbered cases are issue 13's. Tiny settings (64 px, random-init ViT-S/8) on the shared 2-node cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import check_run_root_consistent, tiny_config

from u2seg.cli import main
from u2seg.errors import UpstreamError
from u2seg.io import RunRoot
from u2seg.io.labelset import LabelSet
from u2seg.pipeline.lease import RunLease
from u2seg.pipeline.run_pipeline import run_pipeline

pytestmark = pytest.mark.integration

UP_TO_LABEL = ("manifest", "stuff", "extract", "cluster", "label")
TRAIN_KNOBS = ["train.steps=2", "train.checkpoint_every=1", "train.image_size=64", "train.batch_size=1",
               "train.rounds=0", "cluster.num_shards=1"]


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """12 synthetic images (with ground truth) to copy into input folders."""
    from u2seg.data.synthetic import make_synthetic

    out = tmp_path_factory.mktemp("pool")
    make_synthetic(str(out), 12, seed=5, min_size=64, max_size=96)
    return out


def _fill(folder, pool, names):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.copy(pool / "images" / n, folder / n)


def _names(pool):
    return sorted(os.listdir(pool / "images"))


def _assignments(root: RunRoot) -> dict[tuple[str, int], int]:
    return {(r["image_id"], r["mask_id"]): r["cluster_id"]
            for r in root.read_parquet("cluster/assignments").to_pylist()}


def _losses(root: RunRoot) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in root.read_text("train/round-0/metrics.jsonl").splitlines() if line]
    return [(r["step"], r["loss_total"]) for r in rows]


def _same_weights(a: bytes, b: bytes) -> bool:
    import torch

    from u2seg.model import model_from_bytes

    wa, wb = model_from_bytes(a)[0].state_dict(), model_from_bytes(b)[0].state_dict()
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _uri_of(root: RunRoot) -> dict[str, str]:
    return {r["image_id"]: r["uri"] for r in root.read_parquet("manifest").to_pylist()}


def test_nightly_rerun_over_a_changed_folder(ray_cluster, tmp_path, pool):
    """Run; add 3 images and remove 1; rerun the same command: only the 3 are extracted, old images keep
    their pseudo-class ids (assign_new), the removed one is gone everywhere, the model is retrained. Then
    delete one and add another with --force (case 2), and refit (case 3): labels follow the assignments."""
    src, run = tmp_path / "images", tmp_path / "run"
    names = _names(pool)
    _fill(src, pool, names[:8])
    cfg = tiny_config(str(run), [str(src)], None, *TRAIN_KNOBS,
                      f"evaluate.gt_panoptic_json={pool}/gt/panoptic.json")  # the PNG folder is derived (case 9)
    stages = (*UP_TO_LABEL, "train", "evaluate")
    first = run_pipeline(cfg, stages=stages)["stages"]
    root = RunRoot(str(run))
    assert first["extract"]["processed_now"] == 8 and "skipped" not in first["evaluate"]
    before = _assignments(root)
    model_before = root.read_bytes("train/round-0/model.pt")
    check_run_root_consistent(root)

    # reproducible training: the same labels, config and seed in a copy of the run root train the same model
    twin = tmp_path / "twin"
    shutil.copytree(run, twin, ignore=shutil.ignore_patterns("train", "eval", "_LEASE"))
    run_pipeline(tiny_config(str(twin), [str(src)], None, *TRAIN_KNOBS), stages=(*UP_TO_LABEL, "train"))
    assert _losses(RunRoot(str(twin))) == _losses(root)
    assert _same_weights(RunRoot(str(twin)).read_bytes("train/round-0/model.pt"), model_before)

    # the same command, nothing changed: everything after the relisting is skipped (case 1's counterpart)
    same = run_pipeline(cfg, stages=stages)["stages"]
    assert all(same[s].get("skipped") for s in stages[1:]), {s: same[s].get("reason") for s in stages}

    # case 1 + nightly: 3 new images, 1 removed
    removed = names[0]
    os.remove(src / removed)
    _fill(src, pool, names[8:11])
    night = run_pipeline(cfg, stages=stages)["stages"]
    assert night["manifest"]["images"] == 10
    assert night["extract"]["processed_now"] == 3, night["extract"]
    assert night["extract"]["departed"] == 1 and night["extract"]["reason"] == "manifest changed"
    assert night["cluster"]["refit"] is False
    assert "skipped" not in night["train"] and night["train"]["reason"] == "label changed"
    assert root.read_bytes("train/round-0/model.pt") != model_before
    after = _assignments(root)
    kept = {k: v for k, v in before.items() if k in after}
    assert kept and all(after[k] == v for k, v in kept.items())   # old images keep their pseudo classes
    uris = _uri_of(root)
    assert not [u for u in uris.values() if u.endswith(removed)]
    labelled = list(LabelSet(root, "labels").iter_rows(["file_name"]))
    assert len(labelled) == len([r for r in root.read_parquet("extract/images").to_pylist() if r["status"] == "ok"])
    assert not [im for im in labelled if im["file_name"] == removed]
    check_run_root_consistent(root)

    # case 2: delete one and add another, with --force: exactly the new one is extracted, the deleted one leaves
    os.remove(src / names[1])
    _fill(src, pool, names[11:12])
    forced = run_pipeline(cfg, stages=UP_TO_LABEL, force=True)["stages"]
    assert forced["extract"]["processed_now"] == 1 and forced["extract"]["departed"] == 1
    assert not [u for u in _uri_of(root).values() if u.endswith(names[1])]
    check_run_root_consistent(root, UP_TO_LABEL)

    # case 3: refit: new centroids, every group relabelled from the new assignments
    refit_cfg = tiny_config(str(run), [str(src)], None, *TRAIN_KNOBS, "cluster.refit=always")
    refit = run_pipeline(refit_cfg, stages=UP_TO_LABEL)["stages"]
    assert refit["cluster"]["refit"] is True and refit["label"]["groups_labelled"] == refit["label"]["parts"]
    check_run_root_consistent(root, UP_TO_LABEL)


def test_a_stage_run_alone_checks_its_upstream(ray_cluster, tmp_path, pool, capsys):
    """Case 4: labelling with things_k=3 over a things_k=4 clustering refuses, naming the knob; the pipeline
    then reruns cluster and label and says why."""
    src, run = tmp_path / "images", tmp_path / "run"
    _fill(src, pool, _names(pool)[:6])
    cfg = tiny_config(str(run), [str(src)], None)
    run_pipeline(cfg, stages=UP_TO_LABEL)
    three = tiny_config(str(run), [str(src)], None, "cluster.things_k=3")
    from u2seg.pipeline.run_stage import run_stage

    with pytest.raises(UpstreamError, match=r"cluster\.things_k 4 -> 3"):
        run_stage("label", three)
    capsys.readouterr()
    overrides = [f"run.run_root={run}", f"manifest.inputs=[{src}]", *_tiny_overrides(), "cluster.things_k=3"]
    assert main(["label", *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("u2seg: error: label: cluster in") and "things_k 4 -> 3" in err[0]
    rerun = run_pipeline(three, stages=UP_TO_LABEL)["stages"]
    assert rerun["extract"].get("skipped")
    assert rerun["cluster"]["reason"] == "config changed: cluster.things_k 4 -> 3"
    assert rerun["label"]["reason"] == "config changed: cluster.things_k 4 -> 3" and rerun["label"]["k_things"] == 3
    check_run_root_consistent(RunRoot(str(run)))


def _tiny_overrides() -> list[str]:
    from helpers import TINY

    return list(TINY)


def test_a_run_root_spelled_otherwise_moved_or_inside_its_input_resumes(ray_cluster, tmp_path, pool, monkeypatch):
    """Cases 5, 6, 7: the run root lives inside the input folder (never listed), with a symlink loop, a
    dangling link, a .gif and a symlink beside its target among the inputs; '/x', '/x/', a relative path and
    the run root moved elsewhere all find every stage done."""
    src = tmp_path / "data"
    _fill(src, pool, _names(pool)[:5])
    os.symlink(src / _names(pool)[0], src / "alias.png")        # the same image twice: one manifest row
    os.symlink(src / "gone.jpg", src / "dangling.jpg")
    os.symlink(src / "b.jpg", src / "a.jpg")
    os.symlink(src / "a.jpg", src / "b.jpg")
    (src / "anim.gif").write_bytes(b"GIF89a")
    run = src / "runs" / "x"
    cfg = tiny_config(str(run), [str(src)], None)
    first = run_pipeline(cfg, stages=UP_TO_LABEL)["stages"]
    man = first["manifest"]
    assert man["images"] == 5 and man["duplicates_dropped"] == 1
    assert man["link_errors"] == {"dangling_link": 1, "symlink_loop": 2} and man["not_listed_suffixes"] == {".gif": 1}
    root = RunRoot(str(run))
    reasons = {r["error_class"] for r in root.read_parquet("manifest/errors").to_pylist()}
    assert reasons == {"dangling_link", "symlink_loop"}
    check_run_root_consistent(root)

    again = run_pipeline(cfg, stages=UP_TO_LABEL)["stages"]     # case 6: its own PNGs are not inputs
    assert again["manifest"]["images"] == 5 and again["manifest"]["not_listed"].get("run_root", 0) >= 1
    assert all(again[s].get("skipped") for s in UP_TO_LABEL[1:])
    monkeypatch.chdir(src)
    for spelling in (f"{run}/", "runs/x", "./runs/x/"):            # case 5: spelling is not meaning
        st = run_pipeline(tiny_config(spelling, [str(src)], None), stages=UP_TO_LABEL)["stages"]
        assert all(st[s].get("skipped") for s in UP_TO_LABEL[1:]), (spelling, {s: st[s].get("reason") for s in st})
    moved = tmp_path / "moved"  # moved out of its input folder (a copy left behind would be another run's files)
    shutil.move(str(run), str(moved))
    st = run_pipeline(tiny_config(str(moved), [str(src)], None), stages=UP_TO_LABEL)["stages"]
    assert all(st[s].get("skipped") for s in UP_TO_LABEL[1:]), {s: st[s].get("reason") for s in st}
    check_run_root_consistent(RunRoot(str(moved)))


DRIVER = """
import sys
from u2seg.cli import main
sys.exit(main(["manifest", "run.run_root={run}", "manifest.inputs=[{src}]"]))
"""


def test_a_second_driver_fails_fast_naming_the_owner(tmp_path, pool):
    """Case 8: while one driver holds the run root, another exits 2 at once with one line naming it."""
    src, run = tmp_path / "images", tmp_path / "run"
    _fill(src, pool, _names(pool)[:2])
    owner = RunLease(RunRoot(str(run)), ttl_s=60, what="u2seg pipeline")
    owner.acquire()
    try:
        proc = subprocess.run([sys.executable, "-c", DRIVER.format(run=run, src=src)], capture_output=True,
                              text=True, timeout=120)
    finally:
        owner.release()
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("u2seg: error: run root") and "in use by another driver: u2seg pipeline" in lines[-1]
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-c", DRIVER.format(run=run, src=src)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(RunRoot(str(run)).read_text("manifest/stats.json"))["images"] == 2
    missing = subprocess.run([sys.executable, "-c", DRIVER.format(run=run, src=tmp_path / "nope")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "input folder does not exist" in missing.stderr.strip().splitlines()[-1]


def test_the_lease_on_s3(s3, monkeypatch):
    """On the S3 server: a conditional create, a clear refusal for a second driver, takeover after expiry."""
    import time
    import uuid

    from u2seg.errors import LeaseHeldError
    from u2seg.pipeline import lease as lease_module

    monkeypatch.setattr(lease_module, "VERIFY_PAUSE_S", 0.2)
    root = RunRoot(s3.uri(f"lease-{uuid.uuid4().hex[:8]}"), s3.storage_options())
    first = RunLease(root, ttl_s=30, what="first driver")
    assert first._create_exclusive(b"{}") and not first._create_exclusive(b"{}")  # If-None-Match honoured
    root.remove("_LEASE")
    first.acquire()
    with pytest.raises(LeaseHeldError, match="in use by another driver: first driver"):
        RunLease(root, ttl_s=30, what="second driver").acquire()
    first._stop.set()  # the first driver dies: no more heartbeats, and its lease expires
    root.write_json("_LEASE", {**root.read_json("_LEASE"), "expires_at": time.time() - 1})
    second = RunLease(root, ttl_s=30, what="second driver")
    second.acquire()
    assert root.read_json("_LEASE")["token"] == second.token
    second.release()
    assert not root.exists("_LEASE")
