"""MaskCut core: solvers, reference rules, drop/no-overlap, refinement, COCO output, descriptors."""

from __future__ import annotations

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

from u2seg.maskcut import (
    mask_descriptors,
    maskcut,
    maskcut_detailed,
    refine_masks,
    remove_overlaps,
    sample_patch_features,
    upsample_masks,
)
from u2seg.maskcut.affinity import binary_affinity, normalize_affinity_
from u2seg.maskcut.rules import (
    canonical_sign,
    corner_count,
    drop_repeated_or_tiny,
    foreground_partition,
    seed_component,
)
from u2seg.maskcut.solver import dense_fiedler, lanczos_fiedler

pytestmark = pytest.mark.unit
SOLVERS = ["dense", "lanczos"]


def _cluster_feats(labels: np.ndarray, seed: int = 0, noise: float = 0.02, dim: int = 32) -> torch.Tensor:
    """[1, h*w, dim] features: one orthonormal direction per label value, plus a little noise."""
    rng = np.random.default_rng(seed)
    centers = np.linalg.qr(rng.standard_normal((dim, int(labels.max()) + 1)))[0].T
    f = centers[labels.reshape(-1)] + noise * rng.standard_normal((labels.size, dim))
    return torch.from_numpy(f).float()[None]


def _blob_labels(h: int = 16, w: int = 16) -> np.ndarray:
    lab = np.zeros((h, w), np.int64)
    lab[4:10, 5:11] = 1
    return lab


@pytest.mark.parametrize("solver", SOLVERS)
def test_two_clusters_foreground_found(solver):
    lab = _blob_labels()
    masks, valid = maskcut(_cluster_feats(lab), (16, 16), n_masks=3, solver=solver)
    assert masks.shape == (1, 3, 16, 16) and masks.dtype == torch.bool
    assert valid.shape == (1, 3) and bool(valid[0, 0])
    assert torch.equal(masks[0, 0], torch.from_numpy(lab == 1))


@pytest.mark.parametrize("solver", SOLVERS)
def test_corner_rule_picks_interior_over_border_frame(solver):
    # The 1-patch border frame is the smaller cluster, so it holds the eigenvector's largest entries
    # (the seed side); it covers all 4 corners, so the rule must flip to the interior.
    lab = np.ones((16, 16), np.int64)
    lab[1:-1, 1:-1] = 0
    masks, valid = maskcut(_cluster_feats(lab, seed=1), (16, 16), n_masks=1, solver=solver)
    assert bool(valid[0, 0])
    assert torch.equal(masks[0, 0], torch.from_numpy(lab == 0))


def test_corner_count_and_partition_rules():
    grid = (4, 5)
    x = torch.zeros(1, 20)
    x[0, [0, 4, 15]] = 1.0  # three corners on the high side
    x[0, 7] = 2.0  # the largest entry, same side
    assert int(corner_count(x > x.mean(), grid)[0]) == 3
    bip, seed = foreground_partition(x, grid)
    assert not bool(bip[0, 7]) and bool(bip[0, 1])  # flipped to the low side
    assert bool(bip[0, int(seed[0])])
    # Without >= 3 corners the seed's side stays foreground.
    y = torch.zeros(1, 20)
    y[0, [0, 7]] = 1.0
    y[0, 12] = -3.0
    bip, seed = foreground_partition(canonical_sign(y), grid)
    assert int(seed[0]) == 12 and bool(bip[0, 12]) and int(bip.sum()) == 1


def test_canonical_sign_is_sign_invariant():
    x = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(canonical_sign(x), canonical_sign(-x))
    assert bool((canonical_sign(x).abs().argmax(1) == x.abs().argmax(1)).all())


def test_seed_component_keeps_only_the_seed_blob():
    bip = torch.zeros(1, 6, 6, dtype=torch.bool)
    bip[0, 0:2, 0:2] = True
    bip[0, 3:6, 3:6] = True
    bip[0, 2, 2] = True  # diagonal neighbour only: not 4-connected to either blob
    out = seed_component(bip.reshape(1, 36), torch.tensor([4 * 6 + 4]), (6, 6))
    assert torch.equal(out[0], torch.zeros(6, 6, dtype=torch.bool).index_put_(
        (torch.arange(3, 6).repeat_interleave(3), torch.arange(3, 6).repeat(3)), torch.tensor(True)))
    # A seed outside the partition (degenerate eigenvector) gives an empty mask.
    assert not bool(seed_component(bip.reshape(1, 36), torch.tensor([5]), (6, 6)).any())


