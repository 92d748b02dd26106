"""Cascade R-CNN ROI heads (as Detectron2's CascadeROIHeads, which U2Seg and CutLER train) on torchvision.

Why a cascade: one box head trained at IoU 0.5 refines boxes only so far; later stages trained at
stricter IoUs (0.6, 0.7) on the previous stage's refined boxes get better localised masks.

Behaviour, stage by stage (each point checked against detectron2/modeling/roi_heads/cascade_rcnn.py
and CutLER's cutler/modeling/roi_heads/custom_cascade_rcnn.py):

- Stage 0 trains on RPN proposals + the ground-truth boxes, matched at cascade_ious[0] and sampled
  (batch_size_per_image, positive_fraction): torchvision's select_training_samples, which does what
  Detectron2's label_and_sample_proposals does (PROPOSAL_APPEND_GT is on by default).
- Stage k > 0 trains on stage k-1's refined boxes of *those same sampled proposals*, detached, clipped
  to the image and with empty boxes removed; they are matched at cascade_ious[k] with no sampling and
  no ground-truth boxes appended (Detectron2's _match_and_label_boxes).
- Each stage has its own box head, predictor and box coder (weights per stage, class-agnostic deltas).
- Losses are summed over stages ("loss_classifier_stage{k}", "loss_box_reg_stage{k}"); the pooled
  features' gradient is scaled by 1 / num_stages in training (Detectron2's _ScaleGradient: same as
  averaging the stage losses for the backbone while keeping full gradients for each stage's head).
  The box loss is Detectron2's: smooth L1 with beta 0 (plain L1) over foreground proposals divided
  by the number of proposals in the stage.
- DropLoss (CutLER), per stage: a proposal's classification loss is dropped when the box *that stage
  predicts* for it has max IoU <= drop_iou with the image's pseudo boxes (CutLER decodes the stage's
  deltas on the stage's proposals, then `weights = 1 - (iou_max <= thresh)`). It concerns every
  proposal, foreground too, and dropped proposals still count in the mean. Two deliberate departures,
  both where CutLER's code is an accident of implementation: CutLER takes the "gt boxes" as the first
  few rows of the per-proposal matched-gt tensor (an approximation of the image's box list) -- we use
  the image's real box list; and CutLER turns DropLoss off for the whole batch when any image has no
  pseudo box (an exception handler) -- we turn it off for that image only. drop_iou = 0 disables it.
- Masks train on stage 0's foreground sampled proposals (Detectron2 hands _forward_mask the stage-0
  proposals) and are predicted, at test time, on the final detections.
- Test time: class probabilities are the mean of the stages' softmax outputs (each stage scoring its
  own input boxes, which are the previous stage's refined boxes, kept even when empty so rows align);
  boxes are the last stage's; then Detectron2's fast_rcnn_inference: drop non-finite rows, clip, keep
  scores > score_thresh per class, per-class NMS, top detections_per_img.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection._utils import BoxCoder, Matcher
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_inference
from torchvision.ops import box_iou
from torchvision.ops import boxes as box_ops

from u2seg.model.droploss import droploss_fastrcnn_loss, mask_training_loss


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `scale` on the way back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


def scale_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x unchanged, with its gradient multiplied by scale."""
    return _ScaleGradient.apply(x, scale)


def cascade_drop_keep(
    pred_boxes: torch.Tensor, gt_boxes: torch.Tensor, drop_iou: float
) -> torch.Tensor:
    """CutLER's per-stage DropLoss rule: True where a proposal's classification loss counts.

    pred_boxes are the boxes the stage predicts for its proposals; a proposal is kept when their max
    IoU with the pseudo boxes is > drop_iou (strictly, as CutLER's `1 - (iou <= thresh)`). An image
    without pseudo boxes, or drop_iou == 0, keeps everything.
    """
    n = pred_boxes.shape[0]
    if drop_iou <= 0 or gt_boxes.numel() == 0:
        return torch.ones(n, dtype=torch.bool, device=pred_boxes.device)
    max_iou = box_iou(pred_boxes.float(), gt_boxes.float()).max(dim=1).values
    return max_iou > drop_iou


