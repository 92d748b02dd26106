"""Unit tests for the Cascade R-CNN ROI heads: hand-controlled stages (fixed logits / deltas) for the
exact rules, and a tiny ResNet-18 model at 64 px for forward / backward / predict."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection._utils import BoxCoder

from u2seg.model import ModelConfig, build_model, predict
from u2seg.model.cascade import CascadeRoIHeads, cascade_drop_keep, match_stage, scale_gradient
from u2seg.model.config import CASCADE_BOX_WEIGHTS, CASCADE_IOUS
from u2seg.model.droploss import DropLossRoIHeads

pytestmark = pytest.mark.unit

K = 2  # thing classes in the hand-built heads; logits have K + 1 columns (0 = background)


class BoxPool(nn.Module):
    """Stands in for MultiScaleRoIAlign: the 'features' of a proposal are its box (N, 4) times a leaf
    tensor, so tests can read the gradient that reaches the pooled features."""

    def __init__(self) -> None:
        super().__init__()
        self.leaf = nn.Parameter(torch.ones(4))

    def forward(self, features, proposals, image_shapes):
        return torch.cat(proposals) * self.leaf


class FixedPredictor(nn.Module):
    """Same logits and deltas for every proposal; the logits carry a zero-valued term whose gradient
    w.r.t. the pooled features is 1, so a backward pass reaches the pool."""

    def __init__(self, logits: list[float], deltas: list[float]) -> None:
        super().__init__()
        self.register_buffer("logits", torch.tensor(logits))
        self.register_buffer("deltas", torch.tensor(deltas))

    def forward(self, x):
        n = x.shape[0]
        s = x.sum(dim=1, keepdim=True)
        logits = self.logits.expand(n, -1) + (s - s.detach())
        return logits, self.deltas.expand(n, -1).repeat(1, K + 1)


def fixed_heads(logits, deltas, *, drop_iou=0.0, score_thresh=0.0) -> CascadeRoIHeads:
    return CascadeRoIHeads(
        BoxPool(),
        [nn.Identity() for _ in logits],
        [FixedPredictor(lg, d) for lg, d in zip(logits, deltas, strict=True)],
        stage_ious=CASCADE_IOUS,
        stage_box_weights=CASCADE_BOX_WEIGHTS,
        batch_size_per_image=512,
        positive_fraction=0.25,
        score_thresh=score_thresh,
        nms_thresh=0.5,
        detections_per_img=100,
        drop_iou=drop_iou,
    )


GT = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
# IoU with GT: 0.55, 0.65, 0.75 (boxes [0, 0, 100, h] have IoU h / 100) and 0 (far away).
PROPOSALS = torch.tensor([[0.0, 0.0, 100.0, 55.0], [0.0, 0.0, 100.0, 65.0], [0.0, 0.0, 100.0, 75.0],
                          [150.0, 150.0, 190.0, 190.0]])
IMAGE = [(200, 200)]
ZERO_LOGITS = [[0.3, 1.1, -0.4], [0.0, 0.5, 0.2], [-0.2, 0.9, 0.1]]


def ce(logits: list[float], label: int) -> float:
    return float(F.cross_entropy(torch.tensor([logits]), torch.tensor([label])))


def train_losses(heads: CascadeRoIHeads) -> dict[str, torch.Tensor]:
    heads.train()
    target = [{"boxes": GT, "labels": torch.tensor([1])}]
    _, losses = heads({}, [PROPOSALS.clone()], IMAGE, target)
    return {k: v.detach() for k, v in losses.items()}


# ---------------------------------------------------------------- configuration / wiring


def tiny_cfg(**over) -> ModelConfig:
    base = dict(backbone="resnet18", num_thing_classes=3, num_stuff_classes=2, pyramid_channels=16,
                representation_size=32, mask_head_layers=(16,), semantic_conv_dims=8, min_size=64, max_size=64,
                rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n_test=50,
                rpn_post_nms_top_n_test=30, box_batch_size_per_image=32, panoptic_min_stuff_area=4,
                roi_heads="cascade", seed=0)
    base.update(over)
    return ModelConfig(**base)


@pytest.fixture(scope="module")
def cascade_model():
    torch.set_num_threads(1)
    return build_model(tiny_cfg())


def test_build_model_wires_three_stages_as_detectron2(cascade_model):
    heads = cascade_model.detector.roi_heads
    assert isinstance(heads, CascadeRoIHeads)
    assert heads.stage_ious == (0.5, 0.6, 0.7)
    assert [m.high_threshold for m in heads.stage_matchers] == [0.5, 0.6, 0.7]
    assert [m.low_threshold for m in heads.stage_matchers] == [0.5, 0.6, 0.7]
    assert not any(m.allow_low_quality_matches for m in heads.stage_matchers)
    assert [c.weights for c in heads.stage_coders] == [(10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0),
                                                       (30.0, 30.0, 15.0, 15.0)]
    assert len(heads.box_head) == len(heads.box_predictor) == 3
    assert len({id(h) for h in heads.box_head}) == 3  # one head per stage, not shared
    assert all(p.class_agnostic and p.bbox_pred.out_features == 4 for p in heads.box_predictor)
    assert isinstance(build_model(tiny_cfg(roi_heads="standard")).detector.roi_heads, DropLossRoIHeads)


def test_config_validates_cascade_fields():
    with pytest.raises(ValueError, match="roi_heads"):
        tiny_cfg(roi_heads="hybrid")
    with pytest.raises(ValueError, match="class_agnostic"):
        tiny_cfg(class_agnostic_box_reg=False)
    with pytest.raises(ValueError, match="one entry per stage"):
        tiny_cfg(cascade_ious=(0.5, 0.6))
    with pytest.raises(ValueError, match="cascade_ious\\[0\\]"):
        tiny_cfg(box_fg_iou_thresh=0.6, box_bg_iou_thresh=0.6)
    cfg = tiny_cfg(cascade_ious=[0.5, 0.7], cascade_box_weights=[[10, 10, 5, 5], [25, 25, 12, 12]])
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.cascade_box_weights[1] == (25.0, 25.0, 12.0, 12.0)
    legacy = {k: v for k, v in cfg.to_dict().items() if not k.startswith(("roi_heads", "cascade_"))}
    assert ModelConfig.from_dict(legacy).roi_heads == "standard"


# ---------------------------------------------------------------- exact rules with fixed stages


def test_stage_labels_follow_stage_iou_and_gt_is_appended_only_at_stage_0():
    # Zero deltas: every stage sees the same 4 proposals (+ the gt box at stage 0 only, via sampling;
    # stage k's input = stage k-1's refined boxes of those 5). Foreground counts: 0.5 -> 4 (3 + gt),
    # 0.6 -> 3, 0.7 -> 2, out of 5 each (a re-appended gt would make it 6).
    heads = fixed_heads(ZERO_LOGITS, [[0.0] * 4] * 3)
    losses = train_losses(heads)
    for k, n_fg in enumerate((4, 3, 2)):
        want = (n_fg * ce(ZERO_LOGITS[k], 1) + (5 - n_fg) * ce(ZERO_LOGITS[k], 0)) / 5
        assert float(losses[f"loss_classifier_stage{k}"]) == pytest.approx(want, rel=1e-6)
    assert set(losses) == {f"loss_{n}_stage{k}" for k in range(3) for n in ("classifier", "box_reg")}


def test_box_loss_uses_each_stage_weights_and_plain_l1():
    heads = fixed_heads(ZERO_LOGITS, [[0.0] * 4] * 3)
    losses = train_losses(heads)
    boxes = torch.cat([PROPOSALS[:3], GT])  # the stage-0 foreground (gt appended)
    for k, (w, thr) in enumerate(zip(CASCADE_BOX_WEIGHTS, CASCADE_IOUS, strict=True)):
        ious = boxes[:, 3] / 100.0
        fg = boxes[ious >= thr]
        targets = BoxCoder(w).encode_single(GT.expand(fg.shape[0], 4), fg)
        assert float(losses[f"loss_box_reg_stage{k}"]) == pytest.approx(float(targets.abs().sum()) / 5, rel=1e-5)


def test_droploss_per_stage_uses_that_stage_predicted_boxes():
    # The far proposal (IoU 0) is dropped in every stage; it still counts in the mean (/5).
    heads = fixed_heads(ZERO_LOGITS, [[0.0] * 4] * 3, drop_iou=0.01)
    losses = train_losses(heads)
    for k, n_fg in enumerate((4, 3, 2)):
        want = (n_fg * ce(ZERO_LOGITS[k], 1) + (4 - n_fg) * ce(ZERO_LOGITS[k], 0)) / 5
        assert float(losses[f"loss_classifier_stage{k}"]) == pytest.approx(want, rel=1e-6)
    # Stage 0 predicts boxes moved far from GT (dx = 10 with wx = 10: one box width): the stage-0 loss
    # keeps only proposals whose *moved* box still touches GT (the 100-wide ones shift by 100 -> IoU 0).
    heads = fixed_heads(ZERO_LOGITS, [[10.0, 0.0, 0.0, 0.0], [0.0] * 4, [0.0] * 4], drop_iou=0.01)
    loss0 = float(train_losses(heads)["loss_classifier_stage0"])
    assert loss0 == pytest.approx(0.0, abs=1e-7)


def test_cascade_drop_keep_threshold_is_strict():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    pred = torch.tensor([[0.0, 0.0, 5.0, 5.0], [0.0, 0.0, 5.0, 6.0], [20.0, 20.0, 30.0, 30.0]])  # IoU .25 .3 0
    assert cascade_drop_keep(pred, gt, 0.25).tolist() == [False, True, False]
    assert cascade_drop_keep(pred, gt, 0.0).tolist() == [True, True, True]  # 0 turns DropLoss off
    assert cascade_drop_keep(pred, torch.zeros((0, 4)), 0.25).tolist() == [True, True, True]  # no pseudo box


def test_match_stage_thresholds_and_empty_gt():
    from torchvision.models.detection._utils import Matcher

    props = torch.tensor([[0.0, 0.0, 100.0, 59.0], [0.0, 0.0, 100.0, 60.0], [0.0, 0.0, 100.0, 61.0]])
    idx, labels = match_stage(props, GT, torch.tensor([2]), Matcher(0.6, 0.6, False))
    assert labels.tolist() == [0, 2, 2] and idx.tolist() == [0, 0, 0]
    idx, labels = match_stage(props, torch.zeros((0, 4)), torch.zeros(0, dtype=torch.int64),
                              Matcher(0.6, 0.6, False))
    assert labels.tolist() == [0, 0, 0]


def test_later_stage_proposals_are_clipped_detached_and_nonempty():
    boxes = [torch.tensor([[-5.0, 10.0, 50.0, 250.0], [210.0, 0.0, 260.0, 20.0]], requires_grad=True)]
    out = CascadeRoIHeads._next_proposals(boxes, IMAGE, drop_empty=True)
    assert out[0].tolist() == [[0.0, 10.0, 50.0, 200.0]] and not out[0].requires_grad
    kept = CascadeRoIHeads._next_proposals(boxes, IMAGE, drop_empty=False)
    assert kept[0].shape == (2, 4)  # test time keeps rows aligned across stages


def test_scale_gradient_and_pooled_features_get_one_over_num_stages():
    x = torch.ones(3, requires_grad=True)
    scale_gradient(x, 0.25).sum().backward()
    assert x.grad.tolist() == [0.25] * 3

    heads = fixed_heads(ZERO_LOGITS, [[0.0] * 4] * 3)
    grads = {}
    for mode in ("train", "eval"):
        getattr(heads, mode)()
        heads.box_roi_pool.leaf.grad = None
        logits, _, _ = heads._run_stage(1, {}, [PROPOSALS.clone()], IMAGE)
        logits.sum().backward()
        grads[mode] = heads.box_roi_pool.leaf.grad.clone()
    assert float(grads["eval"].abs().sum()) > 0
    assert torch.allclose(grads["train"], grads["eval"] / 3)


def test_test_time_scores_are_the_mean_over_stages_and_boxes_come_from_the_last():
    logits = [[0.2, 1.0, -1.0], [0.0, -0.5, 0.7], [1.2, 0.1, 0.3]]
    # Stage 0 moves boxes right by 0.1 w (dx 1 at wx 10), stage 1 keeps them, stage 2 moves them right
    # by another 0.1 w (dx 3 at wx 30): the output boxes must have moved twice.
    deltas = [[1.0, 0.0, 0.0, 0.0], [0.0] * 4, [3.0, 0.0, 0.0, 0.0]]
    heads = fixed_heads(logits, deltas).eval()
    props = [torch.tensor([[10.0, 10.0, 30.0, 30.0], [100.0, 100.0, 140.0, 160.0]])]
    with torch.no_grad():
        out, losses = heads({}, props, IMAGE)
    assert losses == {}
    mean = sum(F.softmax(torch.tensor(lg), dim=0) for lg in logits) / 3
    det = out[0]
    assert det["boxes"].shape == (4, 4)  # 2 boxes x 2 classes, no overlap across boxes
    for label, score in zip(det["labels"], det["scores"], strict=True):
        assert float(score) == pytest.approx(float(mean[int(label)]), rel=1e-6)
    first = det["boxes"][(det["boxes"][:, 0] < 50)][0]
    assert first.tolist() == pytest.approx([14.0, 10.0, 34.0, 30.0], abs=1e-4)
    assert sorted(det["labels"].tolist()) == [1, 1, 2, 2]


def test_score_threshold_and_nms_in_postprocess():
    logits = [[0.0, 2.0, -2.0]] * 3
    heads = fixed_heads(logits, [[0.0] * 4] * 3, score_thresh=0.2).eval()
    props = [torch.tensor([[10.0, 10.0, 30.0, 30.0], [11.0, 10.0, 31.0, 30.0]])]  # IoU 0.9: NMS keeps one
    with torch.no_grad():
        det = heads({}, props, IMAGE)[0][0]
    assert det["labels"].tolist() == [1]  # class 2 has p ~ 0.016 < 0.2


# ---------------------------------------------------------------- the real network, tiny


def batch(n_things: int = 1):
    import numpy as np

    from u2seg.model import targets_from_labels

    img = np.zeros((64, 64, 3), np.uint8)
    img[:] = (40, 90, 160)
    seg = np.ones((64, 64), np.int32)
    info = [{"id": 1, "category_id": 4}]
    if n_things:
        img[12:44, 16:40] = (220, 50, 50)
        seg[12:44, 16:40] = 2
        info.append({"id": 2, "category_id": 2})
    s = targets_from_labels(img, seg, info, 3, k_stuff=2)
    return s["image"], {k: s[k] for k in ("boxes", "labels", "masks", "semantic")}


def test_cascade_model_trains_every_stage(cascade_model):
    torch.manual_seed(0)
    (im0, t0), (im1, t1) = batch(1), batch(0)  # second image has no thing
    cascade_model.train()
    cascade_model.zero_grad(set_to_none=True)
    losses = cascade_model([im0, im1], [t0, t1])
    stage_keys = {f"loss_{n}_stage{k}" for k in range(3) for n in ("classifier", "box_reg")}
    assert set(losses) == stage_keys | {"loss_objectness", "loss_rpn_box_reg", "loss_mask", "loss_sem_seg"}
    assert all(math.isfinite(float(v.detach())) for v in losses.values())
    sum(losses.values()).backward()
    heads = cascade_model.detector.roi_heads
    for k in range(3):
        g = heads.box_predictor[k].cls_score.weight.grad
        assert g is not None and float(g.abs().sum()) > 0, f"stage {k} classifier got no gradient"
        assert heads.box_head[k].fc6.weight.grad is not None
    assert float(cascade_model.detector.backbone.fpn.inner_blocks[0][0].weight.grad.abs().sum()) > 0


def test_cascade_model_predicts_well_formed(cascade_model):
    im, _ = batch(1)
    cascade_model.eval()
    with torch.no_grad():
        raw = cascade_model([im])[0]
    n = raw["boxes"].shape[0]
    assert raw["scores"].shape == (n,) and raw["labels"].shape == (n,) and raw["masks"].shape == (n, 1, 64, 64)
    if n:
        assert int(raw["labels"].min()) >= 1 and int(raw["labels"].max()) <= 3
        assert float(raw["scores"].max()) <= 1.0 and float(raw["scores"].min()) > cascade_model.cfg.box_score_thresh
        assert float(raw["boxes"].min()) >= 0 and float(raw["boxes"][:, 2:].max()) <= 64
    pred = predict(cascade_model, [(im.permute(1, 2, 0) * 255).to(torch.uint8).numpy()])[0]
    assert pred.masks.shape[1:] == (64, 64)
