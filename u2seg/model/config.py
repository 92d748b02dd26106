"""Model configuration: one dataclass so the trainer, checkpoints and tests agree on every knob."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

AMP_MODES = ("bf16", "fp16", "none")
ROI_HEADS = ("standard", "cascade")
# Cascade R-CNN stages as Detectron2's defaults (MODEL.ROI_BOX_CASCADE_HEAD), which U2Seg and CutLER use.
CASCADE_IOUS = (0.5, 0.6, 0.7)
CASCADE_BOX_WEIGHTS = ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))


@dataclass
class ModelConfig:
    """Everything needed to rebuild the same network (it is stored inside checkpoints).

    Category conventions (shared with u2seg.labels): thing pseudo classes are 1..num_thing_classes
    (0 is torchvision's background), stuff classes are num_thing_classes+1..+num_stuff_classes.
    The semantic head predicts num_stuff_classes + 1 channels: channel 0 = "some thing", channel
    1 + s = stuff class s (0-based), 255 = void (ignored by the loss), as in Panoptic FPN.
    """

    backbone: str = "vit_small_patch8_224.dino"
    weights: str = "none"  # "none" | "timm" | local path | s3:// uri (ViT via u2seg.features; CNN: torchvision layout)
    num_thing_classes: int = 800
    num_stuff_classes: int = 27
    image_size: int = 224  # ViT construction size (pos-embed grid); inputs of any size are accepted
    min_size: int = 800  # test-time shortest edge; training sizes are set by augmentation
    max_size: int = 1333  # test-time longest-edge cap
    freeze_backbone_blocks: int = 0  # ViT: patch embed + first N blocks; CNN: stem + first N stages; -1: all
    drop_path_rate: float = 0.0
    pyramid_channels: int = 256
    # Region proposal network (torchvision defaults, which follow Detectron2's FPN defaults).
    rpn_batch_size_per_image: int = 256
    rpn_nms_thresh: float = 0.65  # U2Seg's value (torchvision's default is 0.7)
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 4000  # U2Seg / CutLER
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    # ROI heads.
    roi_heads: str = "standard"  # "standard" (one Fast R-CNN head) | "cascade" (Cascade R-CNN, as U2Seg / CutLER)
    cascade_ious: tuple[float, ...] = CASCADE_IOUS  # foreground IoU per cascade stage
    cascade_box_weights: tuple[tuple[float, ...], ...] = CASCADE_BOX_WEIGHTS  # box-coder weights per stage
    box_batch_size_per_image: int = 512
    box_positive_fraction: float = 0.25
    box_fg_iou_thresh: float = 0.5
    box_bg_iou_thresh: float = 0.5
    representation_size: int = 1024
    class_agnostic_box_reg: bool = True  # as U2Seg / CutLER: one box regressor shared by all classes
    mask_head_layers: tuple[int, ...] = (256, 256, 256, 256)
    drop_loss_iou: float = 0.01  # CutLER DropLoss; 0 turns it off (plain Mask R-CNN)
    # Semantic (Panoptic FPN) head.
    semantic_conv_dims: int = 128
    semantic_loss_weight: float = 0.5
    # Inference and panoptic merge.
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    detections_per_img: int = 100
    mask_threshold: float = 0.5
    panoptic_score_thresh: float = 0.5
    panoptic_overlap_thresh: float = 0.5
    panoptic_min_stuff_area: int = 4096
    amp: str = "bf16"  # used on CUDA only
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes kept with checkpoints

    def __post_init__(self) -> None:
        self.mask_head_layers = tuple(int(v) for v in self.mask_head_layers)
        self.cascade_ious = tuple(float(v) for v in self.cascade_ious)
        self.cascade_box_weights = tuple(tuple(float(v) for v in w) for w in self.cascade_box_weights)
        if self.num_thing_classes < 1 or self.num_stuff_classes < 0:
            raise ValueError("need num_thing_classes >= 1 and num_stuff_classes >= 0")
        if self.num_stuff_classes + 1 >= 255:
            raise ValueError("semantic channels must stay below the void label 255")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        if not 0.0 <= self.drop_loss_iou < self.box_bg_iou_thresh:
            raise ValueError("drop_loss_iou must be in [0, box_bg_iou_thresh)")
        if not self.mask_head_layers:
            raise ValueError("mask_head_layers needs at least one layer")
        if self.roi_heads not in ROI_HEADS:
            raise ValueError(f"roi_heads must be one of {ROI_HEADS}, got {self.roi_heads!r}")
        self._check_cascade()

    def _check_cascade(self) -> None:
        ious, weights = self.cascade_ious, self.cascade_box_weights
        if not ious or len(ious) != len(weights):
            raise ValueError(
                f"cascade_ious ({len(ious)}) and cascade_box_weights ({len(weights)}) need one entry per stage"
            )
        if any(not 0.0 < v < 1.0 for v in ious):
            raise ValueError(f"cascade_ious must lie in (0, 1), got {ious}")
        if any(len(w) != 4 or min(w) <= 0 for w in weights):
            raise ValueError(f"cascade_box_weights must be positive (wx, wy, ww, wh) tuples, got {weights}")
        if self.roi_heads != "cascade":
            return
        # Detectron2's CascadeROIHeads asserts both: stage 0 matches RPN proposals with the ROI-head
        # matcher, and stages share one class-agnostic regressor shape.
        if not (self.box_fg_iou_thresh == self.box_bg_iou_thresh == ious[0]):
            raise ValueError(
                "cascade heads need box_fg_iou_thresh == box_bg_iou_thresh == cascade_ious[0], got "
                f"{self.box_fg_iou_thresh}, {self.box_bg_iou_thresh}, {ious[0]}"
            )
        if not self.class_agnostic_box_reg:
            raise ValueError("cascade heads need class_agnostic_box_reg=True (as Detectron2)")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["mask_head_layers"] = list(self.mask_head_layers)
        out["cascade_ious"] = list(self.cascade_ious)
        out["cascade_box_weights"] = [list(w) for w in self.cascade_box_weights]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {unknown}")
        return cls(**data)
