"""Unit tests for u2seg.model: tiny images, ViT-S/8 random init, tiny heads, CPU only."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from u2seg.labels.panoptic import validate_panoptic
from u2seg.model import (
    AugmentConfig,
    ModelConfig,
    augment_batch,
    boxes_from_masks,
    build_model,
    copy_paste,
    copy_paste_batch,
    hflip,
    load_model,
    predict,
    save_model,
    scale_jitter,
    targets_from_labels,
    train_step,
)
from u2seg.model.droploss import DropLossRoIHeads, droploss_fastrcnn_loss, proposal_keep_mask
from u2seg.model.semantic import VOID, semantic_loss, semantic_targets_batch
from u2seg.model.train import autocast_context

pytestmark = pytest.mark.unit

K_THINGS, K_STUFF = 3, 2


def tiny_cfg(**over) -> ModelConfig:
    base = dict(
        backbone="vit_small_patch8_224.dino",
        num_thing_classes=K_THINGS,
        num_stuff_classes=K_STUFF,
        pyramid_channels=32,
        representation_size=64,
        mask_head_layers=(32,),
        semantic_conv_dims=16,
        min_size=96,
        max_size=128,
        rpn_pre_nms_top_n_train=200,
        rpn_post_nms_top_n_train=100,
        rpn_pre_nms_top_n_test=100,
        rpn_post_nms_top_n_test=50,
        box_batch_size_per_image=64,
        panoptic_min_stuff_area=16,
        seed=0,
    )
    base.update(over)
    return ModelConfig(**base)


def scene(
    h: int = 96, w: int = 96, *, square: tuple[int, int, int] | None = (24, 24, 40), thing_cat: int = 1
):
    """Sky (stuff 0) over grass (stuff 1) with one red square thing: image, seg ids, segments_info."""
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = (40, 90, 160)
    seg = np.ones((h, w), np.int32)
    img[h // 2 :] = (60, 140, 60)
    seg[h // 2 :] = 2
    info = [{"id": 1, "category_id": K_THINGS + 1}, {"id": 2, "category_id": K_THINGS + 2}]
    if square is not None:
        y, x, s = square
        img[y : y + s, x : x + s] = (220, 50, 50)
        seg[y : y + s, x : x + s] = 3
        info.append({"id": 3, "category_id": thing_cat})
    return img, seg, info


def sample(**kw) -> dict[str, torch.Tensor]:
    return targets_from_labels(*scene(**kw), K_THINGS, k_stuff=K_STUFF)


@pytest.fixture(scope="module")
def vit_model():
    torch.set_num_threads(1)
    return build_model(tiny_cfg())


def assert_consistent(s: dict[str, torch.Tensor]) -> None:
    n, (h, w) = s["masks"].shape[0], s["image"].shape[-2:]
    assert s["masks"].shape == (n, h, w) and s["labels"].shape == (n,) and s["boxes"].shape == (n, 4)
    assert s["semantic"].shape == (h, w)
    assert torch.equal(s["boxes"], boxes_from_masks(s["masks"]))
    if n:
        assert bool(s["masks"].flatten(1).any(dim=1).all()), "empty instance mask kept"
        assert bool((s["semantic"][s["masks"].any(dim=0).bool()] == 0).all()), "thing pixels not 'thing'"


# ---------------------------------------------------------------- targets


def test_targets_from_labels_conventions():
    img, seg, info = scene()
    seg[0, :5] = 0  # void pixels
    seg[90:, :4] = 9
    info.append({"id": 9, "category_id": 2, "iscrowd": 1})
    s = targets_from_labels(img, seg, info, K_THINGS, k_stuff=K_STUFF)
    assert s["image"].dtype == torch.float32 and s["image"].shape == (3, 96, 96)
    assert float(s["image"].max()) <= 1.0
    assert s["labels"].tolist() == [1]
    assert s["boxes"].tolist() == [[24.0, 24.0, 64.0, 64.0]]
    sem = s["semantic"]
    assert int(sem[10, 80]) == 1 and int(sem[80, 80]) == 2  # stuff s -> channel 1 + s
    assert int(sem[30, 30]) == 0  # thing channel
    assert int(sem[0, 0]) == VOID and int(sem[92, 1]) == VOID  # void and crowd
    assert_consistent(s)
    with pytest.raises(ValueError):
        targets_from_labels(
            img, seg, [{"id": 1, "category_id": K_THINGS + K_STUFF + 1}], K_THINGS, k_stuff=K_STUFF
        )


def test_boxes_from_masks_single_pixel_and_empty():
    m = torch.zeros((2, 5, 6), dtype=torch.uint8)
    m[0, 2, 3] = 1
    assert boxes_from_masks(m).tolist() == [[3.0, 2.0, 4.0, 3.0], [0.0, 0.0, 0.0, 0.0]]


# ---------------------------------------------------------------- model forward / training


def test_train_forward_losses_finite_with_empty_image(vit_model):
    torch.manual_seed(0)
    batch = [sample(), sample(square=None, h=64, w=96)]  # second image has no thing at all
    images = [b["image"] for b in batch]
    targets = [{k: b[k] for k in ("boxes", "labels", "masks", "semantic")} for b in batch]
    vit_model.train()
    losses = vit_model(images, targets)
    expected = {
        "loss_objectness",
        "loss_rpn_box_reg",
        "loss_classifier",
        "loss_box_reg",
        "loss_mask",
        "loss_sem_seg",
    }
    assert set(losses) == expected
    assert all(math.isfinite(float(v.detach())) for v in losses.values())
    assert float(losses["loss_sem_seg"].detach()) > 0
    sum(losses.values()).backward()
    grads = [p.grad for p in vit_model.semantic_head.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    vit_model.zero_grad(set_to_none=True)


def test_train_steps_reduce_loss():
    torch.set_num_threads(1)
    model = build_model(tiny_cfg(freeze_backbone_blocks=-1))
    assert not any(p.requires_grad for p in model.detector.backbone.vit.parameters())
    batch = [sample()]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def fixed_loss() -> float:  # same proposal sampling each time: seed the global RNG
        torch.manual_seed(123)
        model.train()
        with torch.no_grad():
            losses = model(
                [batch[0]["image"]], [{k: batch[0][k] for k in ("boxes", "labels", "masks", "semantic")}]
            )
        return float(sum(losses.values()))

    before = fixed_loss()
    torch.manual_seed(0)
    history = [train_step(model, opt, batch)["loss_total"] for _ in range(12)]
    after = fixed_loss()
    assert all(math.isfinite(v) for v in history)
    print(f"loss before {before:.3f} after {after:.3f}; steps {[round(v, 3) for v in history]}")
    assert after < 0.8 * before, (before, after, history)


def test_train_step_reports_every_loss_and_total(vit_model):
    opt = torch.optim.SGD([p for p in vit_model.parameters() if p.requires_grad], lr=0.0)
    torch.manual_seed(0)
    out = train_step(vit_model, opt, [sample()], max_grad_norm=1.0)
    assert "loss_total" in out and "loss_sem_seg" in out
    parts = sum(v for k, v in out.items() if k != "loss_total")
    assert out["loss_total"] == pytest.approx(parts, rel=1e-5)


def test_cpu_bf16_autocast_path_gives_finite_losses(vit_model):
    vit_model.train()
    s = sample()
    torch.manual_seed(0)
    with autocast_context("cpu", "bf16", allow_cpu=True):
        losses = vit_model([s["image"]], [{k: s[k] for k in ("boxes", "labels", "masks", "semantic")}])
    assert all(v.dtype == torch.float32 and math.isfinite(float(v.detach())) for v in losses.values())
    assert isinstance(autocast_context("cpu", "bf16"), type(autocast_context("cpu", "none")))


def test_heads_return_fp32_under_autocast(vit_model):
    det = vit_model.detector
    feats = [torch.randn(1, vit_model.cfg.pyramid_channels, 8, 8)]
    with autocast_context("cpu", "bf16", allow_cpu=True):
        logits, deltas = det.rpn.head(feats)
        scores, box_deltas = det.roi_heads.box_predictor(torch.randn(2, vit_model.cfg.representation_size))
    assert all(t.dtype == torch.float32 for t in [*logits, *deltas, scores, box_deltas])


def test_resnet_fpn_backbone_trains():
    torch.set_num_threads(1)
    model = build_model(tiny_cfg(backbone="resnet18", freeze_backbone_blocks=1))
    body = model.detector.backbone.body
    assert not any(p.requires_grad for p in body.layer1.parameters())
    assert all(p.requires_grad for p in body.layer2.parameters())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    torch.manual_seed(0)
    out = train_step(model, opt, [sample(h=64, w=64, square=(16, 16, 32))])
    assert all(math.isfinite(v) for v in out.values())


def test_vit_weights_come_from_features_loader(tmp_path):
    import timm

    torch.manual_seed(7)
    src = timm.create_model("vit_small_patch8_224.dino", pretrained=False, num_classes=0, img_size=96)
    path = tmp_path / "vit.pt"
    torch.save(src.state_dict(), path)
    model = build_model(tiny_cfg(weights=str(path), image_size=96, freeze_backbone_blocks=2))
    vit = model.detector.backbone.vit
    assert torch.equal(vit.blocks[5].mlp.fc1.weight, src.blocks[5].mlp.fc1.weight)
    assert torch.equal(vit.pos_embed, src.pos_embed)
    assert not vit.blocks[1].attn.qkv.weight.requires_grad and vit.blocks[2].attn.qkv.weight.requires_grad
    assert not vit.patch_embed.proj.weight.requires_grad


def test_class_agnostic_box_predictor_tiles_one_regressor(vit_model):
    pred = vit_model.detector.roi_heads.box_predictor
    scores, deltas = pred(torch.randn(5, vit_model.cfg.representation_size))
    assert scores.shape == (5, K_THINGS + 1) and deltas.shape == (5, 4 * (K_THINGS + 1))
    tiles = deltas.reshape(5, K_THINGS + 1, 4)
    assert torch.equal(tiles[:, 0], tiles[:, K_THINGS])


# ---------------------------------------------------------------- prediction


def test_predict_well_formed(vit_model):
    vit_model.cfg.panoptic_score_thresh = 0.0  # random weights: let every detection reach the merge
    try:
        img_a = scene(96, 128)[0]
        img_b = torch.from_numpy(scene(80, 64, square=(10, 10, 30))[0]).permute(2, 0, 1)  # uint8 CHW
        preds = predict(vit_model, [img_a, img_b])
    finally:
        vit_model.cfg.panoptic_score_thresh = 0.5
    assert not vit_model.training
    for p, (h, w) in zip(preds, [(96, 128), (80, 64)], strict=True):
        n = p.boxes.shape[0]
        assert p.boxes.shape == (n, 4) and p.scores.shape == (n,) and p.classes.shape == (n,)
        assert p.masks.shape == (n, h, w) and p.masks.dtype == bool
        assert ((p.classes >= 0) & (p.classes < K_THINGS)).all()
        assert ((p.boxes[:, 0] >= 0) & (p.boxes[:, 2] <= w) & (p.boxes[:, 3] <= h)).all()
        assert p.semantic.shape == (h, w) and p.semantic.dtype == np.int32
        assert ((p.semantic >= -1) & (p.semantic < K_STUFF)).all()
        assert p.panoptic.shape == (h, w) and p.panoptic.dtype == np.int32
        assert validate_panoptic(p.panoptic, p.segments_info) == []
        for seg in p.segments_info:
            assert 1 <= seg["category_id"] <= K_THINGS + K_STUFF
            assert seg["isthing"] == (seg["category_id"] <= K_THINGS)
            assert ("score" in seg) == seg["isthing"]
    assert any(p.boxes.shape[0] > 0 for p in preds)
    assert any(s["isthing"] for p in preds for s in p.segments_info)


def test_checkpoint_round_trip(vit_model, tmp_path):
    uri = str(tmp_path / "ck" / "model.pt")
    save_model(vit_model, uri, extra={"round": 1})
    loaded, extra = load_model(uri)
    assert extra == {"round": 1}
    assert dataclasses.replace(loaded.cfg, weights="none") == dataclasses.replace(
        vit_model.cfg, weights="none"
    )
    a, b = vit_model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    img = scene()[0]
    pa, pb = predict(vit_model, [img])[0], predict(loaded, [img])[0]
    np.testing.assert_allclose(pa.scores, pb.scores, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- DropLoss


def _tiny_roi_heads(drop_iou: float) -> DropLossRoIHeads:
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    torch.manual_seed(0)
    return DropLossRoIHeads(
        MultiScaleRoIAlign(["0"], 7, 2),
        TwoMLPHead(4 * 7 * 7, 16),
        FastRCNNPredictor(16, K_THINGS + 1),
        0.5,
        0.5,
        512,
        0.25,
        None,
        0.05,
        0.5,
        100,
        drop_iou=drop_iou,
    ).train()


def _roi_logit_grads(drop_iou: float, proposals: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-proposal gradient of the ROI classification loss w.r.t. its class logits."""
    heads = _tiny_roi_heads(drop_iou)
    captured = {}
    original = heads.box_predictor.forward

    def capture(x):
        scores, deltas = original(x)
        scores.retain_grad()
        captured["scores"] = scores
        return scores, deltas

    heads.box_predictor.forward = capture
    feats = {"0": torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(1))}
    target = {
        "boxes": gt,
        "labels": torch.tensor([2]),
        "masks": torch.zeros((1, 128, 128), dtype=torch.uint8),
    }
    _, losses = heads(feats, [proposals], [(128, 128)], [target])
    losses["loss_classifier"].backward()
    # All proposals are sampled (batch 512 > count) and kept in input order; the GT box is appended.
    return captured["scores"].grad.abs().sum(dim=1), losses["loss_classifier"]


