"""Unit tests for u2seg.maskcut.crops: masked square object crops and their CLS descriptors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from u2seg.features.backbone import IMAGENET_MEAN, IMAGENET_STD
from u2seg.maskcut.crops import crop_cls_descriptors, crop_window, object_crops

pytestmark = pytest.mark.unit

MEAN = np.asarray(IMAGENET_MEAN, np.float32)
STD = np.asarray(IMAGENET_STD, np.float32)


def _image(h: int = 20, w: int = 20, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _normed(img: np.ndarray) -> np.ndarray:
    return (img.astype(np.float32) / 255.0 - MEAN) / STD


def _box_mask(hw: tuple[int, int], y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros(hw, bool)
    m[y0:y1, x0:x1] = True
    return m


def _hwc(crops: torch.Tensor, i: int) -> np.ndarray:
    return crops[i].permute(1, 2, 0).numpy()


def test_centred_box_crop_is_the_masked_window() -> None:
    img = _image()
    mask = _box_mask((20, 20), 8, 12, 6, 14)  # box x=6, y=8, w=8, h=4
    mask[9, 7] = False  # a hole: outside the mask even inside the box
    assert crop_window([6, 8, 8, 4], 0.25) == (4, 4, 12)  # side 8 * 1.5, centred on (10, 10)
    crops = object_crops(img, mask[None], np.array([[6, 8, 8, 4]]), context=0.25, crop_size=12)
    assert crops.shape == (1, 3, 12, 12) and crops.dtype == torch.float32
    got = _hwc(crops, 0)
    window = mask[4:16, 4:16]
    np.testing.assert_allclose(got[window], _normed(img)[4:16, 4:16][window], rtol=0, atol=1e-6)
    assert (got[~window] == 0).all()  # outside the mask: exactly the mean after normalisation
    np.testing.assert_allclose(got[~window] * STD + MEAN, np.broadcast_to(MEAN, got[~window].shape), atol=1e-7)


def test_box_touching_the_border_pads_with_the_mean() -> None:
    img = _image()
    mask = _box_mask((20, 20), 0, 4, 0, 4)
    assert crop_window([0, 0, 4, 4], 0.5) == (-2, -2, 8)
    got = _hwc(object_crops(img, mask[None], [[0, 0, 4, 4]], context=0.5, crop_size=8), 0)
    np.testing.assert_allclose(got[2:6, 2:6], _normed(img)[0:4, 0:4], atol=1e-6)
    inside = np.zeros((8, 8), bool)
    inside[2:6, 2:6] = True
    assert (got[~inside] == 0).all()
    # Far past the bottom-right corner as well.
    mask2 = _box_mask((20, 20), 17, 20, 18, 20)
    got2 = _hwc(object_crops(img, mask2[None], [[18, 17, 2, 3]], context=1.0, crop_size=9), 0)
    x0, y0, side = crop_window([18, 17, 2, 3], 1.0)
    assert side == 9 and x0 + side > 20 and y0 + side > 20
    assert (got2[20 - y0:, :] == 0).all() and (got2[:, 20 - x0:] == 0).all()
    np.testing.assert_allclose(got2[17 - y0:20 - y0, 18 - x0:20 - x0], _normed(img)[17:20, 18:20], atol=1e-6)


def test_tall_thin_box_gives_a_square_crop_on_its_long_side() -> None:
    img = _image()
    mask = _box_mask((20, 20), 5, 15, 9, 11)  # w=2, h=10
    assert crop_window([9, 5, 2, 10], 0.0) == (5, 5, 10)
    got = _hwc(object_crops(img, mask[None], [[9, 5, 2, 10]], context=0.0, crop_size=10), 0)
    assert (got[:, :4] == 0).all() and (got[:, 6:] == 0).all()
    np.testing.assert_allclose(got[:, 4:6], _normed(img)[5:15, 9:11], atol=1e-6)


def test_resized_crops_keep_exact_zeros_away_from_the_mask_and_are_deterministic() -> None:
    img = np.full((64, 64, 3), 200, np.uint8)
    mask = _box_mask((64, 64), 8, 40, 8, 24)  # 16 x 32 box: object fills the middle quarter-width
    boxes = np.array([[8, 8, 16, 32]], float)
    for size in (16, 96):  # INTER_AREA shrink, INTER_LINEAR enlarge
        crops = object_crops(img, mask[None], boxes, context=0.0, crop_size=size)
        got = _hwc(crops, 0)
        q = size // 4
        assert (got[:, : q - 2] == 0).all() and (got[:, 3 * q + 2:] == 0).all()
        body = got[:, q + 2: 3 * q - 2]
        np.testing.assert_allclose(body, np.broadcast_to(_normed(img)[0, 0], body.shape), atol=1e-5)
        assert torch.equal(crops, object_crops(img, mask[None], boxes, context=0.0, crop_size=size))


def test_object_crops_shapes_and_bad_inputs() -> None:
    img = _image()
    masks = np.stack([_box_mask((20, 20), 0, 5, 0, 5), _box_mask((20, 20), 10, 20, 5, 9)])
    boxes = [[0, 0, 5, 5], [5, 10, 4, 10]]
    crops = object_crops(img, masks, boxes, context=0.1, crop_size=16)
    assert crops.shape == (2, 3, 16, 16)
    assert object_crops(img, masks[:0], [], context=0.1, crop_size=16).shape == (0, 3, 16, 16)
    empty = masks.copy()
    empty[1] = False
    with pytest.raises(ValueError, match="mask 1 is empty"):
        object_crops(img, empty, boxes, context=0.1, crop_size=16)
    with pytest.raises(ValueError, match="boxes"):
        object_crops(img, masks, boxes[:1], context=0.1, crop_size=16)
    with pytest.raises(ValueError, match="box"):
        object_crops(img, masks, [[0, 0, 0, 5], [5, 10, 4, 10]], context=0.1, crop_size=16)
    with pytest.raises(ValueError, match="masks"):
        object_crops(img, masks[:, :10], boxes, context=0.1, crop_size=16)
    with pytest.raises(ValueError, match="image"):
        object_crops(img.astype(np.float32), masks, boxes, context=0.1, crop_size=16)
    with pytest.raises(ValueError, match="context"):
        object_crops(img, masks, boxes, context=-0.1, crop_size=16)


def _tiny_vit() -> torch.nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0,
                             dynamic_img_size=True).eval()


def test_crop_cls_descriptors_equal_a_manual_forward() -> None:
    model = _tiny_vit()
    img = _image(40, 48, seed=3)
    masks = np.stack([_box_mask((40, 48), 2, 20, 3, 30), _box_mask((40, 48), 25, 40, 10, 14),
                      _box_mask((40, 48), 0, 40, 40, 48)])
    boxes = [[3, 2, 27, 18], [10, 25, 4, 15], [40, 0, 8, 40]]
    crops = object_crops(img, masks, boxes, context=0.2, crop_size=32)
    desc = crop_cls_descriptors(model, crops, batch_size=2, amp="none")
    with torch.inference_mode():
        manual = model.norm(model.blocks(model._pos_embed(model.patch_embed(crops))))[:, 0].numpy()
    assert desc.shape == (3, 32) and desc.dtype == np.float32
    np.testing.assert_allclose(desc, manual, rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.linalg.norm(desc, axis=1), 1.0)  # raw CLS, not L2-normalised
    np.testing.assert_allclose(crop_cls_descriptors(model, crops, batch_size=8, amp="none"), desc, atol=1e-5)
    assert crop_cls_descriptors(model, crops[:0], batch_size=2, amp="none").shape == (0, 32)
    with pytest.raises(ValueError):
        crop_cls_descriptors(model, crops, batch_size=0, amp="none")
