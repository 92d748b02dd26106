"""STEGO head, cluster probe, correlation loss, training step, checkpoints, five crops and kNN (u2seg.stuff)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms.functional import five_crop

from u2seg.stuff import (
    STEGO_LOSS_PRESETS,
    StegoHead,
    StegoTrainConfig,
    contrastive_correlation_loss,
    correlation_term,
    five_crop_boxes,
    five_crops,
    global_descriptor,
    knn_indices,
    load_stego_head,
    make_stego_optimizers,
    pick_positives,
    sample_at,
    stego_state_dict,
    stego_train_step,
    super_perm,
)
from u2seg.stuff.stego import _dropout2d

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: extra intra-op threads only add contention on a shared CPU."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _grid(vectors: list[list[float]]) -> torch.Tensor:
    """[1, C, 1, n] tensor whose n locations are the given C-vectors."""
    return torch.tensor(vectors, dtype=torch.float32).T[None, :, None, :]


# Three locations: features (1,0), (1,0), (0,1) -> fd = [[1,1,0],[1,1,0],[0,0,1]];
# codes (1,0), (.6,.8), (-1,0) -> cd = [[1,.6,-1],[.6,1,-.6],[-1,-.6,1]].
FEATS = _grid([[1, 0], [1, 0], [0, 1]])
CODES = _grid([[1, 0], [0.6, 0.8], [-1, 0]])
FD = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=np.float64)
CD = np.array([[1, 0.6, -1], [0.6, 1, -0.6], [-1, -0.6, 1]], dtype=np.float64)
SHIFT = 0.25


def _term(pointwise: bool, zero_clamp: bool, stabilize: bool) -> tuple[np.ndarray, np.ndarray]:
    loss, cd = correlation_term(
        FEATS, FEATS, CODES, CODES, SHIFT, pointwise=pointwise, zero_clamp=zero_clamp, stabilize=stabilize
    )
    assert loss.shape == (1, 1, 3, 1, 3)
    return loss[0, 0, :, 0, :].double().numpy(), cd[0, 0, :, 0, :].double().numpy()


# ---------------------------------------------------------------------------------------------- loss


def test_correlation_term_plain_by_hand():
    loss, cd = _term(pointwise=False, zero_clamp=False, stabilize=False)
    np.testing.assert_allclose(cd, CD, atol=1e-6)
    # -cd * (fd - shift), written out
    expected = -np.array([[1 * 0.75, 0.6 * 0.75, -1 * -0.25], [0.6 * 0.75, 1 * 0.75, -0.6 * -0.25],
                          [-1 * -0.25, -0.6 * -0.25, 1 * 0.75]])
    np.testing.assert_allclose(loss, expected, atol=1e-6)


def test_correlation_term_zero_clamp_drops_negative_code_correlations():
    loss, _ = _term(pointwise=False, zero_clamp=True, stabilize=False)
    clamped = np.clip(CD, 0, None)
    np.testing.assert_allclose(loss, -clamped * (FD - SHIFT), atol=1e-6)
    assert loss[0, 2] == 0 and loss[1, 2] == 0  # cd -1 and -0.6 clamp to zero
    plain, _ = _term(pointwise=False, zero_clamp=False, stabilize=False)
    assert plain[0, 2] != 0


def test_correlation_term_stabilize_caps_at_point_eight():
    loss, _ = _term(pointwise=False, zero_clamp=False, stabilize=True)
    np.testing.assert_allclose(loss[0, 0], -0.8 * 0.75, atol=1e-6)  # cd 1 -> 0.8
    np.testing.assert_allclose(loss[0, 1], -0.6 * 0.75, atol=1e-6)  # cd 0.6 untouched
    np.testing.assert_allclose(loss[0, 2], -0.25, atol=1e-6)  # -(cd=-1) * (fd=0 - 0.25), no lower clamp


def test_correlation_term_pointwise_recentres_each_source_row():
    loss, _ = _term(pointwise=True, zero_clamp=False, stabilize=False)
    # row means 2/3, 2/3, 1/3; global mean 5/9: fd' = fd - rowmean + 5/9
    fd = FD - np.array([[2 / 3], [2 / 3], [1 / 3]]) + 5 / 9
    np.testing.assert_allclose(fd[2], [2 / 9, 2 / 9, 11 / 9], atol=1e-12)
    np.testing.assert_allclose(loss, -CD * (fd - SHIFT), atol=1e-6)


def test_correlation_term_gradient_flows_to_code_only():
    f = FEATS.clone().requires_grad_()
    c = CODES.clone().requires_grad_()
    loss, _ = correlation_term(f, f, c, c, SHIFT, pointwise=True, zero_clamp=True, stabilize=False)
    loss.mean().backward()
    assert f.grad is None
    assert c.grad is not None and c.grad.abs().sum() > 0


def test_sample_at_corners_and_transposed_layout():
    t = torch.arange(12, dtype=torch.float32).reshape(1, 1, 3, 4)  # h=3, w=4
    # coords [B, S1=2, S2=1, 2] as (x, y): top-left and top-right
    coords = torch.tensor([[[[-1.0, -1.0]], [[1.0, -1.0]]]])
    out = sample_at(t, coords)
    assert out.shape == (1, 1, 1, 2)  # STEGO transposes S1/S2
    assert out.flatten().tolist() == [0.0, 3.0]
    # centre of a 3x4 map: y=1, x=1.5 -> mean of 5 and 6
    assert sample_at(t, torch.zeros(1, 1, 1, 2)).item() == pytest.approx(5.5)


def test_super_perm_never_pairs_an_image_with_itself():
    g = torch.Generator().manual_seed(0)
    for size in (2, 3, 5, 16):
        for _ in range(50):
            perm = super_perm(size, generator=g)
            assert perm.dtype == torch.long and perm.shape == (size,)
            assert not torch.any(perm == torch.arange(size))
            assert perm.min() >= 0 and perm.max() < size


def _loss_inputs(seed: int = 0, batch: int = 3):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, 8, 6, 6, generator=g)
    feats_pos = torch.randn(batch, 8, 6, 6, generator=g)
    code = torch.randn(batch, 5, 6, 6, generator=g)
    code_pos = torch.randn(batch, 5, 6, 6, generator=g)
    return feats, feats_pos, code, code_pos


def test_full_loss_matches_terms_at_injected_coordinates():
    cfg = StegoTrainConfig(feature_samples=2, neg_samples=2, batch_size=3)
    feats, feats_pos, code, code_pos = _loss_inputs()
    # sample exactly at pixel centres: x = -1 + 2*col/(w-1), y likewise (align_corners=True)
    pix = torch.tensor([[[[-1.0, -1.0], [1.0, -1.0]], [[-1.0, 1.0], [0.2, 0.2]]]]).expand(3, 2, 2, 2)
    perms = [torch.tensor([1, 2, 0]), torch.tensor([2, 0, 1])]
    out = contrastive_correlation_loss(feats, feats_pos, code, code_pos, cfg, coords=(pix, pix), perms=perms)
    f1, c1 = sample_at(feats, pix), sample_at(code, pix)
    flags = dict(pointwise=True, zero_clamp=True, stabilize=False)
    intra, _ = correlation_term(f1, f1, c1, c1, cfg.pos_intra_shift, **flags)
    neg1, _ = correlation_term(f1, sample_at(feats[perms[1]], pix), c1, sample_at(code[perms[1]], pix),
                               cfg.neg_inter_shift, **flags)
    assert out.pos_intra_loss.item() == pytest.approx(intra.mean().item(), abs=1e-7)
    assert out.neg_inter_loss.shape == (6, 2, 2, 2, 2)
    torch.testing.assert_close(out.neg_inter_loss[3:], neg1)
    # the corner sample is the corner pixel
    torch.testing.assert_close(f1[:, :, 0, 0], feats[:, :, 0, 0])
    expected = (cfg.pos_inter_weight * out.pos_inter_loss + cfg.pos_intra_weight * out.pos_intra_loss
                + cfg.neg_inter_weight * out.neg_inter_loss.mean()) * cfg.correspondence_weight
    assert out.weighted(cfg).item() == pytest.approx(expected.item())


def test_full_loss_is_deterministic_under_a_generator():
    cfg = StegoTrainConfig(batch_size=3)
    inputs = _loss_inputs()
    a = contrastive_correlation_loss(*inputs, cfg, generator=torch.Generator().manual_seed(5))
    b = contrastive_correlation_loss(*inputs, cfg, generator=torch.Generator().manual_seed(5))
    c = contrastive_correlation_loss(*inputs, cfg, generator=torch.Generator().manual_seed(6))
    assert a.weighted(cfg).item() == b.weighted(cfg).item()
    assert a.weighted(cfg).item() != c.weighted(cfg).item()


def test_full_loss_rejects_bad_inputs():
    cfg = StegoTrainConfig(batch_size=3, neg_samples=2)
    feats, feats_pos, code, code_pos = _loss_inputs()
    with pytest.raises(ValueError, match="feats and feats_pos"):
        contrastive_correlation_loss(feats, feats_pos[:, :4], code, code_pos, cfg)
    with pytest.raises(ValueError, match="batch of at least 2"):
        contrastive_correlation_loss(feats[:1], feats_pos[:1], code[:1], code_pos[:1], cfg)
    with pytest.raises(ValueError, match="neg_samples=2"):
        contrastive_correlation_loss(feats, feats_pos, code, code_pos, cfg, perms=[torch.tensor([1, 2, 0])])
    with pytest.raises(ValueError, match="int64"):
        contrastive_correlation_loss(feats, feats_pos, code, code_pos, cfg, perms=[torch.zeros(3)] * 2)
    cuda_gen = SimpleNamespace(device=torch.device("cuda"))  # stands in for a CUDA generator on a CPU-only box
    with pytest.raises(ValueError, match="generator lives on cuda"):
        contrastive_correlation_loss(feats, feats_pos, code, code_pos, cfg, generator=cuda_gen)


# ---------------------------------------------------------------------------------------------- head


def test_head_shapes_and_eval_code_is_sum_of_branches():
    head = StegoHead(16, 7, 5, generator=torch.Generator().manual_seed(0)).eval()
    x = torch.randn(2, 16, 4, 3)
    code = head(x)
    assert code.shape == (2, 7, 4, 3)
    torch.testing.assert_close(code, head.cluster1(x) + head.cluster2(x))
    torch.testing.assert_close(head.project(x), code)
    assert head.cluster_probe.clusters.shape == (5, 7)
    assert head.assign(code).shape == (2, 4, 3) and head.assign(code).dtype == torch.int64
    with pytest.raises(ValueError, match=r"\[B, 16, h, w\]"):
        head(torch.randn(2, 15, 4, 3))


def test_head_dropout_only_in_training_and_seedable():
    head = StegoHead(16, 7, 5, dropout=0.5, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 16, 4, 3)
    head.train()
    a = head(x, torch.Generator().manual_seed(1))
    b = head(x, torch.Generator().manual_seed(1))
    c = head(x, torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, head.project(x))
    head.eval()
    torch.testing.assert_close(head(x), head.project(x))
    assert head.dropout_features(x) is x


def test_dropout2d_drops_whole_channels_and_rescales():
    x = torch.ones(4, 50, 3, 3)
    y = _dropout2d(x, 0.2, torch.Generator().manual_seed(0))
    per_channel = y.flatten(2)
    assert torch.all(per_channel.amin(2) == per_channel.amax(2))  # constant over space
    values = set(np.round(per_channel[..., 0].flatten().numpy(), 5).tolist())
    assert values == {0.0, 1.25}


def test_assign_and_probe_loss_on_hand_built_centres():
    head = StegoHead(4, 2, 3).eval()
    with torch.no_grad():
        head.cluster_probe.clusters.copy_(torch.tensor([[1.0, 0.0], [0.0, 5.0], [-2.0, 0.0]]))
    # codes at 4 locations: cosine ignores length
    code = _grid([[3.0, 0.1], [0.2, 9.0], [-0.5, 0.1], [1.0, 1.2]])
    assert head.assign(code).flatten().tolist() == [0, 1, 2, 1]
    loss, probs = head.probe_loss(code)
    best = [3 / math.hypot(3, 0.1), 9 / math.hypot(0.2, 9), 0.5 / math.hypot(0.5, 0.1), 1.2 / math.hypot(1, 1.2)]
    assert loss.item() == pytest.approx(-np.mean(best), abs=1e-6)
    assert probs.shape == (1, 3, 1, 4) and probs.sum(1).eq(1).all()
    logp = head.cluster_log_probs(code, alpha=2.0)
    torch.testing.assert_close(logp.exp().sum(1), torch.ones(1, 1, 4))
    assert logp.argmax(1).flatten().tolist() == [0, 1, 2, 1]


def test_predict_upsamples_code_before_assigning():
    head = StegoHead(3, 2, 2, nonlinear=False).eval()
    with torch.no_grad():
        head.cluster1[0].weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).reshape(2, 3, 1, 1))
        head.cluster1[0].bias.zero_()
        head.cluster_probe.clusters.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    feats = torch.zeros(1, 3, 1, 2)
    feats[0, 0, 0, 0] = 1.0  # left patch -> class 0
    feats[0, 1, 0, 1] = 1.0  # right patch -> class 1
    out = head.predict(feats, out_size=(2, 4))
    assert out.tolist() == [[[0, 0, 1, 1], [0, 0, 1, 1]]]


# ---------------------------------------------------------------------------------------------- checkpoints


def test_state_dict_round_trip_in_stego_key_format():
    head = StegoHead(12, 6, 4, generator=torch.Generator().manual_seed(3)).eval()
    sd = stego_state_dict(head)
    assert set(sd) == {"net.cluster1.0.weight", "net.cluster1.0.bias", "net.cluster2.0.weight", "net.cluster2.0.bias",
                       "net.cluster2.2.weight", "net.cluster2.2.bias", "cluster_probe.clusters"}
    extra = {"net.model.blocks.0.attn.qkv.weight": torch.randn(3, 3), "linear_probe.weight": torch.randn(4, 6, 1, 1),
             "train_cluster_probe.clusters": torch.randn(4, 6), "decoder.weight": torch.randn(12, 6, 1, 1)}
    x = torch.randn(2, 12, 3, 3)
    for obj in (sd, {"state_dict": {**sd, **extra}, "epoch": 0}):
        loaded = load_stego_head(obj).eval()
        assert (loaded.in_dim, loaded.code_dim, loaded.n_clusters, loaded.nonlinear) == (12, 6, 4, True)
        torch.testing.assert_close(loaded(x), head(x))
        assert torch.equal(loaded.assign(loaded(x)), head.assign(head(x)))


def test_linear_projection_checkpoint_loads_without_cluster2():
    head = StegoHead(5, 3, 2, nonlinear=False)
    loaded = load_stego_head(stego_state_dict(head))
    assert loaded.cluster2 is None and not loaded.nonlinear


def test_load_rejects_bad_checkpoints_clearly():
    sd = stego_state_dict(StegoHead(12, 6, 4))
    with pytest.raises(ValueError, match=r"missing \[.cluster_probe\.clusters.\]"):
        load_stego_head({k: v for k, v in sd.items() if k != "cluster_probe.clusters"})
    with pytest.raises(ValueError, match=r"strip it first"):
        load_stego_head({f"module.{k}": v for k, v in sd.items()})
    with pytest.raises(ValueError, match=r"net.cluster2.2.bias"):
        load_stego_head({k: v for k, v in sd.items() if k != "net.cluster2.2.bias"})
    with pytest.raises(ValueError, match=r"'cluster_probe.clusters' has shape \(4, 5\), expected \(4, 6\)"):
        load_stego_head({**sd, "cluster_probe.clusters": torch.randn(4, 5)})
    with pytest.raises(ValueError, match=r"'net.cluster2.0.weight' has shape"):
        load_stego_head({**sd, "net.cluster2.0.weight": torch.randn(12, 11, 1, 1)})
    with pytest.raises(ValueError, match="not a tensor"):
        load_stego_head({**sd, "net.cluster1.0.bias": [0.0] * 6})
    with pytest.raises(ValueError, match="mapping"):
        load_stego_head([1, 2])


# ---------------------------------------------------------------------------------------------- config / training


def test_config_defaults_and_presets():
    cfg = StegoTrainConfig()
    assert (cfg.code_dim, cfg.n_classes, cfg.lr, cfg.probe_lr, cfg.batch_size, cfg.max_steps) == (
        70, 27, 5e-4, 5e-3, 16, 5000)
    assert (cfg.feature_samples, cfg.neg_samples, cfg.num_neighbors, cfg.dropout_p) == (11, 5, 7, 0.1)
    assert (cfg.pointwise, cfg.zero_clamp, cfg.stabilize) == (True, True, False)
    base = STEGO_LOSS_PRESETS["cocostuff27_vit_base"]
    assert (cfg.neg_inter_shift, cfg.pos_inter_shift, cfg.pos_intra_shift) == (
        base["neg_inter_shift"], base["pos_inter_shift"], base["pos_intra_shift"]) == (1.0, 0.2, 0.12)
    small = StegoTrainConfig.from_preset("cocostuff27_vit_small", batch_size=8)
    assert small.neg_inter_shift == 0.66 and small.batch_size == 8
    with pytest.raises(ValueError, match="unknown STEGO preset"):
        StegoTrainConfig.from_preset("voc")
    with pytest.raises(ValueError, match="unknown StegoTrainConfig fields"):
        StegoTrainConfig.from_preset("cocostuff27_vit_base", bogus=1)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"code_dim": 0}, "code_dim"),
        ({"n_classes": 2.5}, "n_classes"),
        ({"lr": -1.0}, "lr"),
        ({"probe_lr": float("nan")}, "probe_lr"),
        ({"neg_samples": -1}, "neg_samples"),
        ({"dropout_p": 1.0}, "dropout_p"),
        ({"pos_inter_weight": -0.1}, "pos_inter_weight"),
        ({"neg_inter_shift": float("inf")}, "neg_inter_shift"),
        ({"crop_ratio": 0.0}, "crop_ratio"),
        ({"pointwise": 1}, "pointwise"),
        ({"batch_size": 1}, "batch_size"),
    ],
)
def test_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        StegoTrainConfig(**kwargs)


def _train(steps: int, seed: int = 0, **cfg_kw):
    cfg = StegoTrainConfig(code_dim=8, n_classes=4, batch_size=4, feature_samples=5, **cfg_kw)
    g = torch.Generator().manual_seed(seed)
    head = StegoHead(16, cfg.code_dim, cfg.n_clusters, dropout=cfg.dropout_p, generator=g)
    opts = make_stego_optimizers(head, cfg)
    feats = torch.randn(4, 16, 6, 6, generator=g)
    feats_pos = feats + 0.3 * torch.randn(4, 16, 6, 6, generator=g)
    logs = [stego_train_step(head, opts, feats, feats_pos, loss_cfg=cfg, generator=g) for _ in range(steps)]
    return head, cfg, feats, feats_pos, logs


def _eval_loss(head, cfg, feats, feats_pos) -> tuple[float, float]:
    """(weighted correlation loss, cluster probe loss) without dropout, at fixed sampling coordinates."""
    head.eval()
    with torch.no_grad():
        code, code_pos = head(feats), head(feats_pos)
        out = contrastive_correlation_loss(feats, feats_pos, code, code_pos, cfg,
                                           generator=torch.Generator().manual_seed(42))
        return out.weighted(cfg).item(), head.probe_loss(code)[0].item()


def test_training_steps_lower_the_loss_and_are_deterministic():
    head0, cfg, feats, feats_pos, _ = _train(0)
    corr_before, probe_before = _eval_loss(head0, cfg, feats, feats_pos)
    head, _, _, _, logs = _train(20, lr=5e-3)
    corr_after, probe_after = _eval_loss(head, cfg, feats, feats_pos)
    assert corr_after < corr_before - 0.02
    assert probe_after < probe_before - 0.02
    assert logs[-1]["loss/total"] < logs[0]["loss/total"]
    assert set(logs[0]) >= {"loss/pos_intra", "loss/pos_inter", "loss/neg_inter", "loss/cluster", "loss/total"}
    _, _, _, _, again = _train(3, lr=5e-3)
    assert again == logs[:3]


def test_cluster_probe_loss_does_not_move_the_projection():
    g = torch.Generator().manual_seed(0)
    cfg = StegoTrainConfig(code_dim=8, n_classes=4, batch_size=4, feature_samples=5, correspondence_weight=0.0)
    head = StegoHead(16, 8, 4, generator=g)
    before = stego_state_dict(head)
    opts = make_stego_optimizers(head, cfg)
    feats = torch.randn(4, 16, 6, 6, generator=g)
    stego_train_step(head, opts, feats, feats.clone(), loss_cfg=cfg, generator=g)
    after = stego_state_dict(head)
    for key in before:
        moved = not torch.equal(before[key], after[key])
        assert moved == (key == "cluster_probe.clusters"), key


def test_train_step_rejects_mismatched_config():
    head = StegoHead(16, 8, 4)
    cfg = StegoTrainConfig(batch_size=4)  # code_dim 70
    with pytest.raises(ValueError, match="does not match the head"):
        stego_train_step(head, make_stego_optimizers(head, cfg), torch.randn(4, 16, 3, 3), torch.randn(4, 16, 3, 3),
                         loss_cfg=cfg)


# ---------------------------------------------------------------------------------------------- kNN


def test_global_descriptor_is_normalised_spatial_mean():
    feats = torch.zeros(2, 3, 2, 2)
    feats[0, 0] = 2.0
    feats[1, 1, 0, 0] = 4.0
    feats[1, 2] = 1.0
    out = global_descriptor(feats)
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.0, 0.0], [0.0, 1 / math.sqrt(2), 1 / math.sqrt(2)]]))
    with pytest.raises(ValueError, match=r"\[B, C, h, w\]"):
        global_descriptor(torch.zeros(2, 3))


def test_knn_on_points_around_a_circle():
    angles = np.deg2rad([0, 10, 30, 70, 100, 160])
    x = np.stack([np.cos(angles), np.sin(angles)], 1) * np.array([[1], [3], [0.5], [2], [1], [7]])  # norms vary
    nn_idx = knn_indices(x, k=2)
    assert nn_idx.dtype == np.int64
    assert nn_idx.tolist() == [[1, 2], [0, 2], [1, 0], [4, 2], [3, 5], [4, 3]]


def test_knn_drops_the_image_itself_even_behind_a_duplicate():
    x = np.array([[1.0, 0.0], [1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], dtype=np.float32)
    nn_idx = knn_indices(x, k=2)
    for i, row in enumerate(nn_idx):
        assert i not in row
    assert nn_idx[0].tolist() == [1, 2] and nn_idx[1].tolist() == [0, 2]


def test_knn_rejects_bad_input():
    with pytest.raises(ValueError, match="k\\+1"):
        knn_indices(np.eye(3), k=3)
    with pytest.raises(ValueError, match="all-zero"):
        knn_indices(np.array([[1.0, 0], [0, 0], [0, 1], [1, 1]]), k=2)
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        knn_indices(np.zeros(5), k=2)


def test_pick_positives_uniform_over_the_k_neighbours():
    knn = np.array([[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]])
    rng = np.random.default_rng(0)
    picks = pick_positives(knn, np.zeros(3000, dtype=np.int64), rng)
    counts = np.bincount(picks, minlength=4)
    assert counts[0] == 0 and np.all(np.abs(counts[1:] - 1000) < 100)
    with pytest.raises(ValueError, match="indices"):
        pick_positives(knn, np.array([4]), rng)


# ---------------------------------------------------------------------------------------------- five crops


def test_five_crop_boxes_geometry():
    # 10 x 7, ratio .5 -> 5 x 3 crops; centre offsets round(5/2)=2 (half to even), round(4/2)=2
    assert five_crop_boxes(10, 7, 0.5) == [(0, 0, 5, 3), (0, 4, 5, 3), (5, 0, 5, 3), (5, 4, 5, 3), (2, 2, 5, 3)]
    # 11 x 9 -> 5 x 4 crops; centre round(6/2)=3, round(5/2)=2
    assert five_crop_boxes(11, 9, 0.5)[4] == (3, 2, 5, 4)
    with pytest.raises(ValueError, match="crop_ratio"):
        five_crop_boxes(10, 10, 1.5)


def test_five_crops_raw_cut_the_image_at_the_boxes():
    h, w = 10, 7
    img = (np.arange(h * w).reshape(h, w) % 256).astype(np.uint8)
    crops = five_crops(img, 0.5, out_size=None)
    assert [c.shape for c in crops] == [(5, 3)] * 5
    assert crops[0][0, 0] == img[0, 0] and crops[1][0, -1] == img[0, -1]
    assert crops[2][-1, 0] == img[-1, 0] and crops[3][-1, -1] == img[-1, -1]
    np.testing.assert_array_equal(crops[4], img[2:7, 2:5])


@pytest.mark.parametrize("hw", [(480, 640), (427, 640), (640, 427), (333, 500), (448, 448), (101, 999)])
def test_five_crops_match_torchvision_pipeline(hw):
    rng = np.random.default_rng(hw[0] * 1000 + hw[1])
    img = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
    size = [int(hw[0] * 0.5), int(hw[1] * 0.5)]
    tf = T.Compose([T.Resize(224, Image.NEAREST), T.CenterCrop(224)])
    ref = [np.asarray(tf(c)) for c in five_crop(Image.fromarray(img), size)]
    ours = five_crops(img, 0.5, 224)
    assert all(c.shape == (224, 224, 3) and c.dtype == np.uint8 for c in ours)
    for a, b in zip(ref, ours, strict=True):
        np.testing.assert_array_equal(a, b)


def test_five_crops_rejects_bad_images():
    with pytest.raises(ValueError, match="uint8"):
        five_crops(np.zeros((10, 10, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="out_size"):
        five_crops(np.zeros((10, 10, 3), dtype=np.uint8), out_size=0)
    with pytest.raises(ValueError, match="empty crop"):
        five_crops(np.zeros((1, 10, 3), dtype=np.uint8), 0.5)