def test_droploss_ignores_only_untouched_background():
    gt = torch.tensor([[10.0, 10.0, 40.0, 40.0]])
    far = torch.tensor([[80.0, 80.0, 110.0, 110.0]])  # IoU 0 -> dropped
    near = torch.tensor([[25.0, 25.0, 55.0, 55.0]])  # IoU ~0.14 -> real background
    barely = torch.tensor([[38.0, 38.0, 68.0, 68.0]])  # IoU 4/1796 ~ 0.002 < 0.01 -> dropped
    props = torch.cat([far, near, barely])

    keep = proposal_keep_mask(torch.cat([props, gt]), gt, torch.tensor([0, 0, 0, 2]), 0.01)
    assert keep.tolist() == [False, True, False, True]

    grads, loss = _roi_logit_grads(0.01, props, gt)
    assert grads.shape == (4,)
    assert float(grads[0]) == 0.0 and float(grads[2]) == 0.0  # no loss from proposals that miss every box
    assert float(grads[1]) > 0 and float(grads[3]) > 0  # background near a box and the positive still count
    plain, plain_loss = _roi_logit_grads(0.0, props, gt)
    assert (plain > 0).all()  # without DropLoss the far proposals are punished as background
    assert float(loss.detach()) < float(plain_loss.detach())


