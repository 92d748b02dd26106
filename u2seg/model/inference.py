"""Inference: one forward pass -> instances, a semantic map and a panoptic segmentation per image."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from u2seg.labels.panoptic import panoptic_merge
from u2seg.model.network import U2SegModel
from u2seg.model.semantic import THING_CHANNEL
from u2seg.model.targets import image_to_tensor
from u2seg.model.train import autocast_context


@dataclass
class Prediction:
    """One image's outputs, at the image's original size, as numpy (cheap to ship between workers).

    classes are 0-based thing cluster ids; semantic holds 0-based stuff ids and -1 where the
    semantic head's best guess is "thing"; panoptic/segments_info use the label convention
    (things 1..K_things, stuff K_things+1..), segments carry isthing and (things) score.
    """

    boxes: np.ndarray  # (N, 4) float32 xyxy
    scores: np.ndarray  # (N,) float32
    classes: np.ndarray  # (N,) int64
    masks: np.ndarray  # (N, H, W) bool
    semantic: np.ndarray  # (H, W) int32
    panoptic: np.ndarray  # (H, W) int32 segment ids, 0 = void
    segments_info: list[dict[str, Any]] = field(default_factory=list)


def semantic_from_logits(sem_logits: torch.Tensor) -> np.ndarray:
    """(K_stuff + 1, H, W) logits -> 0-based stuff id per pixel, -1 where "thing" wins."""
    best = sem_logits.argmax(dim=0).to(torch.int32)
    stuff = best - 1  # channel 1 + s -> s; the thing channel 0 -> -1
    stuff[best == THING_CHANNEL] = -1
    return stuff.cpu().numpy()


def to_prediction(raw: dict[str, torch.Tensor], model: U2SegModel) -> Prediction:
    """Threshold masks, decode classes and merge things over stuff into a panoptic segmentation."""
    cfg = model.cfg
    scores = raw["scores"].float().cpu().numpy().astype(np.float32)
    classes = (raw["labels"].cpu().numpy() - 1).astype(np.int64)
    masks = (raw["masks"][:, 0] >= cfg.mask_threshold).cpu().numpy()
    boxes = raw["boxes"].float().cpu().numpy().astype(np.float32)
    semantic = semantic_from_logits(raw["sem_logits"])

    confident = np.flatnonzero(scores >= cfg.panoptic_score_thresh)
    merged = panoptic_merge(
        masks[confident],
        classes[confident].tolist(),
        scores[confident].tolist(),
        semantic,
        k_things=cfg.num_thing_classes,
        k_stuff=cfg.num_stuff_classes,
        min_stuff_area=cfg.panoptic_min_stuff_area,
        min_thing_area=1,
        max_occluded_fraction=cfg.panoptic_overlap_thresh,
    )
    segments = []
    for seg in merged.segments_info:
        seg = dict(seg)
        seg["isthing"] = seg["category_id"] <= cfg.num_thing_classes
        if seg["id"] in merged.thing_sources:
            seg["score"] = float(scores[confident[merged.thing_sources[seg["id"]]]])
        segments.append(seg)
    return Prediction(
        boxes=boxes,
        scores=scores,
        classes=classes,
        masks=masks,
        semantic=semantic,
        panoptic=merged.seg_ids.astype(np.int32),
        segments_info=segments,
    )


@torch.no_grad()
def predict(
    model: U2SegModel, images: Sequence[np.ndarray | torch.Tensor], *, batch_size: int = 4
) -> list[Prediction]:
    """Predict on HxWx3 uint8 arrays or 3xHxW tensors (uint8, or float in [0, 1]).

    The model is put in eval mode (and left there); images are resized to cfg.min_size/max_size
    inside the model and outputs come back at each image's own size.
    """
    model.eval()
    device = model.device
    out: list[Prediction] = []
    for start in range(0, len(images), batch_size):
        chunk = [image_to_tensor(im).to(device) for im in images[start : start + batch_size]]
        with autocast_context(device, model.cfg.amp):
            raw = model(chunk)
        out.extend(to_prediction(r, model) for r in raw)
    return out
