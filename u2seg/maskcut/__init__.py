"""MaskCut (CutLER) instance pseudo-masks: affinity, batched eigen-solver, rules, refinement, outputs."""

from u2seg.maskcut.coco import masks_to_coco
from u2seg.maskcut.core import maskcut, maskcut_detailed
from u2seg.maskcut.crops import crop_cls_descriptors, object_crops
from u2seg.maskcut.descriptors import mask_descriptors, sample_patch_features
from u2seg.maskcut.process import ImageResult, process_batch
from u2seg.maskcut.refine import refine_masks, remove_overlaps, upsample_masks

__all__ = [
    "ImageResult",
    "crop_cls_descriptors",
    "mask_descriptors",
    "maskcut",
    "maskcut_detailed",
    "masks_to_coco",
    "object_crops",
    "process_batch",
    "refine_masks",
    "remove_overlaps",
    "sample_patch_features",
    "upsample_masks",
]