def test_droploss_loss_matches_manual_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, generator=g)
    deltas = torch.randn(5, 16, generator=g)
    labels = [torch.tensor([2, 0, 0]), torch.tensor([0, 1])]
    reg = [torch.randn(3, 4, generator=g), torch.randn(2, 4, generator=g)]
    keep = [torch.tensor([True, False, True]), torch.tensor([False, True])]
    cls, box = droploss_fastrcnn_loss(logits, deltas, labels, reg, keep)
    ce = torch.nn.functional.cross_entropy(logits, torch.tensor([2, 0, 0, 0, 1]), reduction="none")
    assert float(cls) == pytest.approx(float((ce[0] + ce[2] + ce[4]) / 5))
    d = deltas.reshape(5, 4, 4)
    r = torch.cat(reg)
    sl1 = torch.nn.functional.smooth_l1_loss
    manual = (
        sl1(d[0, 2], r[0], beta=1 / 9, reduction="sum") + sl1(d[4, 1], r[4], beta=1 / 9, reduction="sum")
    ) / 5
    assert float(box) == pytest.approx(float(manual))


# ---------------------------------------------------------------- semantic head helpers


def test_semantic_targets_padding_and_all_void_loss():
    sem = torch.tensor([[0, 1], [2, VOID]])
    out = semantic_targets_batch([sem], [(4, 4)], (8, 8))
    assert out.shape == (1, 8, 8)
    assert int(out[0, 0, 0]) == 0 and int(out[0, 3, 3]) == VOID and bool((out[0, 4:] == VOID).all())
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    zero = semantic_loss(logits, torch.full((1, 8, 8), VOID))
    assert float(zero) == 0.0
    zero.backward()


