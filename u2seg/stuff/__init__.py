"""STEGO stuff head (projection, cluster probe, loss, training step), its crops and kNN positives (pure)."""

from u2seg.stuff.crops import center_crop_box, five_crop_boxes, five_crops, resize_short_side
from u2seg.stuff.knn import global_descriptor, knn_indices, pick_positives
from u2seg.stuff.stego import (
    STEGO_LOSS_PRESETS,
    ClusterProbe,
    CorrelationLoss,
    StegoHead,
    StegoTrainConfig,
    contrastive_correlation_loss,
    correlation_term,
    load_stego_head,
    make_stego_optimizers,
    sample_at,
    stego_state_dict,
    stego_train_step,
    super_perm,
    tensor_correlation,
)

__all__ = [
    "STEGO_LOSS_PRESETS",
    "ClusterProbe",
    "CorrelationLoss",
    "StegoHead",
    "StegoTrainConfig",
    "center_crop_box",
    "contrastive_correlation_loss",
    "correlation_term",
    "five_crop_boxes",
    "five_crops",
    "global_descriptor",
    "knn_indices",
    "load_stego_head",
    "make_stego_optimizers",
    "pick_positives",
    "resize_short_side",
    "sample_at",
    "stego_state_dict",
    "stego_train_step",
    "super_perm",
    "tensor_correlation",
]
