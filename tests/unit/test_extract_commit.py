"""Committing one extract group: ledger last, and writers of an older run fenced off."""

from __future__ import annotations

import numpy as np
import pytest

from u2seg.io import RunRoot
from u2seg.io.layout import group_name
from u2seg.pipeline.extract_commit import StaleWriterError, run_token, write_group

pytestmark = pytest.mark.unit


def _error_batch(ids: list[str]) -> dict[str, np.ndarray]:
    """A group whose images all failed to decode: enough to exercise the commit without a model."""
    n = len(ids)
    result = np.empty(n, dtype=object)
    result[:] = [b""] * n
    return {"image_id": np.array(ids), "uri": np.array([f"/x/{i}.jpg" for i in ids]),
            "version": np.array(["1-1"] * n), "ok": np.zeros(n, bool),
            "error_class": np.array(["ImageDecodeError:truncated"] * n), "message": np.array(["cut"] * n),
            "result": result}


def test_commit_writes_every_table_under_one_name_and_the_ledger(tmp_path):
    root = RunRoot(str(tmp_path))
    root.write_json("extract/_STARTED", {"config_hash": "h", "run_token": "A"})
    out = write_group(_error_batch(["a", "b"]), root, run_token(root))
    name = group_name(["a", "b"])
    assert out["part"].tolist() == [name]
    for table in ("masks", "patches", "errors", "images"):
        assert root.list(f"extract/{table}") == [name]
    assert root.read_parquet("extract/images").column("status").to_pylist() == ["error", "error"]


def test_a_writer_of_an_older_run_commits_nothing(tmp_path):
    root = RunRoot(str(tmp_path))
    root.write_json("extract/_STARTED", {"config_hash": "h", "run_token": "B"})   # a newer driver started
    with pytest.raises(StaleWriterError, match="newer run"):
        write_group(_error_batch(["c"]), root, "A")
    for table in ("masks", "patches", "errors", "images"):
        assert root.list(f"extract/{table}") == []
    write_group(_error_batch(["c"]), root, None)  # called outside the runner: no fence
    assert root.list("extract/images") == [group_name(["c"])]


def test_an_oom_on_every_multi_image_batch_leaves_every_good_image_ok_in_the_ledger(tmp_path, monkeypatch):
    """The batched model call raises CUDA's out-of-memory error whenever it holds more than one image: the
    batch is split down to single images, and the ledger has every decodable image as ok, none as an error."""
    import torch

    from u2seg.config import load_config
    from u2seg.features.backbone import build_backbone
    from u2seg.maskcut import process
    from u2seg.pipeline.extract_actor import run_model_batch

    real = process.process_batch

    def tight_memory(model, images, **kwargs):
        if len(images) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")
        return real(model, images, **kwargs)

    monkeypatch.setattr(process, "process_batch", tight_memory)
    cfg = load_config(None, ["extract.backbone=vit_small_patch8_224.dino", "extract.image_size=64",
                             "extract.n_masks=2", "extract.stuff_grid=8", "extract.stuff_dim=16",
                             "extract.patches_per_image=4", "extract.amp=none"])
    model = build_backbone(cfg.extract.backbone, "none", image_size=64, seed=0)
    rng = np.random.default_rng(0)
    n = 5
    images = np.empty(n, dtype=object)
    images[:] = [rng.integers(0, 255, (48 + 8 * i, 64, 3), dtype=np.uint8) for i in range(n)]
    ok = np.array([True, True, False, True, True])  # the third image failed to decode before the model
    batch = {"image_id": np.array([f"{i:016x}" for i in range(n)]), "uri": np.array([f"/x/{i}.jpg" for i in range(n)]),
             "version": np.array(["1-1"] * n), "ok": ok, "image": images,
             "error_class": np.array(["", "", "ImageDecodeError:truncated", "", ""]),
             "message": np.array(["", "", "cut", "", ""])}
    out = run_model_batch(model, batch, cfg, torch.device("cpu"))
    root = RunRoot(str(tmp_path))
    write_group(out, root)
    ledger = {r["image_id"]: r["status"] for r in root.read_parquet("extract/images").to_pylist()}
    assert ledger == {f"{i:016x}": "error" if i == 2 else "ok" for i in range(n)}
    assert root.read_parquet("extract/errors").column("error_class").to_pylist() == ["ImageDecodeError:truncated"]


def test_decode_sends_a_working_copy_and_masks_come_back_at_full_size(tmp_path):
    """Decode tasks send at most extract.max_side pixels a side; the actor writes masks at the full size."""
    import cv2

    from u2seg.features.backbone import build_backbone
    from u2seg.maskcut.process import process_batch
    from u2seg.pipeline.extract_actor import decode_batch

    rng = np.random.default_rng(0)
    path = tmp_path / "big.png"
    cv2.imwrite(str(path), rng.integers(0, 255, (300, 420, 3), dtype=np.uint8))
    batch = {"image_id": np.array(["a" * 16]), "uri": np.array([str(path)]), "version": np.array(["1-1"])}
    full = decode_batch(batch, {}, 0.0, max_side=0)
    small = decode_batch(batch, {}, 0.0, max_side=140)
    assert full["image"][0].shape == (300, 420, 3) and small["image"][0].shape == (100, 140, 3)
    assert (small["height"][0], small["width"][0]) == (300, 420)
    assert small["image"][0].nbytes * 9 == full["image"][0].nbytes  # a third of each side crosses the store
    model = build_backbone("vit_small_patch8_224.dino", "none", image_size=64, seed=0)
    working = rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)  # a copy this random ViT finds masks in
    out = process_batch(model, [working], image_size=64, n_masks=2, refine="none", patches_per_image=0,
                        amp="none", descriptor="crop_cls", crop_size=32, full_sizes=[(300, 420)])
    assert out[0].height == 300 and out[0].width == 420
    assert out[0].masks and all(m["rle"]["size"] == [300, 420] for m in out[0].masks)
    assert all(len(m["descriptor"]) == 384 for m in out[0].masks)


def test_a_group_result_counts_its_error_rows_by_reason(tmp_path):
    import json

    batch = _error_batch(["d", "e", "f"])
    batch["error_class"] = np.array(["ImageDecodeError:truncated", "ImageTooSmallError", "ImageTooSmallError"])
    out = write_group(batch, RunRoot(str(tmp_path)))
    assert out["errors"].tolist() == [3]
    assert json.loads(out["error_classes"][0]) == {"ImageDecodeError:truncated": 1, "ImageTooSmallError": 2}


def test_decode_traffic_counts_what_crosses_the_object_store():
    from u2seg.bench.extract import decode_traffic

    out = decode_traffic(sizes=((320, 240), (2048, 1024)), max_side=512)
    small, large = out["320x240"], out["2048x1024"]
    assert small["ratio"] == 1.0 and small["working_copy_bytes"] > 320 * 240 * 3  # below max_side: sent as is
    assert large["full_resolution_bytes"] > 2048 * 1024 * 3 and large["working_copy_bytes"] > 512 * 256 * 3
    assert 15.0 < large["ratio"] < 16.0  # 2048x1024 -> 512x256: a 16th of the pixels, plus the row's columns