# ---------------------------------------------------------------- augmentation


def _two_samples():
    a = sample()
    b = targets_from_labels(*scene(square=(50, 8, 30), thing_cat=3), K_THINGS, k_stuff=K_STUFF)
    b["image"][:, 50:80, 8:38] = torch.tensor([0.1, 0.2, 0.9])[:, None, None]  # a distinct colour
    return a, b


def test_copy_paste_keeps_masks_boxes_consistent():
    dst, src = _two_samples()
    out = copy_paste(dst, src, generator=torch.Generator().manual_seed(3), scale_range=(1.0, 1.0))
    assert_consistent(out)
    assert out["labels"].tolist()[-1] == 3  # the pasted object with its pseudo class
    pasted = out["masks"][-1].bool()
    assert int(pasted.sum()) == 30 * 30  # same-size images, scale 1: pasted unchanged
    colour = out["image"][:, pasted]
    assert torch.allclose(colour, torch.tensor([0.1, 0.2, 0.9])[:, None].expand_as(colour))
    if out["labels"].shape[0] == 2:  # the original square survived: it lost exactly the pasted pixels
        assert not bool((out["masks"][0].bool() & pasted).any())
        assert int(out["masks"][0].sum()) == 40 * 40 - int((dst["masks"][0].bool() & pasted).sum())
    assert int((out["masks"].sum(dim=0) > 1).sum()) == 0  # disjoint inputs stay disjoint
    assert torch.equal(dst["image"], _two_samples()[0]["image"])  # input untouched


