"""Pseudo-labels: stuff assignment, panoptic merge, COCO / COCO-panoptic encodings (pure, no IO)."""

from u2seg.labels.coco import (
    decode_panoptic_png,
    decode_semantic_png,
    instance_annotations,
    panoptic_annotation,
    panoptic_png_bytes,
    pseudo_categories,
    semantic_png_bytes,
)
from u2seg.labels.masks import decode_mask, encode_masks, encode_rle, mask_area_bbox, segment_stats
from u2seg.labels.merge import merge_coco_parts
from u2seg.labels.panoptic import (
    PanopticResult,
    coco_panoptic_problems,
    panoptic_merge,
    semantic_from_panoptic,
    validate_panoptic,
)
from u2seg.labels.selftrain import selftrain_image
from u2seg.labels.stuff import mode_filter, stuff_ids_from_features, stuff_map, upsample_nearest

__all__ = [
    "PanopticResult",
    "coco_panoptic_problems",
    "decode_mask",
    "decode_panoptic_png",
    "decode_semantic_png",
    "encode_masks",
    "encode_rle",
    "instance_annotations",
    "mask_area_bbox",
    "merge_coco_parts",
    "mode_filter",
    "panoptic_annotation",
    "panoptic_merge",
    "panoptic_png_bytes",
    "pseudo_categories",
    "segment_stats",
    "selftrain_image",
    "semantic_from_panoptic",
    "semantic_png_bytes",
    "stuff_ids_from_features",
    "stuff_map",
    "upsample_nearest",
    "validate_panoptic",
]
