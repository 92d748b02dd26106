"""Training samples from a label set (``u2seg/io/labelset.py``), streamed by Ray Data."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from u2seg.io import RunRoot
from u2seg.io.labelset import LabelSet


def label_set_rows(labels: LabelSet) -> list[dict[str, Any]]:
    """One small row per labelled image (the fragments are read one at a time)."""
    rows = [{"uri": im.uri, "image_id": im.image_id, "png": im.png, "segments": json.dumps(im.segments)}
            for im in labels.iter_images()]
    if not rows:
        raise FileNotFoundError(f"no labelled images under {labels.root.join(labels.prefix)}: run `u2seg label` "
                                "first")
    return rows


def load_samples(batch: dict[str, np.ndarray], root: RunRoot, max_side: int, storage_options: dict[str, Any],
                 retry_s: float) -> dict[str, np.ndarray]:
    """Decode image + panoptic PNG and resize both so the longest side is at most ``max_side``."""
    import cv2

    from u2seg.io.inputs import read_image
    from u2seg.labels import decode_panoptic_png

    images, segs = [], []
    for uri, png in zip(batch["uri"], batch["png"], strict=True):
        img = read_image(str(uri), storage_options, retry_s)
        seg = decode_panoptic_png(root.read_bytes(str(png)))
        h, w = img.shape[:2]
        s = min(1.0, max_side / max(h, w))
        if s < 1.0:
            size = (max(1, round(w * s)), max(1, round(h * s)))
            img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
            seg = cv2.resize(seg.astype(np.int32), size, interpolation=cv2.INTER_NEAREST)
        images.append(img)
        segs.append(seg.astype(np.int32))
    out_img = np.empty(len(images), dtype=object)
    out_img[:] = images
    out_seg = np.empty(len(segs), dtype=object)
    out_seg[:] = segs
    return {"image": out_img, "seg": out_seg, "segments": batch["segments"], "image_id": batch["image_id"]}
