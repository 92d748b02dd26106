"""Training samples from a label set (``u2seg/io/labelset.py``), in an order fixed by the seed.

Each rank reads its own batches: every epoch is a seeded permutation of the labelled images, split across
ranks, so the same config, data and seed train on the same batches in the same order, and a run resumed
from step s continues with exactly the batches an uninterrupted run would have used.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from u2seg.io import RunRoot
from u2seg.io.labelset import LabelSet


def label_set_rows(labels: LabelSet, *, skip_without_things: bool = False) -> list[dict[str, Any]]:
    """One small row per labelled image (the parts are read one at a time, projected); with
    ``skip_without_things`` images whose label holds no thing segment are left out (U2Seg drops them from
    training)."""
    rows = [{"uri": r["uri"], "image_id": r["image_id"], "png": labels.rel(r["png"]),
             "segments": json.dumps(r["segments"])}
            for r in labels.iter_rows(["uri", "image_id", "png", "segments"])
            if not skip_without_things or any(s["category_id"] <= labels.k_things for s in r["segments"])]
    if not rows:
        raise FileNotFoundError(f"no labelled images to train on under {labels.root.join(labels.prefix)}"
                                + (" (none has a thing; train.images_without_things=train keeps them)"
                                   if skip_without_things else ": run `u2seg label` first"))
    return rows


def batch_indices(step: int, *, n_rows: int, batch_size: int, rank: int, world: int, seed: int) -> list[int]:
    """Row indices of rank ``rank``'s batch at global step ``step``.

    Epoch e is ``default_rng([seed, e]).permutation(n_rows)``; rank r takes every world-th image of it from
    position r, wrapping around so every rank has ceil(n / world) images and the same number of steps per
    epoch (DDP needs them in lockstep).
    """
    if n_rows <= 0 or batch_size <= 0 or not 0 <= rank < world:
        raise ValueError(f"bad batch plan: n_rows={n_rows}, batch_size={batch_size}, rank={rank}, world={world}")
    per_rank = -(-n_rows // world)
    steps_per_epoch = -(-per_rank // batch_size)
    epoch, k = divmod(step, steps_per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n_rows)
    positions = range(k * batch_size, min((k + 1) * batch_size, per_rank))
    return [int(perm[(rank + world * j) % n_rows]) for j in positions]


def load_rows(rows: list[dict[str, Any]], root: RunRoot, max_side: int, storage_options: dict[str, Any],
              retry_s: float) -> list[tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]]:
    """(image, panoptic segment ids, segments) per row, resized so the longest side is at most ``max_side``."""
    import cv2

    from u2seg.io.inputs import read_image
    from u2seg.labels import decode_panoptic_png

    out = []
    for row in rows:
        img = read_image(row["uri"], storage_options, retry_s)
        seg = decode_panoptic_png(root.read_bytes(row["png"]))
        h, w = img.shape[:2]
        s = min(1.0, max_side / max(h, w))
        if s < 1.0:
            size = (max(1, round(w * s)), max(1, round(h * s)))
            img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
            seg = cv2.resize(seg.astype(np.int32), size, interpolation=cv2.INTER_NEAREST)
        out.append((img, seg.astype(np.int32), json.loads(row["segments"])))
    return out
