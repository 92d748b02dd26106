"""Extract on the 2-node Ray cluster with the run root and the images on the S3 server."""

from __future__ import annotations

import time

import pytest

from u2seg.io import RunRoot
from u2seg.io.images import image_id_for
from u2seg.io.layout import LEDGER
from u2seg.pipeline.extract_commit import ledger_ids, remove_orphans
from u2seg.pipeline.run_stage import run_stage

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def s3_inputs(s3, synthetic_world, write_odd_corpus, tmp_path_factory):
    """8 synthetic images plus the odd/broken corpus, uploaded to the S3 server."""
    import s3fs
    from helpers import upload_dir

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3.storage_options())
    prefix = f"{s3.bucket}/inputs-{time.time_ns()}"
    odd = tmp_path_factory.mktemp("odd")
    expected = write_odd_corpus(str(odd))
    for name in list(expected):  # keep the corpus small: drop the slow giants
        if name.startswith(("large_", "bomb_")):
            (odd / name).unlink()
            expected.pop(name)
    good = sorted((synthetic_world / "images").iterdir())[:8]
    for p in good:
        fs.pipe_file(f"{prefix}/good/{p.name}", p.read_bytes())
    upload_dir(fs, str(odd), f"{prefix}/odd")
    return prefix, expected


def test_every_input_lands_in_masks_or_errors_exactly_once(ray_cluster, s3, s3_inputs):
    from helpers import tiny_config

    prefix, expected = s3_inputs
    root_uri = s3.uri(f"run-{time.time_ns()}")
    cfg = tiny_config(root_uri, [f"s3://{prefix}"], s3)
    run_stage("manifest", cfg)
    run_stage("stuff", cfg)
    stats = run_stage("extract", cfg)
    root = RunRoot(root_uri, cfg.run.storage.storage_options())
    manifest = root.read_parquet("manifest", columns=["image_id", "uri"]).to_pylist()
    ledger = root.read_parquet(LEDGER, columns=["image_id", "status"]).to_pylist()
    errors = root.read_parquet("extract/errors").to_pylist()
    masks = root.read_parquet("extract/masks", columns=["image_id", "mask_id"]).to_pylist()
    ids = [r["image_id"] for r in ledger]
    assert sorted(ids) == sorted(r["image_id"] for r in manifest)          # every input exactly once
    assert len(ids) == len(set(ids))
    err_ids = [r["image_id"] for r in errors]
    assert len(err_ids) == len(set(err_ids))
    assert set(err_ids) == {r["image_id"] for r in ledger if r["status"] == "error"}
    assert not set(err_ids) & {m["image_id"] for m in masks}               # never both
    bad = {image_id_for(f"s3://{prefix}/odd/{n}") for n, e in expected.items()
           if isinstance(e, str) and n.lower().endswith((".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff",
                                                         ".webp"))}
    assert set(err_ids) == bad
    reasons = {r["error_class"] for r in errors}
    assert any("truncated" in c for c in reasons) and any("empty" in c for c in reasons)
    assert stats["errors"] == len(bad) and stats["ledger_images"] == len(manifest)
    assert len({(m["image_id"], m["mask_id"]) for m in masks}) == len(masks) > 0
    assert root.read_parquet("extract/patches").num_rows > 0


def test_rerun_after_crash_processes_only_missing_images(ray_cluster, s3, s3_inputs):
    from helpers import tiny_config

    prefix, _ = s3_inputs
    root_uri = s3.uri(f"run-{time.time_ns()}")
    cfg = tiny_config(root_uri, [f"s3://{prefix}/good"], s3)
    run_stage("manifest", cfg)
    run_stage("stuff", cfg)
    first = run_stage("extract", cfg)
    root = RunRoot(root_uri, cfg.run.storage.storage_options())
    parts = root.list(LEDGER, ".parquet")
    assert len(parts) >= 2
    # simulate a writer killed after its masks part but before its ledger part
    lost = parts[0]
    assert root.exists(f"extract/masks/{lost}")
    root.remove(f"{LEDGER}/{lost}")
    before = set(ledger_ids(root).to_pylist())
    root.remove("extract/_SUCCESS")
    second = run_stage("extract", cfg)
    after = ledger_ids(root).to_pylist()
    assert len(after) == len(set(after)) == first["ledger_images"]
    assert 0 < second["processed_now"] < first["processed_now"]
    assert second["processed_now"] == first["ledger_images"] - len(before)
    masks = root.read_parquet("extract/masks", columns=["image_id", "mask_id"]).to_pylist()
    assert len({(m["image_id"], m["mask_id"]) for m in masks}) == len(masks)
    assert remove_orphans(root) == 0
