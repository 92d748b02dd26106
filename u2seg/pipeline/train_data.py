"""Training samples from a label set (the label stage's format), streamed by Ray Data.

A label set is a run-root prefix holding ``_parts/*.json`` fragments (images + panoptic annotations)
and ``panoptic/*.png``: ``labels/`` for the first round, ``selftrain/round-R/`` after self-training.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from u2seg.io import RunRoot


def label_set_rows(root: RunRoot, label_dir: str) -> list[dict[str, Any]]:
    """One small row per labelled image (the fragments are read part by part)."""
    rows = []
    for name in root.list(f"{label_dir}/_parts", ".json"):
        part = json.loads(root.read_bytes(f"{label_dir}/_parts/{name}"))
        anns = {a["image_id"]: a for a in part["panoptic"]}
        for img in part["images"]:
            ann = anns[img["id"]]
            rows.append({"uri": img["uri"], "image_id": img["u2seg_image_id"],
                         "png": f"{label_dir}/panoptic/{ann['file_name']}",
                         "segments": json.dumps(ann["segments_info"])})
    if not rows:
        raise FileNotFoundError(f"no labelled images under {root.join(label_dir)}: run `u2seg label` first")
    return rows


def load_samples(batch: dict[str, np.ndarray], root: RunRoot, max_side: int,
                 storage_options: dict[str, Any]) -> dict[str, np.ndarray]:
    """Decode image + panoptic PNG and resize both so the longest side is at most ``max_side``."""
    import cv2

    from u2seg.io.images import decode_image
    from u2seg.io.runroot import filesystem_for, split_protocol
    from u2seg.labels import decode_panoptic_png

    images, segs = [], []
    for uri, png in zip(batch["uri"], batch["png"], strict=True):
        img = decode_image(filesystem_for(str(uri), storage_options).cat_file(split_protocol(str(uri))[1]))
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
