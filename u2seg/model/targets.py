"""Turn one panoptic pseudo-label (COCO panoptic segment ids + segments_info) into a training sample.

A sample is a dict: image (3, H, W) float32 in [0, 1], boxes (N, 4) float32 xyxy in pixel-edge
coordinates, labels (N,) int64 = thing category id (1..K_things, which is also torchvision's
class index since 0 is background), masks (N, H, W) uint8, semantic (H, W) int64 (0 = thing,
1 + s = stuff class s, 255 = void).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from u2seg.model.semantic import THING_CHANNEL, VOID


def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) masks -> (N, 4) float32 xyxy boxes enclosing each mask (x2/y2 exclusive, so a
    single pixel has width 1); empty masks give all-zero boxes."""
    n = masks.shape[0]
    if n == 0:
        return torch.zeros((0, 4), dtype=torch.float32, device=masks.device)
    m = masks.bool()
    rows = m.any(dim=2)
    cols = m.any(dim=1)
    h, w = m.shape[-2:]
    ys = torch.arange(h, device=m.device)
    xs = torch.arange(w, device=m.device)
    big = max(h, w) + 1
    y1 = torch.where(rows, ys, big).min(dim=1).values
    y2 = torch.where(rows, ys, -1).max(dim=1).values + 1
    x1 = torch.where(cols, xs, big).min(dim=1).values
    x2 = torch.where(cols, xs, -1).max(dim=1).values + 1
    boxes = torch.stack([x1, y1, x2, y2], dim=1).float()
    empty = ~rows.any(dim=1)
    boxes[empty] = 0.0
    return boxes


def image_to_tensor(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """HxWx3 uint8 (numpy) or 3xHxW uint8/float tensor -> 3xHxW float32 in [0, 1]."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an HxWx3 image, got shape {image.shape}")
        # Arrow-backed batches are read-only views: copy those (torch warns on non-writable arrays)
        t = torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1)
    else:
        t = image
        if t.ndim != 3 or t.shape[0] != 3:
            raise ValueError(f"expected a 3xHxW tensor, got shape {tuple(t.shape)}")
    if t.dtype == torch.uint8:
        return t.float().div_(255.0)
    return t.float()


def targets_from_labels(
    image_uint8: np.ndarray,
    seg_ids: np.ndarray,
    segments_info: Sequence[dict[str, Any]],
    k_things: int,
    *,
    k_stuff: int | None = None,
) -> dict[str, torch.Tensor]:
    """Build a training sample from a panoptic label. Pixels whose id is 0 or not listed are void;
    crowd segments (iscrowd=1) are void and never instances. k_stuff, when given, is checked."""
    image = image_to_tensor(image_uint8)
    h, w = image.shape[-2:]
    if seg_ids.shape != (h, w):
        raise ValueError(f"seg_ids shape {seg_ids.shape} != image size {(h, w)}")
    ids = torch.from_numpy(np.ascontiguousarray(seg_ids).astype(np.int64))
    semantic = torch.full((h, w), VOID, dtype=torch.int64)
    masks, labels = [], []
    for seg in segments_info:
        cat = int(seg["category_id"])
        m = ids == int(seg["id"])
        if not bool(m.any()):
            continue
        if seg.get("iscrowd", 0):
            continue
        if 1 <= cat <= k_things:
            masks.append(m)
            labels.append(cat)
            semantic[m] = THING_CHANNEL
        elif cat > k_things and (k_stuff is None or cat <= k_things + k_stuff):
            semantic[m] = cat - k_things
        else:
            raise ValueError(f"category_id {cat} outside things 1..{k_things} / stuff range")
    mask_t = torch.stack(masks).to(torch.uint8) if masks else torch.zeros((0, h, w), dtype=torch.uint8)
    return {
        "image": image,
        "boxes": boxes_from_masks(mask_t),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "masks": mask_t,
        "semantic": semantic,
    }
