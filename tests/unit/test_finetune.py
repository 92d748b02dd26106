"""Unit tests for few-shot fine-tuning: the seeded subset, the model's category order, the config rules, the
stage naming, the labeled-subset label set and the class-layer re-initialisation."""

from __future__ import annotations

import itertools

import pytest
import torch

from u2seg.config import ConfigError, load_config
from u2seg.errors import UserError
from u2seg.io import RunRoot, layout
from u2seg.io.labelset import LabelSet
from u2seg.model import ModelConfig, build_model, model_to_bytes, transfer_from_bytes, transfer_weights
from u2seg.model.checkpoint import is_class_layer
from u2seg.pipeline.finetune import (
    check_finetune_config,
    finetune_folder,
    finetune_train_config,
    model_categories,
    select_fraction,
    write_labeled_subset,
)
from u2seg.pipeline.stages import stage

pytestmark = pytest.mark.unit

NAMES = [f"{i:012d}.jpg" for i in range(1000)]


def test_subset_is_seeded_stable_and_nested():
    one = select_fraction(NAMES, 0.01, seed=0)
    assert len(one) == 10
    assert one == select_fraction(list(reversed(NAMES)), 0.01, seed=0)  # listing order does not matter
    assert one == select_fraction(NAMES + NAMES[:5], 0.01, seed=0)  # duplicates count once
    sizes = {f: select_fraction(NAMES, f, seed=0) for f in (0.01, 0.02, 0.05, 0.1, 1.0)}
    assert [len(v) for v in sizes.values()] == [10, 20, 50, 100, 1000]
    fractions = list(sizes)
    for small, big in itertools.pairwise(fractions):
        assert sizes[big][: len(sizes[small])] == sizes[small]  # a smaller fraction's images are a larger one's
    assert set(sizes[1.0]) == set(NAMES)
    other = select_fraction(NAMES, 0.01, seed=1)
    assert other != one and len(other) == 10
    assert one != sorted(NAMES)[:10]  # a hash rank, not the first file names


def test_subset_size_is_floor_without_float_slips():
    names = [str(i) for i in range(100)]
    assert len(select_fraction(names, 0.29, seed=0)) == 29  # 0.29 * 100 = 28.999... in floating point
    assert len(select_fraction(names, 0.055, seed=0)) == 5


def test_subset_errors_name_the_knob():
    with pytest.raises(ConfigError, match=r"finetune.fraction.*at least one of the 20 labeled images"):
        select_fraction([str(i) for i in range(20)], 0.01, seed=0)
    with pytest.raises(ConfigError, match="at least one of the 0 labeled images"):
        select_fraction([], 0.5, seed=0)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match=r"\(0, 1\]"):
            select_fraction(NAMES, bad, seed=0)


def test_model_categories_things_first_by_id():
    cats = [{"id": 92, "isthing": 0}, {"id": 3, "isthing": 1}, {"id": 1, "isthing": 1}, {"id": 200, "isthing": 0}]
    ordered, model_to_gt, k_things = model_categories(cats)
    assert [c["id"] for c in ordered] == [1, 3, 92, 200]
    assert model_to_gt == {1: 1, 2: 3, 3: 92, 4: 200} and k_things == 2
    with pytest.raises(ValueError, match="no thing category"):
        model_categories([{"id": 5, "isthing": 0}])
    with pytest.raises(ValueError, match="isthing"):
        model_categories([{"id": 5}])


