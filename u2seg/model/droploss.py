"""CutLER's DropLoss on top of torchvision's ROI heads.

Pseudo-labels miss many objects. A sampled background proposal that does not touch any pseudo box
(max IoU < drop_iou, 0.01 by default) may well be such a missed object, so its classification loss
is dropped instead of teaching the model "background". Background proposals that do overlap a
pseudo box (drop_iou <= IoU < bg threshold) stay ordinary background. As in CutLER, dropped
proposals still count in the normaliser (the loss is a mean over all sampled proposals with zero
weight on the dropped ones), so the loss scale does not jump when many proposals are dropped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_loss
from torchvision.ops import box_iou


def proposal_keep_mask(
    proposals: torch.Tensor, gt_boxes: torch.Tensor, labels: torch.Tensor, drop_iou: float
) -> torch.Tensor:
    """True for proposals whose classification loss counts: foreground, or max IoU >= drop_iou."""
    if gt_boxes.numel() == 0:
        max_iou = torch.zeros(proposals.shape[0], device=proposals.device, dtype=proposals.dtype)
    else:
        max_iou = box_iou(gt_boxes.to(proposals.dtype), proposals).max(dim=0).values
    return (labels > 0) | (max_iou >= drop_iou)


def droploss_fastrcnn_loss(
    class_logits: torch.Tensor,
    box_regression: torch.Tensor,
    labels: list[torch.Tensor],
    regression_targets: list[torch.Tensor],
    keep: list[torch.Tensor],
    *,
    beta: float = 1 / 9,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fast R-CNN losses with per-proposal classification weights (0 = dropped).

    Box regression only ever concerns foreground proposals (IoU >= fg threshold), never dropped.
    Both terms are normalised by the number of sampled proposals, as torchvision and CutLER do.
    box_regression is (N, 4 * C) per class or (N, 4) class-agnostic. beta is the smooth-L1
    transition: torchvision's 1/9 by default; 0 is Detectron2's plain L1.
    """
    labels_all = torch.cat(labels, dim=0)
    targets_all = torch.cat(regression_targets, dim=0)
    weights = torch.cat(keep, dim=0).to(torch.float32)
    denom = max(labels_all.numel(), 1)
    ce = F.cross_entropy(class_logits.float(), labels_all, reduction="none")
    loss_cls = (ce * weights).sum() / denom

    pos = torch.where(labels_all > 0)[0]
    n = class_logits.shape[0]
    deltas = box_regression.float().reshape(n, box_regression.shape[-1] // 4, 4)
    column = labels_all[pos] if deltas.shape[1] > 1 else torch.zeros_like(labels_all[pos])  # (N, 4): agnostic
    loss_box = F.smooth_l1_loss(
        deltas[pos, column], targets_all[pos].float(), beta=beta, reduction="sum"
    )
    return loss_cls, loss_box / denom


class DropLossRoIHeads(RoIHeads):
    """torchvision RoIHeads whose training losses apply DropLoss; inference is unchanged."""

    def __init__(self, *args, drop_iou: float = 0.01, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.drop_iou = float(drop_iou)

    def forward(
        self,
        features: dict[str, torch.Tensor],
        proposals: list[torch.Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, torch.Tensor]] | None = None,
    ) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        if targets is None:
            raise ValueError("targets are required in training mode")
        for t in targets:
            if not t["boxes"].is_floating_point() or t["labels"].dtype != torch.int64:
                raise TypeError("target boxes must be float and labels int64")

        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        keep = [
            proposal_keep_mask(p, t["boxes"], lab, self.drop_iou)
            for p, t, lab in zip(proposals, targets, labels, strict=True)
        ]
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        loss_cls, loss_box = droploss_fastrcnn_loss(
            class_logits, box_regression, labels, regression_targets, keep
        )
        losses = {"loss_classifier": loss_cls, "loss_box_reg": loss_box}

        if self.has_mask():
            losses["loss_mask"] = mask_training_loss(self, features, proposals, labels, matched_idxs,
                                                     image_shapes, targets)
        return [], losses


def mask_training_loss(
    heads: RoIHeads,
    features: dict[str, torch.Tensor],
    proposals: list[torch.Tensor],
    labels: list[torch.Tensor],
    matched_idxs: list[torch.Tensor],
    image_shapes: list[tuple[int, int]],
    targets: list[dict[str, torch.Tensor]],
) -> torch.Tensor:
    """Mask R-CNN mask loss on the foreground sampled proposals (labels > 0) of `heads`' mask branch."""
    mask_proposals, pos_matched_idxs = [], []
    for p, lab, idx in zip(proposals, labels, matched_idxs, strict=True):
        pos = torch.where(lab > 0)[0]
        mask_proposals.append(p[pos])
        pos_matched_idxs.append(idx[pos])
    mask_features = heads.mask_head(heads.mask_roi_pool(features, mask_proposals, image_shapes))
    mask_logits = heads.mask_predictor(mask_features)
    return maskrcnn_loss(
        mask_logits.float(),
        mask_proposals,
        [t["masks"] for t in targets],
        [t["labels"] for t in targets],
        pos_matched_idxs,
    )
