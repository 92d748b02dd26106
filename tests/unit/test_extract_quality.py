"""A regression floor on pseudo-mask recall of ground-truth things in the synthetic world.

With a random-init ViT the synthetic world measures plumbing, not segmentation quality (docs/method.md):
the floor guards against regressions in resizing, rules, upsampling and RLE, which would drop recall
towards zero. Measured: 6 of 26 instances (0.231) at 128 px, 8 images, 3 masks, seed 0.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from u2seg.data.synthetic import make_synthetic
from u2seg.features.backbone import build_backbone
from u2seg.io.images import decode_image
from u2seg.maskcut.process import process_batch

pytestmark = pytest.mark.unit

RECALL_FLOOR = 0.18


def _rle(r: dict) -> dict:
    return {"size": r["size"], "counts": r["counts"].encode() if isinstance(r["counts"], str) else r["counts"]}


def test_pseudo_masks_recall_synthetic_things_above_floor(tmp_path):
    make_synthetic(str(tmp_path), 8, seed=0, min_size=160, max_size=256)
    gt = json.loads((tmp_path / "gt" / "instances.json").read_text())
    model = build_backbone("vit_small_patch8_224.dino", "none", image_size=128, seed=0).eval()
    hits = total = 0
    for img in gt["images"]:
        im = decode_image((tmp_path / "images" / img["file_name"]).read_bytes())
        with torch.no_grad():
            res = process_batch(model, [im], image_size=128, n_masks=3, refine="none", patches_per_image=0,
                                amp="none")[0]
        for m in res.masks:  # masks are at the image's own resolution
            assert m["rle"]["size"] == [im.shape[0], im.shape[1]]
        gts = [a["segmentation"] for a in gt["annotations"] if a["image_id"] == img["id"]]
        total += len(gts)
        if res.masks and gts:
            iou = mask_utils.iou([_rle(m["rle"]) for m in res.masks], [_rle(g) for g in gts], [0] * len(gts))
            hits += int((np.asarray(iou).max(0) >= 0.5).sum())
    recall = hits / total
    print(f"\nPSEUDO_MASK_RECALL {hits}/{total} = {recall:.3f}")
    assert recall >= RECALL_FLOOR
