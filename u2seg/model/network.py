"""The universal segmentation network: Mask R-CNN (torchvision) + Panoptic FPN semantic head.

One backbone pass feeds the RPN, the ROI box/mask heads (with DropLoss) and the semantic head. The
ROI box heads are one Fast R-CNN head (cfg.roi_heads == "standard") or three Cascade R-CNN stages
("cascade", u2seg.model.cascade), as U2Seg's and CutLER's configs use.
Images are not resized in training (augmentation owns the training scale, as in Detectron2's data
mappers); at inference they are resized to cfg.min_size / cfg.max_size and results are mapped back.
"""

from __future__ import annotations

import logging

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from u2seg.model.backbone import build_pyramid_backbone
from u2seg.model.cascade import CascadeRoIHeads
from u2seg.model.config import ModelConfig
from u2seg.model.droploss import DropLossRoIHeads
from u2seg.model.semantic import (
    SemanticFPNHead,
    semantic_loss,
    semantic_targets_batch,
    upsample_semantic_logits,
)

log = logging.getLogger(__name__)


class AugmentedInputTransform(GeneralizedRCNNTransform):
    """Normalise + pad like torchvision, but never resize in training: the scale chosen by
    augmentation (multi-scale, large-scale jitter) must reach the network unchanged."""

    def resize(self, image, target=None):
        if self.training:
            return image, target
        return super().resize(image, target)


class BoxPredictor(nn.Module):
    """Class scores and box deltas, returned in fp32 (boxes decoded from bf16 deltas would be off by
    pixels). Class-agnostic deltas (U2Seg / CutLER) are tiled per class so torchvision's
    class-specific loss and decoding work unchanged; the tiles share one gradient."""

    def __init__(self, in_channels: int, num_classes: int, class_agnostic: bool = True) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.class_agnostic = class_agnostic
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, 4 if class_agnostic else 4 * num_classes)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.flatten(start_dim=1)
        deltas = self.bbox_pred(x).float()
        if self.class_agnostic:
            deltas = deltas.repeat(1, self.num_classes)
        return self.cls_score(x).float(), deltas


