"""STEGO's five-crop training images, pure numpy.

STEGO trains cocostuff27 on five crops per image (src/crop_datasets.py, crop_type "five", crop_ratio .5):
torchvision's `five_crop` of size (int(H * ratio), int(W * ratio)) in the order top-left, top-right,
bottom-left, bottom-right, centre; each crop is saved and later loaded through
`get_transform(224, False, "center")`: Resize(224, NEAREST) of the shorter side, then CenterCrop(224).
`five_crops` reproduces that geometry exactly, including PIL's nearest-neighbour sampling and Python's
round-half-to-even in the centre offsets. (STEGO round-trips the crops through JPEG on disk; that loss
is not reproduced.) Normalisation for the backbone is left to the caller.
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np


def _check_image(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (1, 3, 4)):
        raise ValueError(f"image must be uint8 [H, W] or [H, W, C] with C in 1/3/4, got {img.dtype} {img.shape}")
    if img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"image is empty: shape {img.shape}")
    return img


def _pil_nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index per output pixel as PIL's NEAREST resize picks it.

    PIL starts at half a step and accumulates the step in double precision (ImagingScaleAffine), so
    an accumulated sum, not (i + 0.5) * step, is what reproduces it pixel for pixel.
    """
    step = n_in / n_out
    steps = np.full(n_out, step, dtype=np.float64)
    steps[0] = step * 0.5
    return np.minimum(np.cumsum(steps).astype(np.int64), n_in - 1)


def center_crop_box(height: int, width: int, crop_h: int, crop_w: int) -> tuple[int, int]:
    """(top, left) of torchvision's center_crop: round((H - h) / 2) with Python's half-to-even rounding."""
    return round((height - crop_h) / 2.0), round((width - crop_w) / 2.0)


def five_crop_boxes(height: int, width: int, crop_ratio: float) -> list[tuple[int, int, int, int]]:
    """(top, left, h, w) of STEGO's five crops: tl, tr, bl, br, centre, each int(H*r) x int(W*r)."""
    if not 0.0 < crop_ratio <= 1.0:
        raise ValueError(f"crop_ratio must be in (0, 1], got {crop_ratio!r}")
    ch, cw = int(height * crop_ratio), int(width * crop_ratio)
    if ch <= 0 or cw <= 0:
        raise ValueError(f"crop_ratio {crop_ratio} leaves an empty crop of a {height}x{width} image")
    top, left = center_crop_box(height, width, ch, cw)
    return [
        (0, 0, ch, cw),
        (0, width - cw, ch, cw),
        (height - ch, 0, ch, cw),
        (height - ch, width - cw, ch, cw),
        (top, left, ch, cw),
    ]


def resize_short_side(
    image: np.ndarray, size: int, interpolation: Literal["nearest", "bilinear"] = "nearest"
) -> np.ndarray:
    """torchvision Resize(size) on a PIL image: shorter side to `size`, longer to int(size * long / short)."""
    img = _check_image(image)
    h, w = img.shape[:2]
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_h, new_w = size, int(size * w / h)
    if (new_h, new_w) == (h, w):
        return img
    if interpolation == "nearest":
        rows, cols = _pil_nearest_index(h, new_h), _pil_nearest_index(w, new_w)
        return img[rows[:, None], cols[None, :]]
    if interpolation == "bilinear":
        return cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    raise ValueError(f"interpolation must be 'nearest' or 'bilinear', got {interpolation!r}")


def five_crops(
    image_uint8: np.ndarray,
    crop_ratio: float = 0.5,
    out_size: int | None = 224,
    *,
    interpolation: Literal["nearest", "bilinear"] = "nearest",
) -> list[np.ndarray]:
    """STEGO's five crops of one image, each resized (shorter side) and centre-cropped to out_size.

    `interpolation="nearest"` is STEGO's (its get_transform uses Image.NEAREST even for photos);
    out_size=None returns the raw crops.
    """
    img = _check_image(image_uint8)
    if out_size is not None and (int(out_size) != out_size or out_size <= 0):
        raise ValueError(f"out_size must be a positive integer or None, got {out_size!r}")
    crops = []
    for top, left, ch, cw in five_crop_boxes(img.shape[0], img.shape[1], crop_ratio):
        crop = img[top:top + ch, left:left + cw]
        if out_size is not None:
            crop = resize_short_side(crop, int(out_size), interpolation)
            t, lft = center_crop_box(crop.shape[0], crop.shape[1], int(out_size), int(out_size))
            crop = crop[t:t + int(out_size), lft:lft + int(out_size)]
        crops.append(np.ascontiguousarray(crop))
    return crops