def test_copy_paste_occlusion_removes_hidden_instance():
    dst = sample(square=(40, 40, 10))
    src = sample(square=(30, 30, 30), thing_cat=2)
    g = torch.Generator().manual_seed(0)
    outs = [copy_paste(dst, src, generator=g, scale_range=(1.0, 1.0)) for _ in range(20)]
    for o in outs:
        assert_consistent(o)
    # a 30x30 paste lands somewhere in 96x96; whenever it covers the 10x10 square it must be gone
    covered = [o for o in outs if o["labels"].tolist() == [2]]
    assert covered, "no paste covered the small square in 20 draws"


def test_copy_paste_batch_scaled_and_augment_batch():
    a, b = _two_samples()
    g = torch.Generator().manual_seed(0)
    out = copy_paste_batch([a, b], generator=g, prob=1.0, scale_range=(0.3, 0.8))
    assert len(out) == 2
    for o in out:
        assert_consistent(o)
    cfg = AugmentConfig(short_sizes=(64, 80), max_size=100, copy_paste_prob=1.0)
    out = augment_batch([a, b], cfg, torch.Generator().manual_seed(1))
    for o in out:
        assert_consistent(o)
        assert min(o["image"].shape[-2:]) in (64, 80)
    again = augment_batch([a, b], cfg, torch.Generator().manual_seed(1))
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(out, again, strict=True))


def test_hflip_and_scale_jitter_consistent():
    s = sample(h=64, w=96, square=(10, 20, 30))
    f = hflip(s)
    assert_consistent(f)
    assert f["boxes"].tolist() == [[96 - 50.0, 10.0, 96 - 20.0, 40.0]]
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        j = scale_jitter(s, output_size=80, min_scale=0.5, max_scale=2.0, generator=g)
        assert_consistent(j)
        assert max(j["image"].shape[-2:]) <= 80
