"""Universal segmentation model (Mask R-CNN or Cascade R-CNN + Panoptic FPN semantic head, CutLER DropLoss)."""

from u2seg.model.augment import (
    AugmentConfig,
    augment_batch,
    copy_paste,
    copy_paste_batch,
    hflip,
    scale_jitter,
)
from u2seg.model.checkpoint import (
    load_model,
    model_from_bytes,
    model_to_bytes,
    save_model,
    transfer_from_bytes,
    transfer_weights,
)
from u2seg.model.config import ModelConfig
from u2seg.model.inference import Prediction, predict
from u2seg.model.network import U2SegModel, build_model
from u2seg.model.optim import U2SEG_SOLVER, build_lr_scheduler, build_optimizer, clip_grad_norm_per_param_, lr_at
from u2seg.model.targets import boxes_from_masks, targets_from_labels
from u2seg.model.train import autocast_context, train_step

__all__ = [
    "U2SEG_SOLVER",
    "AugmentConfig",
    "ModelConfig",
    "Prediction",
    "U2SegModel",
    "augment_batch",
    "autocast_context",
    "boxes_from_masks",
    "build_lr_scheduler",
    "build_model",
    "build_optimizer",
    "clip_grad_norm_per_param_",
    "copy_paste",
    "copy_paste_batch",
    "hflip",
    "load_model",
    "lr_at",
    "model_from_bytes",
    "model_to_bytes",
    "predict",
    "save_model",
    "scale_jitter",
    "targets_from_labels",
    "train_step",
    "transfer_from_bytes",
    "transfer_weights",
]