@pytest.mark.parametrize("solver", SOLVERS)
def test_two_identical_blobs_give_two_masks_in_index_order(solver):
    lab = np.zeros((16, 16), np.int64)
    lab[2:6, 2:6] = 1
    lab[10:14, 9:14] = 1  # same features, not connected
    masks, valid = maskcut(_cluster_feats(lab, seed=2), (16, 16), n_masks=3, solver=solver)
    first = np.zeros((16, 16), bool)
    first[2:6, 2:6] = True
    second = (lab == 1) & ~first
    assert valid[0].tolist()[:2] == [True, True]
    assert torch.equal(masks[0, 0], torch.from_numpy(first))
    assert torch.equal(masks[0, 1], torch.from_numpy(second))


def test_drop_rule_iou_and_area():
    prev = torch.zeros(3, 10, 10, dtype=torch.bool)
    prev[:, :5] = True
    cut = torch.zeros(3, 10, 10, dtype=torch.bool)
    cut[0, :6] = True  # IoU 5/6 with prev -> dropped
    cut[1, 9, 9] = True  # 1% of the patches -> dropped
    cut[2, 5:] = True  # disjoint, large -> kept
    out = drop_repeated_or_tiny(prev, cut)
    assert out.flatten(1).any(1).tolist() == [False, False, True]
    # After a dropped cut the previous mask is empty: IoU is NaN, only the area test applies.
    again = drop_repeated_or_tiny(torch.zeros_like(prev), cut)
    assert again.flatten(1).any(1).tolist() == [True, False, True]


@pytest.mark.parametrize("solver", SOLVERS)
def test_tiny_second_object_is_dropped(solver):
    lab = _blob_labels()
    lab[14, 1] = 2  # one odd patch: 1/256 <= 1% of the patches
    masks, valid, stats = maskcut_detailed(_cluster_feats(lab, seed=3), (16, 16), n_masks=3, solver=solver)
    assert valid[0].tolist() == [True, False, False]
    assert torch.equal(masks[0, 0], torch.from_numpy(lab == 1))
    assert 0.9 < float(stats.scores[0, 0]) <= 1.0
    assert stats.scores[0, 1:].eq(0).all()


@pytest.mark.parametrize("solver", SOLVERS)
def test_masks_never_overlap(solver):
    gen = torch.Generator().manual_seed(4)
    feats = torch.nn.functional.interpolate(torch.randn(3, 16, 4, 4, generator=gen), size=(12, 12),
                                            mode="bilinear", align_corners=False)
    feats = feats.flatten(2).transpose(1, 2)
    masks, valid = maskcut(feats, (12, 12), n_masks=3, solver=solver)
    assert int(masks.sum(1).max()) <= 1
    assert torch.equal(valid, masks.flatten(2).any(-1))


