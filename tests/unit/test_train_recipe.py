"""The training recipe in the train stage: its knobs, the optimizer/schedule/clip wiring, resume, CNN weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from u2seg.config import ConfigError, load_config
from u2seg.model import U2SEG_SOLVER, ModelConfig, build_model, lr_at, model_from_bytes, model_to_bytes, predict
from u2seg.model.targets import targets_from_labels
from u2seg.model.train import train_step
from u2seg.pipeline.train import (
    make_lr_scheduler,
    make_model,
    make_optimizer,
    model_config,
    optimize_step,
    scheduled_lr,
)

pytestmark = pytest.mark.unit

K_THINGS, K_STUFF = 3, 2


# ---------------------------------------------------------------- knobs


@pytest.mark.parametrize(("override", "allowed"), [
    ("train.optimizer=rmsprop", "one of 'sgd', 'adamw'"),
    ("train.momentum=1.0", "[0, 1)"),
    ("train.warmup_steps=-1", ">= 0"),
    ("train.warmup_factor=1.5", "[0, 1]"),
    ("train.lr_steps=[300,200]", "strictly ascending"),
    ("train.lr_steps=[0,200]", "strictly ascending"),
    ("train.lr_steps=[200,200]", "strictly ascending"),
    ("train.lr_gamma=0", "> 0"),
    ("train.clip=value", "one of 'global', 'per_param'"),
    ("train.clip_norm=0", "> 0"),
    ("train.amp=fp8", "one of 'bf16', 'fp16', 'none'"),
    ("train.roi_heads=retina", "one of 'standard', 'cascade'"),
    ("train.semantic_loss_weight=-0.5", ">= 0"),
    ("train.drop_loss_iou=0.5", "[0, 0.5)"),
    ("train.selftrain_iou=1.5", "[0, 1]"),
    ("train.selftrain_stuff=both", "one of 'labels', 'model'"),
    ("train.dedup_iou=0.5", "a known key of train"),  # replaced by train.selftrain_iou
])
def test_bad_recipe_knobs_are_named(override: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert err.value.key == override.split("=")[0]
    assert allowed in str(err.value)


def test_lr_steps_must_fall_inside_the_run() -> None:
    assert load_config(None, ["train.steps=10", "train.lr_steps=[3,9]"]).train.lr_steps == [3, 9]
    with pytest.raises(ConfigError, match=r"train.lr_steps=\[3, 10\].*below train.steps \(10\); \[10\]"):
        load_config(None, ["train.steps=10", "train.lr_steps=[3,10]"])


def test_defaults_keep_the_small_run_recipe() -> None:
    t = load_config(None).train
    assert (t.optimizer, t.warmup_steps, t.lr_steps, t.clip, t.clip_norm, t.roi_heads) == \
        ("adamw", 0, [], "global", 1.0, "standard")
    assert (t.semantic_loss_weight, t.score_threshold, t.selftrain_iou, t.selftrain_stuff) == (0.5, 0.7, 0.5, "labels")
    assert all(scheduled_lr(t, s) == t.lr for s in (0, 1, 500, 999))  # a constant lr, as before


def test_coco_config_is_u2segs_recipe_at_a_global_batch_of_16() -> None:
    t = load_config("coco").train
    s = U2SEG_SOLVER
    assert t.num_workers * t.batch_size == s["images_per_batch"] == 16
    assert (t.optimizer, t.lr, t.momentum, t.weight_decay) == (s["name"], s["lr"], s["momentum"], s["weight_decay"])
    assert (t.warmup_steps, t.warmup_factor, tuple(t.lr_steps), t.lr_gamma, t.steps) == \
        (s["warmup_steps"], s["warmup_factor"], s["lr_steps"], s["gamma"], s["max_steps"])
    assert (t.clip, t.clip_norm) == ("per_param", s["clip_norm_per_param"])
    assert (t.roi_heads, t.semantic_loss_weight, t.backbone, t.drop_loss_iou) == ("cascade", 0.5, "resnet50", 0.0)
    assert scheduled_lr(t, 0) == pytest.approx(1e-5) and scheduled_lr(t, 1000) == 0.01
    assert scheduled_lr(t, 210000) == pytest.approx(2e-4) and scheduled_lr(t, 269999) == pytest.approx(4e-6)
    imagenet = load_config("imagenet").train
    assert imagenet.num_workers * imagenet.batch_size == 16


def test_model_config_carries_the_recipe() -> None:
    cfg = load_config(None, ["train.roi_heads=cascade", "train.semantic_loss_weight=0.25", "train.amp=fp16",
                             "train.drop_loss_iou=0"])
    m = model_config(cfg, K_THINGS, K_STUFF)
    assert (m.roi_heads, m.semantic_loss_weight, m.amp, m.drop_loss_iou) == ("cascade", 0.25, "fp16", 0.0)
    assert (m.num_thing_classes, m.num_stuff_classes) == (K_THINGS, K_STUFF)
    assert (m.box_batch_size_per_image, m.pyramid_channels, m.representation_size, m.mask_head_layers) == (
        512, 256, 1024, (256, 256, 256, 256))  # Detectron2's head sizes unless asked otherwise
    small = model_config(load_config(None, ["train.roi_batch_size=64", "train.fpn_channels=96",
                                            "train.box_head_dim=128", "train.mask_head_convs=2"]), K_THINGS, K_STUFF)
    assert (small.box_batch_size_per_image, small.pyramid_channels, small.representation_size,
            small.mask_head_layers) == (64, 96, 128, (96, 96))


def test_predict_paints_things_at_the_configured_score(tmp_path) -> None:
    """predict.panoptic_score_threshold replaces the checkpoint's combine threshold (a briefly trained model's
    detections score below Panoptic FPN's 0.5 and would never reach the panoptic)."""
    from u2seg.io import RunRoot
    from u2seg.pipeline.predict import PredictActor

    small = ModelConfig(backbone="resnet18", num_thing_classes=K_THINGS, num_stuff_classes=K_STUFF,
                        pyramid_channels=16, representation_size=32, mask_head_layers=(16,), semantic_conv_dims=8)
    root = RunRoot(str(tmp_path))
    root.write_bytes("train/round-0/model.pt", model_to_bytes(build_model(small)))
    cfg = load_config(None, ["predict.panoptic_score_threshold=0.3"])
    actor = PredictActor(root, "train/round-0/model.pt", "predict", cfg.to_dict())
    assert actor.model.cfg.panoptic_score_thresh == 0.3
    assert load_config(None, []).predict.panoptic_score_threshold == small.panoptic_score_thresh == 0.5


