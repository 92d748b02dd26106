"""The stuff stage's pieces outside Ray: the seeded sample, head files, class maps from the extract pass."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import torch

from u2seg.io import RunRoot
from u2seg.pipeline.label import image_stuff_map
from u2seg.pipeline.stuff import head_bytes, load_head, sample_images
from u2seg.stuff.stego import StegoHead

pytestmark = pytest.mark.unit


def test_the_training_sample_is_seeded_and_independent_of_the_part_layout(tmp_path):
    ids = [f"{i:016x}" for i in range(40)]
    a, b = RunRoot(str(tmp_path / "a")), RunRoot(str(tmp_path / "b"))
    a.write_parquet("manifest/p0.parquet", pa.table({"image_id": ids, "uri": [f"/x/{i}" for i in ids]}))
    for k in range(4):  # the same rows in four parts, shuffled
        chunk = ids[k::4][::-1]
        b.write_parquet(f"manifest/p{k}.parquet", pa.table({"image_id": chunk, "uri": [f"/x/{i}" for i in chunk]}))
    sample = sample_images(a, 10, seed=3)
    assert len(sample) == 10 and sample == sample_images(b, 10, seed=3)
    assert sample != sample_images(a, 10, seed=4)
    assert len(sample_images(a, 100, seed=3)) == 40


def test_head_files_round_trip_and_unsafe_checkpoints_are_refused_clearly():
    head = StegoHead(16, code_dim=6, n_clusters=4, generator=torch.Generator().manual_seed(0)).eval()
    loaded = load_head(head_bytes(head, {"note": "test"}))
    x = torch.randn(2, 16, 3, 5)
    assert torch.equal(loaded.project(x), head.project(x)) and loaded.n_clusters == 4
    buf = io.BytesIO()
    torch.save({"state_dict": {}, "hyper_parameters": {"cfg": object()}}, buf)  # what Lightning pickles
    with pytest.raises(ValueError, match="weights_only=True"):
        load_head(buf.getvalue(), source="stego.ckpt")


def test_extract_applies_the_head_in_the_same_pass_and_label_upsamples_its_classes():
    from u2seg.features.backbone import build_backbone
    from u2seg.maskcut.process import process_batch

    model = build_backbone("vit_small_patch8_224.dino", "none", image_size=64, seed=0)
    head = StegoHead(384, code_dim=8, n_clusters=5, generator=torch.Generator().manual_seed(1)).eval()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (40, 56, 3), dtype=np.uint8), rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)]
    out = process_batch(model, images, image_size=64, n_masks=1, refine="none", patches_per_image=0, amp="none",
                        stuff_head=head)
    for r in out:
        assert r.stuff_classes.shape == (8, 8) and r.stuff_classes.dtype == np.uint8
        assert r.stuff_classes.max() < 5 and r.stuff_grid is None
    row = {"height": 40, "width": 56, "grid_h": 8, "grid_w": 8, "stuff_classes": out[0].stuff_classes.reshape(-1),
           "uri": "/x.jpg"}
    dense = image_stuff_map(row, None, smooth=1)
    assert dense.shape == (40, 56) and set(np.unique(dense)) <= set(np.unique(out[0].stuff_classes))
    assert dense[0, 0] == out[0].stuff_classes[0, 0] and dense[-1, -1] == out[0].stuff_classes[-1, -1]