def test_lanczos_matches_dense_on_small_grids():
    gen = torch.Generator().manual_seed(5)
    feats = torch.nn.functional.interpolate(torch.randn(3, 24, 4, 4, generator=gen), size=(12, 12),
                                            mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    W, d = binary_affinity(feats, 0.15)
    xd, ld = dense_fiedler(W, d)
    normalize_affinity_(W, d)
    xl, ll = lanczos_fiedler(W, d)
    assert torch.allclose(ld, ll, atol=1e-4)
    cos = torch.nn.functional.cosine_similarity(xd * d.sqrt(), xl * d.sqrt(), dim=1).abs()
    assert bool((cos > 0.999).all()), cos
    md, vd = maskcut(feats, (12, 12), solver="dense")
    ml, vl = maskcut(feats, (12, 12), solver="lanczos")
    assert torch.equal(vd, vl)
    inter = (md & ml).flatten(2).sum(-1).float()
    union = (md | ml).flatten(2).sum(-1).float()
    iou = inter[vd] / union[vd]
    assert float(iou.mean()) >= 0.95


def test_batch_results_equal_single_image_results():
    labs = [_blob_labels(), np.rot90(_blob_labels()).copy(), np.ones((16, 16), np.int64)]
    labs[2][1:-1, 1:-1] = 0
    feats = torch.cat([_cluster_feats(lab, seed=i) for i, lab in enumerate(labs)])
    masks, valid = maskcut(feats, (16, 16), n_masks=2)
    for i in range(3):
        mi, vi = maskcut(feats[i : i + 1], (16, 16), n_masks=2)
        assert torch.equal(masks[i], mi[0]) and torch.equal(valid[i], vi[0])


def test_lanczos_fast_with_zeroed_patches():
    # Half the patches zeroed: a huge repeated eigenvalue in the middle of the spectrum must not
    # stop the top pair from converging.
    lab = _blob_labels(20, 20)
    feats = _cluster_feats(lab, seed=6)
    feats[0, :200] = 0
    W, d = binary_affinity(feats, 0.15)
    xd, ld = dense_fiedler(W, d)
    normalize_affinity_(W, d)
    xl, ll = lanczos_fiedler(W, d, max_matvecs=200)
    assert torch.allclose(ld, ll, atol=1e-4)
    cos = torch.nn.functional.cosine_similarity(xd * d.sqrt(), xl * d.sqrt(), dim=1).abs()
    assert float(cos[0]) > 0.999


@pytest.mark.parametrize("solver", SOLVERS)
def test_degenerate_inputs(solver):
    same = torch.ones(2, 64, 8)
    masks, valid = maskcut(same, (8, 8), n_masks=2, solver=solver)
    assert masks.shape == (2, 2, 8, 8) and not bool(valid.any()) and not bool(masks.any())
    zero = torch.zeros(1, 64, 8)
    assert not bool(maskcut(zero, (8, 8), solver=solver)[1].any())
    masks, valid = maskcut(torch.zeros(0, 64, 8), (8, 8), n_masks=3, solver=solver)
    assert masks.shape == (0, 3, 8, 8) and valid.shape == (0, 3)


def test_maskcut_rejects_bad_arguments():
    with pytest.raises(ValueError, match="grid"):
        maskcut(torch.randn(1, 10, 4), (3, 3))
    with pytest.raises(ValueError, match="solver"):
        maskcut(torch.randn(1, 9, 4), (3, 3), solver="eig")


def test_upsample_masks_nearest():
    m = torch.tensor([[[True, False], [False, True]]])
    up = upsample_masks(m, (4, 6))
    assert up.shape == (1, 4, 6) and up.dtype == torch.bool
    assert bool(up[0, :2, :3].all()) and not bool(up[0, :2, 3:].any()) and bool(up[0, 2:, 3:].all())
    assert upsample_masks(torch.zeros(0, 2, 2, dtype=torch.bool), (4, 4)).shape == (0, 4, 4)


def _disk_image(h: int = 96, w: int = 128) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:h, :w]
    disk = (yy - 45) ** 2 + (xx - 60) ** 2 <= 26**2
    img = np.full((h, w, 3), 30, np.uint8)
    img[disk] = (220, 180, 40)
    return img, disk


def test_guided_refinement_snaps_to_edges_and_drops_disagreeing_masks():
    img, disk = _disk_image()
    blocky = upsample_masks(torch.from_numpy(disk[4::8, 4::8]), disk.shape)[None][0]
    line = torch.zeros_like(blocky)
    line[80, 5:120] = True  # a 1-px sliver: the filter erases it -> IoU < 0.5 -> dropped
    out = refine_masks(torch.stack([blocky, line]), img, "guided", radius=6)
    iou = lambda a, b: (a & b).sum() / (a | b).sum()  # noqa: E731
    assert iou(out[0].numpy(), disk) > iou(blocky.numpy(), disk)
    assert not bool(out[1].any())
    assert torch.equal(refine_masks(torch.stack([blocky, line]), img, "none"), torch.stack([blocky, line]))