# ---------------------------------------------------------------- clipping


class _TwoParams(nn.Module):
    """loss = 3 a + 4 b: gradients 3 and 4, global norm 5."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
        self.cfg = ModelConfig(num_thing_classes=1, num_stuff_classes=1, amp="none")

    @property
    def device(self) -> torch.device:
        return self.a.device

    def forward(self, images, targets):
        return {"loss": 3 * self.a.sum() + 4 * self.b.sum()}


_FAKE_SAMPLE = {"image": torch.zeros(3, 2, 2), **{k: torch.zeros(0) for k in ("boxes", "labels", "masks", "semantic")}}


@pytest.mark.parametrize(("clip", "norm", "want"), [
    ("global", 1.0, (-0.6, -0.8)),     # both scaled by 1/5
    ("per_param", 1.0, (-1.0, -1.0)),  # each clipped to norm 1 on its own
    ("per_param", 10.0, (-3.0, -4.0)),  # below the limit: untouched
    (None, None, (-3.0, -4.0)),
])
def test_train_step_clips_globally_or_per_parameter(clip, norm, want) -> None:
    model = _TwoParams()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    kwargs = {} if clip is None else {"clip": clip}
    train_step(model, opt, [_FAKE_SAMPLE], max_grad_norm=norm, **kwargs)
    assert (float(model.a.detach()), float(model.b.detach())) == pytest.approx(want)
    with pytest.raises(ValueError, match="clip must be one of"):
        train_step(model, opt, [_FAKE_SAMPLE], max_grad_norm=1.0, clip="value")


# ---------------------------------------------------------------- schedule wiring and resume


def _scene(h: int = 64, w: int = 64):
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = (40, 90, 160)
    seg = np.ones((h, w), np.int32)
    img[h // 2:], seg[h // 2:] = (60, 140, 60), 2
    img[16:40, 16:40], seg[16:40, 16:40] = (220, 50, 50), 3
    return img, seg, [{"id": 1, "category_id": K_THINGS + 1}, {"id": 2, "category_id": K_THINGS + 2},
                      {"id": 3, "category_id": 1}]


def _tiny_model(**over) -> nn.Module:
    cfg = dict(backbone="resnet18", num_thing_classes=K_THINGS, num_stuff_classes=K_STUFF, pyramid_channels=16,
               representation_size=32, mask_head_layers=(16,), semantic_conv_dims=8, min_size=64, max_size=64,
               rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50, box_batch_size_per_image=32,
               amp="none", seed=0)
    cfg.update(over)
    return build_model(ModelConfig(**cfg))


RECIPE = ["train.optimizer=sgd", "train.lr=0.01", "train.momentum=0.9", "train.weight_decay=0.0001",
          "train.warmup_steps=3", "train.warmup_factor=0.1", "train.lr_steps=[4]", "train.lr_gamma=0.1",
          "train.steps=6", "train.clip=per_param"]


def _run(model, optimizer, scheduler, train_cfg, steps: range) -> list[float]:
    batch = [targets_from_labels(*_scene(), K_THINGS, k_stuff=K_STUFF)]
    lrs = []
    for s in steps:
        torch.manual_seed(1000 + s)  # the same proposal sampling at step s in every run
        out = optimize_step(model, optimizer, scheduler, batch, None, train_cfg)
        assert math.isfinite(out["loss_total"])
        assert {g["lr"] for g in optimizer.param_groups} == {optimizer.param_groups[0]["lr"]}
        lrs.append(out["lr"])
    return lrs


def test_lr_follows_lr_at_every_step_and_a_resume_continues_the_schedule() -> None:
    torch.set_num_threads(1)
    train_cfg = load_config(None, RECIPE).train
    want = [lr_at(s, 0.01, warmup_steps=3, warmup_factor=0.1, lr_steps=[4], gamma=0.1) for s in range(6)]
    assert want == pytest.approx([0.001, 0.004, 0.007, 0.01, 0.001, 0.001])
    assert [scheduled_lr(train_cfg, s) for s in range(6)] == want

    model = _tiny_model()
    opt = make_optimizer(model, train_cfg)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    assert sorted({g["weight_decay"] for g in opt.param_groups}) == [0.0, 0.0001]  # no decay on norm layers
    sched = make_lr_scheduler(opt, train_cfg)
    first = _run(model, opt, sched, train_cfg, range(3))
    ckpt = model_to_bytes(model, optimizer=opt, extra={"step": 3})
    rest = _run(model, opt, sched, train_cfg, range(3, 6))
    assert first + rest == pytest.approx(want, rel=1e-12)

    # a fresh worker resumes at step 3 from the checkpoint: same lrs, same weights as the uninterrupted run
    again = _tiny_model()
    opt2 = make_optimizer(again, train_cfg)
    _, extra = model_from_bytes(ckpt, optimizer=opt2, model=again)
    sched2 = make_lr_scheduler(opt2, train_cfg, start_step=extra["step"])
    assert _run(again, opt2, sched2, train_cfg, range(3, 6)) == pytest.approx(want[3:], rel=1e-12)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


def test_adamw_and_a_constant_lr_without_schedule_knobs() -> None:
    train_cfg = load_config(None, ["train.lr=0.001"]).train
    model = _tiny_model()
    opt = make_optimizer(model, train_cfg)
    assert isinstance(opt, torch.optim.AdamW)
    assert _run(model, opt, make_lr_scheduler(opt, train_cfg), train_cfg, range(2)) == [0.001, 0.001]


# ---------------------------------------------------------------- CNN backbone weights through the stage's model


def test_cnn_backbone_weights_file_reaches_the_trained_and_reloaded_model(tmp_path) -> None:
    import dataclasses

    import torchvision

    torch.manual_seed(5)
    torch.set_num_threads(1)
    src = torchvision.models.resnet18().state_dict()
    path = tmp_path / "dino_resnet18.pth"
    torch.save({f"module.{k}": v for k, v in src.items()}, path)  # DINO's checkpoints carry a module. prefix
    cfg = load_config(None, ["train.backbone=resnet18", f"train.weights={path}", "train.image_size=64", *RECIPE[:-2]])
    model = make_model(cfg, K_THINGS, K_STUFF)  # what every train worker builds
    body = model.detector.backbone.body.state_dict()
    assert all(torch.equal(body[k], src[k]) for k in body if not k.endswith("num_batches_tracked"))

    # the same config with cascade heads, made small enough to train a step here in seconds
    small = dataclasses.replace(model_config(cfg, K_THINGS, K_STUFF), roi_heads="cascade", pyramid_channels=16,
                                representation_size=32, mask_head_layers=(16,), semantic_conv_dims=8,
                                rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50, box_batch_size_per_image=32,
                                rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20)
    model = build_model(small, storage_options=cfg.run.storage.storage_options())
    assert torch.equal(model.detector.backbone.body.state_dict()["conv1.weight"], src["conv1.weight"])
    opt = make_optimizer(model, cfg.train)
    _run(model, opt, make_lr_scheduler(opt, cfg.train), cfg.train, range(1))
    trained = {k: v.clone() for k, v in model.detector.backbone.body.state_dict().items()}
    assert not torch.equal(trained["layer1.0.conv1.weight"], src["layer1.0.conv1.weight"])  # it trained

    reloaded, _ = model_from_bytes(model_to_bytes(model))  # as predict loads it: no weights file needed
    assert reloaded.cfg.weights == "none" and reloaded.cfg.roi_heads == "cascade"
    for k, v in reloaded.detector.backbone.body.state_dict().items():
        assert torch.equal(v, trained[k]), k
    (pred,) = predict(reloaded, [_scene()[0]])
    assert pred.semantic.shape == (64, 64)
