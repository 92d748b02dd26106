"""Object-crop CLS descriptors: each mask's masked, square crop through the ViT, CLS after the final norm.

U2Seg clusters one descriptor per pseudo-mask: the CLS token of DINO run on the object's masked crop.
Its crop code was not released, so the geometry is ours: a square window centred on the mask's box,
its side the box's longer side plus ``context`` of it on each side (square so the object keeps its
aspect ratio when the crop is resized), pixels outside the mask and outside the image set to the
ImageNet mean (exactly 0 after normalisation, i.e. "no signal" for the ViT), resized to ``crop_size``.
"""

from __future__ import annotations

import logging
import math

import cv2
import numpy as np
import torch
from torch import nn

from u2seg.features import extract_features
from u2seg.features.backbone import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger(__name__)


def crop_window(box_xywh: np.ndarray | list[float], context: float) -> tuple[int, int, int]:
    """(x0, y0, side) of the square crop of one box, in image pixels (may reach past the borders).

    side = ceil(longer side * (1 + 2 * context)); the window is centred on the box centre, rounding
    half a pixel down-right when side and box parity differ.
    """
    x, y, w, h = (float(v) for v in box_xywh)
    if not (w > 0 and h > 0) or not all(math.isfinite(v) for v in (x, y, w, h)):
        raise ValueError(f"box must have finite x, y and positive w, h, got {[x, y, w, h]}")
    side = max(1, math.ceil(max(w, h) * (1.0 + 2.0 * context) - 1e-9))
    x0 = math.floor(x + (w - side) / 2.0 + 0.5)
    y0 = math.floor(y + (h - side) / 2.0 + 0.5)
    return x0, y0, side


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight [x, y, w, h] boxes of boolean masks [m, H, W] (float64 [m, 4]; an empty mask gets zeros)."""
    masks = np.asarray(masks, dtype=bool)
    out = np.zeros((masks.shape[0], 4), np.float64)
    for i, m in enumerate(masks):
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        if rows.size:
            out[i] = (cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1)
    return out


def object_crops(
    image: np.ndarray,
    masks: np.ndarray,
    boxes_xywh: np.ndarray,
    *,
    context: float,
    crop_size: int,
) -> torch.Tensor:
    """Masked square crops of one image's objects, ImageNet-normalised -> float32 [m, 3, crop_size, crop_size].

    image: uint8 HxWx3 RGB; masks: bool [m, H, W]; boxes_xywh: [m, 4] (COCO x, y, w, h, e.g. the
    masks' own boxes). Pixels outside the mask or the image are exactly 0 (the ImageNet mean). The
    window is cut at full resolution, then resized with INTER_AREA when shrinking and INTER_LINEAR
    when enlarging (as ``preprocess``). An empty mask raises ValueError: it has no object to
    describe, and skipping it would silently misalign crops with masks (callers drop empty masks).
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 HxWx3, got {image.dtype} {image.shape}")
    masks = np.asarray(masks)
    H, W = image.shape[:2]
    if masks.ndim != 3 or masks.shape[1:] != (H, W):
        raise ValueError(f"masks must be [m, {H}, {W}], got {masks.shape}")
    masks = masks.astype(bool, copy=False)
    boxes = np.asarray(boxes_xywh, dtype=np.float64).reshape(-1, 4) if len(boxes_xywh) else np.zeros((0, 4))
    if boxes.shape[0] != masks.shape[0]:
        raise ValueError(f"{masks.shape[0]} masks but {boxes.shape[0]} boxes")
    if context < 0 or not math.isfinite(context):
        raise ValueError(f"context must be a finite fraction >= 0, got {context}")
    if crop_size < 1:
        raise ValueError(f"crop_size must be >= 1, got {crop_size}")
    out = np.zeros((masks.shape[0], crop_size, crop_size, 3), dtype=np.float32)
    if masks.shape[0] == 0:
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
    std = np.asarray(IMAGENET_STD, dtype=np.float32)
    normed = (image.astype(np.float32) * (1.0 / 255.0) - mean) / std  # normalise once, crop many
    for i, (mask, box) in enumerate(zip(masks, boxes, strict=True)):
        if not mask.any():
            raise ValueError(f"mask {i} is empty: no object to crop")
        x0, y0, side = crop_window(box, context)
        crop = np.zeros((side, side, 3), dtype=np.float32)
        ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x0 + side, W), min(y0 + side, H)
        if ix1 > ix0 and iy1 > iy0:
            window = mask[iy0:iy1, ix0:ix1]
            crop[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0][window] = normed[iy0:iy1, ix0:ix1][window]
        if side == crop_size:
            out[i] = crop
        else:
            interp = cv2.INTER_AREA if side > crop_size else cv2.INTER_LINEAR
            out[i] = cv2.resize(crop, (crop_size, crop_size), interpolation=interp)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def crop_cls_descriptors(model: nn.Module, crops: torch.Tensor, *, batch_size: int, amp: str) -> np.ndarray:
    """CLS token after the final norm for each crop [m, 3, S, S] -> float32 [m, D], not L2-normalised.

    U2Seg's clustering normalises as it needs; keeping the raw CLS leaves that choice downstream.
    """
    if crops.ndim != 4 or crops.shape[1] != 3:
        raise ValueError(f"crops must be [m, 3, S, S], got {tuple(crops.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dim = int(getattr(model, "num_features", getattr(model, "embed_dim", 0)))
    parts = [extract_features(model, crops[i:i + batch_size], amp=amp).cls.cpu().numpy()
             for i in range(0, crops.shape[0], batch_size)]
    return np.concatenate(parts).astype(np.float32, copy=False) if parts else np.zeros((0, dim), np.float32)