def test_refine_resolves_overlaps_earlier_wins():
    img, disk = _disk_image()
    a = torch.from_numpy(disk)
    b = torch.zeros_like(a)
    b[20:70, 30:120] = True
    for method in ("guided", "none"):
        out = refine_masks(torch.stack([a, b]), img, method, radius=4)
        assert int(out.sum(0).max()) <= 1
        assert bool(out[0].any()) and bool(out[1].any())
    assert torch.equal(remove_overlaps(torch.stack([a, a])), torch.stack([a, torch.zeros_like(a)]))


def test_mask_descriptors_mean_then_normalise():
    tokens = torch.randn(1, 6, 5, generator=torch.Generator().manual_seed(7))
    masks = torch.zeros(1, 2, 2, 3, dtype=torch.bool)
    masks[0, 0, 0, :2] = True  # patches 0, 1
    desc = mask_descriptors(tokens, masks, (2, 3))
    expect = torch.nn.functional.normalize(tokens[0, :2].mean(0), dim=0)
    assert torch.allclose(desc[0, 0], expect, atol=1e-6)
    assert torch.equal(desc[0, 1], torch.zeros(5))


def test_sample_patch_features_capped_and_deterministic():
    tokens = torch.randn(2, 12, 4, generator=torch.Generator().manual_seed(8))
    a = sample_patch_features(tokens, 5, 3, (3, 4))
    b = sample_patch_features(tokens, 5, 3, (3, 4))
    assert len(a) == 2 and a[0]["feature"].shape == (5, 4) and a[0]["feature"].dtype == np.float32
    assert np.array_equal(a[0]["row"], b[0]["row"]) and np.array_equal(a[0]["col"], b[0]["col"])
    for img in range(2):
        idx = a[img]["row"] * 4 + a[img]["col"]
        assert np.allclose(a[img]["feature"], tokens[img, idx].numpy())
    full = sample_patch_features(tokens, 100, [1, 2], (3, 4))
    assert full[0]["feature"].shape == (12, 4)
    assert sorted((full[1]["row"] * 4 + full[1]["col"]).tolist()) == list(range(12))


def test_process_batch_end_to_end():
    from u2seg.features import build_backbone
    from u2seg.maskcut import ImageResult, process_batch

    model = build_backbone("vit_small_patch8_224.dino", "none", image_size=64, seed=0)
    img_a, _ = _disk_image(72, 96)
    img_b = np.zeros((50, 40, 3), np.uint8)
    img_b[10:30, 5:25] = 255
    kwargs = dict(image_size=64, tau=0.15, n_masks=3, solver="lanczos", refine="guided",
                  patches_per_image=10, amp="bf16", seed=0)
    results = process_batch(model, [img_a, img_b], **kwargs)
    assert len(results) == 2 and all(isinstance(r, ImageResult) for r in results)
    for r, img in zip(results, [img_a, img_b], strict=True):
        assert (r.height, r.width) == img.shape[:2]
        assert set(r.timings) == {"backbone_s", "maskcut_s", "refine_s"}
        assert len(r.patches) == 10 and r.patches[0]["feature"].shape == (384,)
        assert all(0 <= p["row"] < 8 and 0 <= p["col"] < 8 for p in r.patches)
        assert [m["mask_id"] for m in r.masks] == list(range(len(r.masks)))
        union = np.zeros(img.shape[:2], np.int32)
        for m in r.masks:
            assert m["rle"]["size"] == list(img.shape[:2]) and isinstance(m["rle"]["counts"], str)
            assert m["area"] > 0 and len(m["bbox"]) == 4 and 0.0 <= m["score"] <= 1.0
            assert len(m["descriptor"]) == 384
            assert abs(float(np.linalg.norm(m["descriptor"])) - 1.0) < 1e-4
            dec = mask_util.decode({"size": m["rle"]["size"], "counts": m["rle"]["counts"].encode()})
            assert int(dec.sum()) == m["area"]
            union += dec
        assert union.max() <= 1
    # Same image, same result, whatever batch it lands in (per-image patch seeds).
    again = process_batch(model, [img_b], **kwargs)[0]
    assert [p["row"] for p in again.patches] == [p["row"] for p in results[1].patches]
    assert [m["rle"] for m in again.masks] == [m["rle"] for m in results[1].masks]
    assert process_batch(model, [], **kwargs) == []