def match_stage(
    proposals: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor, matcher: Matcher
) -> tuple[torch.Tensor, torch.Tensor]:
    """Label proposals for a later cascade stage: (matched gt index (0 if none), class label (0 = bg))."""
    n = proposals.shape[0]
    if gt_boxes.numel() == 0:
        zeros = torch.zeros(n, dtype=torch.int64, device=proposals.device)
        return zeros, zeros.clone()
    matched = matcher(box_iou(gt_boxes.to(proposals.dtype), proposals))
    idx = matched.clamp(min=0)
    labels = gt_labels[idx].to(torch.int64)
    labels[matched < 0] = 0
    return idx, labels


class CascadeRoIHeads(RoIHeads):
    """Cascade R-CNN box heads + Mask R-CNN mask head, with CutLER's per-stage DropLoss.

    box_heads / box_predictors: one per stage; predictors return (logits (N, C+1), deltas) where the
    first 4 delta columns are the class-agnostic box deltas (BoxPredictor(class_agnostic=True) tiles
    them, so any column block is the same). stage_ious / stage_box_weights: one per stage.
    """

    def __init__(
        self,
        box_roi_pool: nn.Module,
        box_heads: Sequence[nn.Module],
        box_predictors: Sequence[nn.Module],
        *,
        stage_ious: Sequence[float],
        stage_box_weights: Sequence[Sequence[float]],
        batch_size_per_image: int,
        positive_fraction: float,
        score_thresh: float,
        nms_thresh: float,
        detections_per_img: int,
        mask_roi_pool: nn.Module | None = None,
        mask_head: nn.Module | None = None,
        mask_predictor: nn.Module | None = None,
        drop_iou: float = 0.01,
        smooth_l1_beta: float = 0.0,
    ) -> None:
        n = len(box_heads)
        if n < 1 or not (len(box_predictors) == len(stage_ious) == len(stage_box_weights) == n):
            raise ValueError(
                f"need one box head, predictor, IoU and box-weight tuple per stage, got {len(box_heads)}, "
                f"{len(box_predictors)}, {len(stage_ious)}, {len(stage_box_weights)}"
            )
        iou0 = float(stage_ious[0])
        super().__init__(
            box_roi_pool,
            nn.ModuleList(box_heads),
            nn.ModuleList(box_predictors),
            iou0,
            iou0,
            batch_size_per_image,
            positive_fraction,
            tuple(float(w) for w in stage_box_weights[0]),
            score_thresh,
            nms_thresh,
            detections_per_img,
            mask_roi_pool=mask_roi_pool,
            mask_head=mask_head,
            mask_predictor=mask_predictor,
        )
        self.num_stages = n
        self.stage_ious = tuple(float(v) for v in stage_ious)
        self.stage_box_weights = tuple(tuple(float(v) for v in w) for w in stage_box_weights)
        # Stage 0's coder/matcher are the base class's (used by select_training_samples).
        self.stage_coders = [self.box_coder] + [BoxCoder(w) for w in self.stage_box_weights[1:]]
        self.stage_matchers = [self.proposal_matcher] + [
            Matcher(t, t, allow_low_quality_matches=False) for t in self.stage_ious[1:]
        ]
        self.drop_iou = float(drop_iou)
        self.smooth_l1_beta = float(smooth_l1_beta)

    def _run_stage(
        self, k: int, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Stage k on proposals -> (logits fp32, agnostic deltas fp32 (N, 4), decoded boxes per image)."""
        pooled = self.box_roi_pool(features, proposals, image_shapes)
        if self.training:
            pooled = scale_gradient(pooled, 1.0 / self.num_stages)
        logits, deltas = self.box_predictor[k](self.box_head[k](pooled))
        logits, deltas = logits.float(), deltas.float()[:, :4]
        boxes = self.stage_coders[k].decode(deltas, proposals).reshape(-1, 4)
        return logits, deltas, list(boxes.split([p.shape[0] for p in proposals]))

    @staticmethod
    def _next_proposals(
        boxes: list[torch.Tensor], image_shapes: list[tuple[int, int]], drop_empty: bool
    ) -> list[torch.Tensor]:
        out = []
        for b, shape in zip(boxes, image_shapes, strict=True):
            b = box_ops.clip_boxes_to_image(b.detach(), shape)
            if drop_empty:  # training only: at test time rows must stay aligned across stages
                b = b[(b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])]
            out.append(b)
        return out

    def forward(
        self,
        features: dict[str, torch.Tensor],
        proposals: list[torch.Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, torch.Tensor]] | None = None,
    ) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        if self.training:
            return [], self._train_forward(features, proposals, image_shapes, targets)
        return self._predict(features, proposals, image_shapes), {}

    def _train_forward(
        self,
        features: dict[str, torch.Tensor],
        proposals: list[torch.Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, torch.Tensor]] | None,
    ) -> dict[str, torch.Tensor]:
        if targets is None:
            raise ValueError("targets are required in training mode")
        for t in targets:
            if not t["boxes"].is_floating_point() or t["labels"].dtype != torch.int64:
                raise TypeError("target boxes must be float and labels int64")
        gt_boxes = [t["boxes"] for t in targets]
        gt_labels = [t["labels"] for t in targets]
        props0, matched0, labels0, _ = self.select_training_samples(proposals, targets)

        losses: dict[str, torch.Tensor] = {}
        props, matched, labels = props0, matched0, labels0
        boxes: list[torch.Tensor] = []
        for k in range(self.num_stages):
            if k > 0:
                props = self._next_proposals(boxes, image_shapes, drop_empty=True)
                pairs = [match_stage(p, g, lab, self.stage_matchers[k])
                         for p, g, lab in zip(props, gt_boxes, gt_labels, strict=True)]
                matched = [m for m, _ in pairs]
                labels = [lab for _, lab in pairs]
            reg_targets = self._regression_targets(k, props, matched, gt_boxes)
            logits, deltas, boxes = self._run_stage(k, features, props, image_shapes)
            keep = [cascade_drop_keep(b.detach(), g, self.drop_iou) for b, g in zip(boxes, gt_boxes, strict=True)]
            loss_cls, loss_box = droploss_fastrcnn_loss(
                logits, deltas, labels, reg_targets, keep, beta=self.smooth_l1_beta
            )
            losses[f"loss_classifier_stage{k}"] = loss_cls
            losses[f"loss_box_reg_stage{k}"] = loss_box

        if self.has_mask():
            losses["loss_mask"] = mask_training_loss(self, features, props0, labels0, matched0, image_shapes, targets)
        return losses

    def _regression_targets(
        self, k: int, proposals: list[torch.Tensor], matched: list[torch.Tensor], gt_boxes: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        matched_boxes = []
        for p, m, g in zip(proposals, matched, gt_boxes, strict=True):
            g = g.to(p.dtype)
            if g.numel() == 0:
                g = torch.zeros((1, 4), dtype=p.dtype, device=p.device)
            matched_boxes.append(g[m])
        return list(self.stage_coders[k].encode(matched_boxes, proposals))

    def stage_outputs(
        self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor], image_shapes: list[tuple[int, int]]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Test-time cascade: (per-stage class probabilities (N, C+1), last stage's boxes per image)."""
        probs: list[torch.Tensor] = []
        boxes, props = proposals, proposals
        for k in range(self.num_stages):
            if k > 0:
                props = self._next_proposals(boxes, image_shapes, drop_empty=False)
            logits, _, boxes = self._run_stage(k, features, props, image_shapes)
            probs.append(F.softmax(logits, dim=-1))
        return probs, boxes

    def _predict(
        self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor], image_shapes: list[tuple[int, int]]
    ) -> list[dict[str, torch.Tensor]]:
        probs, boxes = self.stage_outputs(features, proposals, image_shapes)
        scores = (sum(probs) / self.num_stages).split([b.shape[0] for b in boxes])
        result = []
        for b, s, shape in zip(boxes, scores, image_shapes, strict=True):
            b, s, lab = self._postprocess(b, s, shape)
            result.append({"boxes": b, "labels": lab, "scores": s})
        if self.has_mask():
            mask_features = self.mask_head(self.mask_roi_pool(features, [r["boxes"] for r in result], image_shapes))
            mask_logits = self.mask_predictor(mask_features).float()
            for prob, r in zip(maskrcnn_inference(mask_logits, [r["labels"] for r in result]), result, strict=True):
                r["masks"] = prob
        return result

    def _postprocess(
        self, boxes: torch.Tensor, scores: torch.Tensor, image_shape: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Detectron2's fast_rcnn_inference_single_image with torchvision's background column 0."""
        valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores).all(dim=1)
        boxes, scores = boxes[valid], scores[valid, 1:]
        boxes = box_ops.clip_boxes_to_image(boxes, image_shape)
        rows, cls = torch.where(scores > self.score_thresh)
        boxes, scores, labels = boxes[rows], scores[rows, cls], cls + 1
        keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
        return boxes[keep], scores[keep], labels[keep]