class FP32RPNHead(RPNHead):
    """torchvision's RPN head with fp32 outputs, so anchors decode to proposals in fp32 under autocast."""

    def forward(self, x: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        logits, deltas = super().forward(x)
        return [t.float() for t in logits], [t.float() for t in deltas]


class U2SegModel(nn.Module):
    """forward(images, targets) -> weighted losses (train) or per-image raw outputs (eval).

    images: list of float (3, H, W) tensors in [0, 1]. targets: list of dicts with boxes (N, 4)
    xyxy float, labels (N,) int64 in 1..K_things, masks (N, H, W) uint8, semantic (H, W) int64.
    Eval outputs: boxes, labels (1..K), scores, masks (N, 1, H, W) probabilities, sem_logits
    (K_stuff + 1, H, W), all at the original image size.
    """

    def __init__(self, cfg: ModelConfig, detector: MaskRCNN, semantic_head: SemanticFPNHead) -> None:
        super().__init__()
        self.cfg = cfg
        self.detector = detector
        self.semantic_head = semantic_head

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(
        self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None
    ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        det = self.detector
        if self.training and targets is None:
            raise ValueError("targets are required in training mode")
        original_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        det_targets = None
        if targets is not None:
            det_targets = [{k: t[k] for k in ("boxes", "labels", "masks")} for t in targets]
            _check_boxes(det_targets)
        image_list, det_targets = det.transform(images, det_targets)
        features = det.backbone(image_list.tensors)
        proposals, rpn_losses = det.rpn(image_list, features, det_targets)
        detections, roi_losses = det.roi_heads(features, proposals, image_list.image_sizes, det_targets)
        sem_logits = self.semantic_head(features)

        if self.training:
            sem_target = semantic_targets_batch(
                [t["semantic"] for t in targets], image_list.image_sizes, tuple(image_list.tensors.shape[-2:])
            )
            losses = {**rpn_losses, **roi_losses}
            losses["loss_sem_seg"] = semantic_loss(sem_logits, sem_target) * self.cfg.semantic_loss_weight
            return losses

        detections = det.transform.postprocess(detections, image_list.image_sizes, original_sizes)
        stride = self.semantic_head.common_stride
        for i, d in enumerate(detections):
            d["sem_logits"] = upsample_semantic_logits(
                sem_logits[i], image_list.image_sizes[i], original_sizes[i], stride
            )
        return detections


def _check_boxes(targets: list[dict[str, torch.Tensor]]) -> None:
    for t in targets:
        b = t["boxes"]
        if b.numel() and bool((b[:, 2:] <= b[:, :2]).any()):
            raise ValueError("targets contain boxes with non-positive width or height")
        if t["masks"].shape[0] != b.shape[0] or t["labels"].shape[0] != b.shape[0]:
            raise ValueError("boxes, labels and masks must have the same length")


def build_model(cfg: ModelConfig, *, storage_options: dict | None = None) -> U2SegModel:
    """Build the network deterministically from cfg.seed without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        backbone = build_pyramid_backbone(cfg, storage_options)
        ch = backbone.out_channels
        num_classes = cfg.num_thing_classes + 1  # + torchvision's background class 0
        layers = cfg.mask_head_layers
        detector = MaskRCNN(
            backbone,
            num_classes=None,
            min_size=cfg.min_size,
            max_size=cfg.max_size,
            image_mean=list(IMAGENET_DEFAULT_MEAN),
            image_std=list(IMAGENET_DEFAULT_STD),
            rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
            rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
            rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
            rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
            rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
            rpn_nms_thresh=cfg.rpn_nms_thresh,
            box_head=TwoMLPHead(ch * 7 * 7, cfg.representation_size),
            rpn_head=FP32RPNHead(ch, 3),  # 3 aspect ratios per location (torchvision's default anchors)
            box_predictor=BoxPredictor(cfg.representation_size, num_classes, cfg.class_agnostic_box_reg),
            mask_head=MaskRCNNHeads(ch, list(layers), 1),
            mask_predictor=MaskRCNNPredictor(layers[-1], layers[-1], num_classes),
        )
        old = detector.roi_heads
        if cfg.roi_heads == "cascade":
            detector.roi_heads = _cascade_heads(cfg, old, ch, num_classes)
        else:
            detector.roi_heads = DropLossRoIHeads(
                old.box_roi_pool,
                old.box_head,
                old.box_predictor,
                cfg.box_fg_iou_thresh,
                cfg.box_bg_iou_thresh,
                cfg.box_batch_size_per_image,
                cfg.box_positive_fraction,
                None,
                cfg.box_score_thresh,
                cfg.box_nms_thresh,
                cfg.detections_per_img,
                mask_roi_pool=old.mask_roi_pool,
                mask_head=old.mask_head,
                mask_predictor=old.mask_predictor,
                drop_iou=cfg.drop_loss_iou,
            )
        detector.transform = AugmentedInputTransform(
            cfg.min_size, cfg.max_size, list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD)
        )
        semantic_head = SemanticFPNHead(ch, cfg.num_stuff_classes + 1, cfg.semantic_conv_dims)
    model = U2SegModel(cfg, detector, semantic_head)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log.info(
        "built U2Seg model on %s: %.1fM params (%.1fM trainable)", cfg.backbone, n_all / 1e6, n_train / 1e6
    )
    return model


def _cascade_heads(cfg: ModelConfig, old: nn.Module, ch: int, num_classes: int) -> CascadeRoIHeads:
    """Cascade ROI heads reusing the standard heads' poolers and mask branch; stage 0 keeps the box
    head / predictor MaskRCNN built, later stages get fresh ones (Detectron2 builds one per stage)."""
    heads = [old.box_head] + [TwoMLPHead(ch * 7 * 7, cfg.representation_size) for _ in cfg.cascade_ious[1:]]
    predictors = [old.box_predictor] + [
        BoxPredictor(cfg.representation_size, num_classes, class_agnostic=True) for _ in cfg.cascade_ious[1:]
    ]
    return CascadeRoIHeads(
        old.box_roi_pool,
        heads,
        predictors,
        stage_ious=cfg.cascade_ious,
        stage_box_weights=cfg.cascade_box_weights,
        batch_size_per_image=cfg.box_batch_size_per_image,
        positive_fraction=cfg.box_positive_fraction,
        score_thresh=cfg.box_score_thresh,
        nms_thresh=cfg.box_nms_thresh,
        detections_per_img=cfg.detections_per_img,
        mask_roi_pool=old.mask_roi_pool,
        mask_head=old.mask_head,
        mask_predictor=old.mask_predictor,
        drop_iou=cfg.drop_loss_iou,
    )
