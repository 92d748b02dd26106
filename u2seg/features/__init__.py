"""Self-supervised ViT features (timm): build, load weights, extract keys / tokens / CLS."""

from u2seg.features.backbone import (
    Features,
    build_backbone,
    extract_features,
    patch_size,
    preprocess,
    set_fused_attention,
)
from u2seg.features.weights import WeightsError

__all__ = [
    "Features",
    "WeightsError",
    "build_backbone",
    "extract_features",
    "patch_size",
    "preprocess",
    "set_fused_attention",
]