@pytest.mark.parametrize("override, key", [
    ("finetune.fraction=0", "finetune.fraction"), ("finetune.fraction=1.5", "finetune.fraction"),
    ("finetune.init=imagenet", "finetune.init"), ("finetune.steps=0", "finetune.steps"),
    ("finetune.lr=0", "finetune.lr"), ("finetune.lr_steps=[5,3]", "finetune.lr_steps"),
])
def test_config_rejects_bad_values(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert info.value.key == key


def test_config_lr_steps_below_steps():
    with pytest.raises(ConfigError, match=r"finetune.lr_steps.*below finetune.steps"):
        load_config(None, ["finetune.steps=10", "finetune.lr_steps=[10]"])
    assert load_config(None, ["finetune.steps=10", "finetune.lr_steps=[5]"]).finetune.lr_steps == [5]


def test_train_config_takes_the_finetune_recipe():
    cfg = load_config(None, ["train.steps=1000", "train.lr_steps=[800]", "train.warmup_steps=100", "train.lr=0.01",
                             "train.rounds=3", "finetune.steps=20", "finetune.lr_steps=[15]", "finetune.batch_size=4"])
    t = finetune_train_config(cfg).train
    assert (t.steps, t.lr_steps, t.warmup_steps, t.rounds, t.drop_loss_iou) == (20, [15], 0, 0, 0.0)
    assert (t.lr, t.batch_size, t.backbone) == (0.01, 4, cfg.train.backbone)  # unset knobs follow train.*
    assert finetune_train_config(load_config(None, ["finetune.lr=0.5"])).train.lr == 0.5


def test_missing_knobs_say_what_to_set():
    with pytest.raises(ConfigError, match=r"finetune.gt_panoptic_json"):
        check_finetune_config(load_config(None, []))
    with pytest.raises(ConfigError, match=r"evaluate.images"):
        check_finetune_config(load_config(None, ["finetune.gt_panoptic_json=/x.json"]))
    with pytest.raises(ConfigError, match=r"evaluate.gt_panoptic_json"):
        check_finetune_config(load_config(None, ["finetune.gt_panoptic_json=/x.json", "evaluate.images=[/v]"]))


def test_folders_and_stages():
    cfg = load_config(None, ["finetune.init=backbone", "finetune.fraction=0.05"])
    assert finetune_folder(cfg) == "finetune/backbone-0.05"
    assert layout.finetune_dir("u2seg", 1.0) == "finetune/u2seg-1"
    assert layout.finetune_model("finetune/u2seg-0.1") == "finetune/u2seg-0.1/train/model.pt"
    u2, bb = stage("finetune/u2seg-0.01"), stage("finetune/backbone-0.01")
    assert u2.upstream == ("train",) and bb.upstream == ()
    assert u2.folder == u2.name == "finetune/u2seg-0.01" and u2.outputs == ("finetune/u2seg-0.01",)
    assert "label" in u2.sections and "label" not in bb.sections and "finetune" in bb.sections
    other = load_config(None, ["finetune.fraction=0.02"])
    assert u2.config_hash(cfg) != stage("finetune/u2seg-0.02").config_hash(other)
    with pytest.raises(ValueError, match="not a fine-tuning folder"):
        stage("finetune/scratch-0.1")
    with pytest.raises(ValueError):
        layout.finetune_dir("scratch", 0.1)


def test_init_u2seg_without_a_model_says_what_to_run(tmp_path):
    from u2seg.pipeline.finetune import _init_model

    cfg = load_config(None, [f"run.run_root={tmp_path}"])
    with pytest.raises(UserError, match="run `u2seg train`"):
        _init_model(cfg, RunRoot(str(tmp_path)))
    assert _init_model(load_config(None, ["finetune.init=backbone"]), RunRoot(str(tmp_path))) is None


def test_labeled_subset_becomes_a_label_set_of_real_categories(tmp_path):
    from u2seg.data.synthetic import make_synthetic

    make_synthetic(str(tmp_path / "world"), 10, seed=0, min_size=40, max_size=60)
    cfg = load_config(None, [f"run.run_root={tmp_path / 'run'}", "finetune.fraction=0.5",
                             f"finetune.gt_panoptic_json={tmp_path / 'world' / 'gt' / 'panoptic.json'}"])
    root = RunRoot(str(tmp_path / "run"))
    folder = finetune_folder(cfg)
    stats = write_labeled_subset(cfg, root, folder)
    assert (stats["selected"], stats["labeled_images"], stats["k_things"], stats["k_stuff"]) == (5, 10, 6, 5)
    labels = LabelSet(root, layout.finetune_labels(folder))
    rows = list(labels.iter_rows(["file_name", "segments", "instances"]))
    subset = root.read_json(layout.finetune_subset(folder))
    assert sorted(r["file_name"] for r in rows) == sorted(subset["file_names"])
    assert labels.k_things == 6 and labels.k_stuff == 5
    # the synthetic world's ids are already things first, contiguous: the model's ids are the gt's
    assert root.read_json(layout.finetune_categories(folder))["model_to_gt"] == {str(i): i for i in range(1, 12)}
    assert all(1 <= s["category_id"] <= 11 for r in rows for s in r["segments"])
    assert all(1 <= a["category_id"] <= 6 for r in rows for a in r["instances"])
    assert write_labeled_subset(cfg, root, folder)["written_now"] == 0  # committed groups are kept on a rerun


def tiny_model(things: int, stuff: int, seed: int, roi_heads: str = "standard"):
    return build_model(ModelConfig(backbone="resnet18", num_thing_classes=things, num_stuff_classes=stuff,
                                   pyramid_channels=16, representation_size=32, mask_head_layers=(16,),
                                   semantic_conv_dims=8, roi_heads=roi_heads, seed=seed))


@pytest.mark.parametrize("roi_heads", ["standard", "cascade"])
def test_transfer_keeps_the_trunk_and_reinitialises_the_class_layers(roi_heads):
    trained = tiny_model(4, 3, seed=1, roi_heads=roi_heads)  # the self-trained model: pseudo classes
    fresh = tiny_model(6, 5, seed=2, roi_heads=roi_heads)  # the fine-tuning model: real classes
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    moved = transfer_from_bytes(model_to_bytes(trained), fresh)
    after, source = fresh.state_dict(), trained.state_dict()
    layers = {k.rsplit(".", 2)[-2] for k in moved["reinitialised"]}
    assert layers == {"cls_score", "mask_fcn_logits", "predictor"}
    assert len(moved["reinitialised"]) == (6 if roi_heads == "standard" else 10)
    for name in moved["reinitialised"]:
        assert torch.equal(after[name], before[name])  # the fresh init, at the new number of classes
    assert after["semantic_head.predictor.weight"].shape[0] == 5 + 1
    assert after["detector.roi_heads.mask_predictor.mask_fcn_logits.weight"].shape[0] == 6 + 1
    kept = set(after) - set(moved["reinitialised"])
    assert kept == set(moved["copied"])
    assert any(k.startswith("detector.backbone.body.") for k in kept)  # backbone
    assert any(k.startswith("detector.backbone.fpn.") for k in kept)  # FPN
    assert any(k.startswith("detector.rpn.") for k in kept)  # RPN
    assert any(".mask_head." in k for k in kept) and any(".box_head" in k for k in kept)  # box and mask trunks
    assert any(k.startswith("semantic_head.scale_heads.") for k in kept)  # semantic trunk
    for name in kept:
        assert torch.equal(after[name], source[name]), name


def test_transfer_refuses_another_architecture():
    a = tiny_model(4, 3, seed=0)
    b = build_model(ModelConfig(backbone="resnet18", num_thing_classes=4, num_stuff_classes=3, pyramid_channels=16,
                                representation_size=48, mask_head_layers=(16,), semantic_conv_dims=8))
    with pytest.raises(ValueError, match=r"another architecture.*of another shape"):
        transfer_weights(a, b.state_dict())
    state = dict(b.state_dict())
    state.pop("semantic_head.predictor.bias")
    with pytest.raises(ValueError, match=r"another architecture.*missing"):
        transfer_weights(b, state)


def test_class_layer_names():
    assert is_class_layer("detector.roi_heads.box_predictor.cls_score.weight")
    assert is_class_layer("detector.roi_heads.box_predictor.2.cls_score.bias")
    assert is_class_layer("semantic_head.predictor.weight")
    assert not is_class_layer("detector.roi_heads.box_predictor.bbox_pred.weight")  # class-agnostic: kept
    assert is_class_layer("detector.roi_heads.box_predictor.bbox_pred.weight", shapes_differ=True)
    assert not is_class_layer("detector.rpn.head.cls_logits.weight")
