"""Universal segmentation model (Mask R-CNN + Panoptic FPN semantic head, CutLER DropLoss)."""

from u2seg.model.augment import (
    AugmentConfig,
    augment_batch,
    copy_paste,
    copy_paste_batch,
    hflip,
    scale_jitter,
)
from u2seg.model.checkpoint import load_model, model_from_bytes, model_to_bytes, save_model
from u2seg.model.config import ModelConfig
from u2seg.model.inference import Prediction, predict
from u2seg.model.network import U2SegModel, build_model
from u2seg.model.targets import boxes_from_masks, targets_from_labels
from u2seg.model.train import autocast_context, train_step

__all__ = [
    "AugmentConfig",
    "ModelConfig",
    "Prediction",
    "U2SegModel",
    "augment_batch",
    "autocast_context",
    "boxes_from_masks",
    "build_model",
    "copy_paste",
    "copy_paste_batch",
    "hflip",
    "load_model",
    "model_from_bytes",
    "model_to_bytes",
    "predict",
    "save_model",
    "scale_jitter",
    "targets_from_labels",
    "train_step",
]
