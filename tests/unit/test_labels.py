"""Unit tests for u2seg.labels: stuff maps, panoptic merge, COCO encodings, streaming merge."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from u2seg.labels import (
    decode_panoptic_png,
    decode_semantic_png,
    encode_rle,
    instance_annotations,
    merge_coco_parts,
    mode_filter,
    panoptic_annotation,
    panoptic_merge,
    panoptic_png_bytes,
    pseudo_categories,
    segment_stats,
    semantic_png_bytes,
    stuff_ids_from_features,
    stuff_map,
    validate_panoptic,
)
from u2seg.labels import stuff as stuff_module

pytestmark = pytest.mark.unit


# ---------------------------------------------------------------- stuff maps


def test_stuff_ids_use_cosine_not_euclidean() -> None:
    cents = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    # Euclidean-nearest to centroid 1, but pointing along centroid 0.
    feats = np.array([[5.0, 0.5], [0.1, 0.2], [-1.0, 0.0]], dtype=np.float32)
    assert stuff_ids_from_features(feats, cents).tolist() == [0, 1, 1]
    grid = stuff_ids_from_features(feats[:2].reshape(1, 2, 2), cents)
    assert grid.shape == (1, 2) and grid.dtype == np.int32


def test_stuff_map_nearest_blocks_and_grid_forms() -> None:
    cents = np.eye(3, dtype=np.float32)
    ids = np.array([[0, 1], [2, 0]])
    feats = cents[ids] * 3.0  # [h, w, D]
    out = stuff_map(feats, None, cents, (4, 6), smooth=0, upsample="nearest")
    expected = np.repeat(np.repeat(ids, 2, axis=0), 3, axis=1)
    assert out.dtype == np.int32 and out.tolist() == expected.tolist()
    flat = stuff_map(feats.reshape(4, 3).astype(np.float16), (2, 2), cents, (4, 6), smooth=0,
                     upsample="nearest")
    assert np.array_equal(flat, out)
    with pytest.raises(ValueError):
        stuff_map(feats.reshape(4, 3), (3, 2), cents, (4, 6))
    with pytest.raises(ValueError):
        stuff_map(feats, (2, 3), cents, (4, 6))
    with pytest.raises(ValueError):
        stuff_map(feats, None, np.eye(3, 4, dtype=np.float32), (4, 6))


def test_stuff_map_bilinear_boundary_and_anisotropic_size() -> None:
    cents = np.eye(2, dtype=np.float32)
    ids = np.zeros((4, 4), dtype=np.int64)
    ids[:, 2:] = 1
    out = stuff_map(cents[ids], None, cents, (16, 24), smooth=3)
    assert out.shape == (16, 24)
    assert (out[:, :12] == 0).all() and (out[:, 12:] == 1).all()


def test_stuff_map_bilinear_chunking_is_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(5 * 7, 8)).astype(np.float32)
    cents = rng.normal(size=(11, 8)).astype(np.float32)
    whole = stuff_map(feats, (5, 7), cents, (13, 17), smooth=0)
    monkeypatch.setattr(stuff_module, "_FLOAT_BUDGET", 13 * 17 * 3)  # 3 classes per chunk
    chunked = stuff_map(feats, (5, 7), cents, (13, 17), smooth=0)
    assert np.array_equal(whole, chunked)
    assert set(np.unique(whole).tolist()) <= set(range(11)) and len(np.unique(whole)) > 3


def test_mode_filter_handles_large_ids_and_keeps_ties() -> None:
    labels = np.full((7, 7), 70_000, dtype=np.int32)
    labels[3, 3] = 5  # isolated speck
    labels[:, 0] = 65_536
    out = mode_filter(labels, 3)
    assert out[3, 3] == 70_000
    assert (out[:, 0] == 65_536).all()  # a full column at the border: 3 votes + centre beats 3
    stripes = np.array([[1, 2, 3]] * 3, dtype=np.int32)  # every window ties: keep own label
    assert np.array_equal(mode_filter(stripes, 3)[:, 1], stripes[:, 1])
    assert np.array_equal(mode_filter(labels, 1), labels)
    with pytest.raises(ValueError):
        mode_filter(labels, 4)


# ---------------------------------------------------------------- panoptic merge

H, W = 20, 30
K_THINGS, K_STUFF = 4, 3


def _toy_scene() -> tuple[list[np.ndarray], list[int], list[float], np.ndarray]:
    stuff = np.zeros((H, W), dtype=np.int32)
    stuff[:, 15:] = 1
    stuff[0:2, 0:2] = 2  # 4-pixel fragment of stuff 2: below min_stuff_area -> void
    stuff[18:, 25:] = -1  # void in the stuff map
    a = np.zeros((H, W), bool)
    a[5:15, 5:15] = True  # score 0.5
    b = np.zeros((H, W), bool)
    b[10:18, 10:20] = True  # score 0.9, overlaps a: b wins the overlap
    c = np.zeros((H, W), bool)
    c[10:12, 10:12] = True  # inside b, lower score: nothing left -> dropped
    d = np.zeros((H, W), bool)
    d[0:10, 22:26] = True  # score 0.9 like b, later in the list: painted after b (no overlap)
    return [a, b, c, d], [0, 3, 1, 2], [0.5, 0.9, 0.3, 0.9], stuff


def test_panoptic_merge_toy_scene() -> None:
    masks, classes, scores, stuff = _toy_scene()
    res = panoptic_merge(masks, classes, scores, stuff, k_things=K_THINGS, k_stuff=K_STUFF, min_stuff_area=10)
    cats = pseudo_categories(K_THINGS, K_STUFF)
    assert validate_panoptic(res.seg_ids, res.segments_info, categories=cats) == []
    info = {s["id"]: s for s in res.segments_info}
    # Things in paint order: b (0.9), d (0.9, later), a (0.5); c lost every pixel.
    assert [res.thing_sources[s] for s in sorted(res.thing_sources)] == [1, 3, 0]
    seg_b, seg_d, seg_a = sorted(res.thing_sources)
    assert [info[s]["category_id"] for s in (seg_b, seg_d, seg_a)] == [4, 3, 1]
    assert (res.seg_ids[masks[1]] == seg_b).all()
    assert info[seg_b]["area"] == 80 and info[seg_a]["area"] == 100 - 25
    # Stuff: one segment per class even when things split it; the tiny fragment and void are void.
    stuff_cats = sorted(s["category_id"] for s in res.segments_info if s["id"] not in res.thing_sources)
    assert stuff_cats == [K_THINGS + 1, K_THINGS + 2]
    assert (res.seg_ids[0:2, 0:2] == 0).all() and (res.seg_ids[18:, 25:] == 0).all()
    assert (res.seg_ids != 0).sum() == H * W - 4 - 10
    # Semantic map carries category ids with 0 = void.
    assert res.semantic[0, 20] == K_THINGS + 2 and res.semantic[15, 15] == 4 and res.semantic[0, 0] == 0
    assert res.seg_ids.dtype == np.int32 and res.semantic.shape == (H, W)


def test_panoptic_merge_rle_input_and_area_rules() -> None:
    masks, classes, scores, stuff = _toy_scene()
    dense = panoptic_merge(masks, classes, scores, stuff, k_things=K_THINGS, min_stuff_area=10)
    rles = panoptic_merge([encode_rle(m) for m in masks], classes, scores, stuff, k_things=K_THINGS,
                          min_stuff_area=10)
    assert np.array_equal(dense.seg_ids, rles.seg_ids) and dense.segments_info == rles.segments_info
    # Fraction threshold: 4 px fragment survives at 0.005 * 600 = 3 px.
    frac = panoptic_merge(masks, classes, scores, stuff, k_things=K_THINGS, min_stuff_area=0.005)
    assert (frac.seg_ids[0:2, 0:2] != 0).all()
    # A thing below min_thing_area after occlusion is dropped and its pixels fall back to stuff.
    big = panoptic_merge(masks, classes, scores, stuff, k_things=K_THINGS, min_thing_area=76)
    assert sorted(big.thing_sources.values()) == [1]  # a keeps 75 px, d has 40
    assert big.semantic[6, 6] == K_THINGS + 1
    occl = panoptic_merge(masks, classes, scores, stuff, k_things=K_THINGS, max_occluded_fraction=0.2)
    assert 0 not in occl.thing_sources.values()  # a lost 25% of its mask to b
    # Things but no stuff and vice versa.
    only_void = panoptic_merge([], [], [], np.full((4, 4), -1), k_things=2)
    assert only_void.segments_info == [] and not only_void.seg_ids.any()


def test_panoptic_merge_rejects_bad_inputs() -> None:
    masks, classes, scores, stuff = _toy_scene()
    with pytest.raises(ValueError):
        panoptic_merge(masks, [0, 9, 1, 2], scores, stuff, k_things=K_THINGS)
    with pytest.raises(ValueError):
        panoptic_merge(masks, classes, scores, stuff, k_things=K_THINGS, k_stuff=2)
    with pytest.raises(ValueError):
        panoptic_merge([m[:10] for m in masks], classes, scores, stuff, k_things=K_THINGS)
    with pytest.raises(ValueError):
        panoptic_merge(masks, classes[:2], scores, stuff, k_things=K_THINGS)

    with pytest.raises(ValueError, match="thing_order"):
        panoptic_merge(masks, classes, scores, stuff, k_things=K_THINGS, thing_order="mask_area")
    with pytest.raises(ValueError, match="stuff_overlap_drop"):
        panoptic_merge(masks, classes, scores, stuff, k_things=K_THINGS, stuff_overlap_drop=1.5)


# U2Seg's rule (generate_pseudo_panoptic.py); its parity with the reference script is measured in scratch.
U2SEG = {"thing_order": "bbox_area", "stuff_overlap_drop": 0.7, "min_stuff_area": 0, "min_thing_area": 0}


def _box_mask(y0: int, y1: int, x0: int, x1: int, hw: tuple[int, int] = (12, 12)) -> np.ndarray:
    m = np.zeros(hw, bool)
    m[y0:y1, x0:x1] = True
    return m


def test_bbox_area_order_uses_the_box_not_the_mask_area() -> None:
    sparse = np.zeros((12, 12), bool)
    sparse[np.arange(10), np.arange(10)] = True  # diagonal: 10 px, bbox 10x10 = 100
    solid = _box_mask(2, 8, 2, 8)  # 36 px, bbox 36: smaller box, so painted later and wins overlaps
    res = panoptic_merge([solid, sparse], [0, 1], [0.9, 0.1], np.zeros((12, 12), int), k_things=2, **U2SEG)
    by_src = {src: seg for seg, src in res.thing_sources.items()}
    assert res.seg_ids[4, 4] == by_src[0]  # diagonal pixel inside the solid box goes to the solid one
    assert res.seg_ids[0, 0] == by_src[1] and res.seg_ids[9, 9] == by_src[1]
    assert by_src[1] < by_src[0]  # ids in paint order: larger bbox first
    # Mask area would rank them the other way round, and so does score here.
    assert panoptic_merge([solid, sparse], [0, 1], [0.9, 0.1], np.zeros((12, 12), int), k_things=2,
                          min_stuff_area=0).seg_ids[4, 4] == 1
    # Only the box matters, not where the mask is inside it: hollow frame vs solid 6x6.
    frame = _box_mask(0, 7, 0, 7) & ~_box_mask(1, 6, 1, 6)  # 24 px, bbox 49
    res2 = panoptic_merge([frame, _box_mask(0, 6, 0, 6)], [0, 1], None, np.zeros((12, 12), int), k_things=2,
                          **U2SEG)
    assert res2.semantic[0, 0] == 2  # the solid 6x6 (bbox 36 < 49) is painted later and wins (0, 0)
    assert res2.semantic[6, 6] == 1


def test_bbox_area_smaller_overwrites_and_fully_covered_thing_is_dropped() -> None:
    big = _box_mask(0, 10, 0, 10)
    left, right = _box_mask(0, 10, 0, 5), _box_mask(0, 10, 5, 10)  # together cover big exactly
    small = _box_mask(3, 6, 3, 6)
    res = panoptic_merge([small, big], [0, 1], None, np.zeros((12, 12), int), k_things=3, **U2SEG)
    info = {s["id"]: s for s in res.segments_info}
    by_src = {src: seg for seg, src in res.thing_sources.items()}
    assert info[by_src[0]]["area"] == 9 and info[by_src[1]]["area"] == 100 - 9
    assert (res.seg_ids[3:6, 3:6] == by_src[0]).all()
    lost = panoptic_merge([big, left, right, small], [2, 0, 1, 0], None, np.zeros((12, 12), int), k_things=3,
                          **U2SEG)
    assert sorted(lost.thing_sources.values()) == [1, 2, 3]  # big (input 0) kept no pixel
    assert 3 not in [s["category_id"] for s in lost.segments_info]
    assert not (lost.semantic == 3).any() and (lost.seg_ids[:10, :10] > 0).all()
    assert [s["id"] for s in lost.segments_info] == [1, 2, 3, 4]  # dense ids, stuff after things


def test_bbox_area_ties_keep_input_order_later_overwrites() -> None:
    a, b = _box_mask(0, 4, 0, 6), _box_mask(2, 6, 3, 9)  # both 4x6 = 24
    res = panoptic_merge([a, b], [0, 1], None, np.zeros((12, 12), int), k_things=2, **U2SEG)
    assert res.semantic[3, 4] == 2  # overlap: b painted after a
    res_swapped = panoptic_merge([b, a], [1, 0], None, np.zeros((12, 12), int), k_things=2, **U2SEG)
    assert res_swapped.semantic[3, 4] == 1
    assert [res.thing_sources[s] for s in sorted(res.thing_sources)] == [0, 1]


def test_stuff_overlap_drop_threshold_is_strict_and_uses_all_class_pixels() -> None:
    stuff = np.zeros((10, 10), int)
    stuff[:, 5:] = 1  # class 0: the left 50 px
    for covered, dropped in ((7, False), (8, True)):  # 35/50 = 0.7 exactly (kept), 40/50 = 0.8 (skipped)
        thing = _box_mask(0, covered, 0, 5, (10, 10))
        res = panoptic_merge([thing], [0], None, stuff, k_things=1, **U2SEG)
        stuff_cats = [s["category_id"] for s in res.segments_info if s["id"] not in res.thing_sources]
        assert stuff_cats == ([3] if dropped else [2, 3]), covered  # stuff s -> k_things + 1 + s
        free_left = res.seg_ids[covered:, :5]
        assert (free_left == 0).all() == dropped
        assert (res.seg_ids[:, 5:] > 0).all()
    # The same image with the score order: the rule is independent of thing_order.
    thing = _box_mask(0, 8, 0, 5, (10, 10))
    assert (panoptic_merge([thing], [0], [1.0], stuff, k_things=1, min_stuff_area=0,
                           stuff_overlap_drop=0.7).seg_ids[8:, :5] == 0).all()
    # Without the rule the 10 free pixels are the class's segment.
    assert (panoptic_merge([thing], [0], [1.0], stuff, k_things=1, min_stuff_area=0).seg_ids[8:, :5] > 0).all()
    # Only kept things count as covering: a thing dropped by min_thing_area does not hide stuff.
    kept = panoptic_merge([thing], [0], None, stuff, k_things=1, thing_order="bbox_area", stuff_overlap_drop=0.7,
                          min_stuff_area=0, min_thing_area=41)
    assert kept.thing_sources == {} and (kept.semantic[:, :5] == 2).all()


def test_bbox_area_filters_hand_pixels_to_the_thing_below() -> None:
    big, small = _box_mask(0, 10, 0, 10), _box_mask(3, 6, 3, 6)
    res = panoptic_merge([big, small], [0, 1], None, np.zeros((12, 12), int), k_things=2, thing_order="bbox_area",
                         min_thing_area=10, min_stuff_area=0)
    assert list(res.thing_sources.values()) == [0] and (res.semantic[:10, :10] == 1).all()
    occl = panoptic_merge([big, small], [0, 1], None, np.zeros((12, 12), int), k_things=2,
                          thing_order="bbox_area", max_occluded_fraction=0.05, min_stuff_area=0, min_thing_area=0)
    assert list(occl.thing_sources.values()) == [1]  # big lost 9% of its mask to small
    assert (occl.semantic[:10, :10] == np.where(small[:10, :10], 2, 3)).all()


# ---------------------------------------------------------------- PNGs


def test_panoptic_png_round_trip_uses_panopticapi_colors() -> None:
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 256**3, size=(9, 11)).astype(np.int32)
    ids[0, 0], ids[0, 1] = 0, 256**3 - 1
    data = panoptic_png_bytes(ids)
    assert np.array_equal(decode_panoptic_png(data), ids)
    rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int64)
    assert np.array_equal(rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2], ids)
    with pytest.raises(ValueError):
        panoptic_png_bytes(np.full((2, 2), 256**3))
    with pytest.raises(ValueError):
        decode_panoptic_png(semantic_png_bytes(np.zeros((2, 2), np.int32)))


def test_semantic_png_depth() -> None:
    small = np.array([[0, 5], [255, 1]], dtype=np.int32)
    big = np.array([[0, 827], [300, 1]], dtype=np.int32)
    for sem, depth in ((small, np.uint8), (big, np.uint16)):
        data = semantic_png_bytes(sem)
        assert np.asarray(Image.open(io.BytesIO(data))).dtype.itemsize == np.dtype(depth).itemsize
        assert np.array_equal(decode_semantic_png(data), sem)
    forced = semantic_png_bytes(small, num_categories=827)
    assert np.asarray(Image.open(io.BytesIO(forced))).dtype.itemsize == 2
    with pytest.raises(ValueError):
        semantic_png_bytes(big, num_categories=200)
    with pytest.raises(ValueError):
        semantic_png_bytes(np.array([[-1]]))


# ---------------------------------------------------------------- validate_panoptic


def _valid_label() -> tuple[np.ndarray, list[dict]]:
    masks, classes, scores, stuff = _toy_scene()
    res = panoptic_merge(masks, classes, scores, stuff, k_things=K_THINGS, min_stuff_area=10)
    return res.seg_ids, res.segments_info


def _drop_first(seg_ids, info):
    return seg_ids, info[1:]


def _add_ghost(seg_ids, info):
    return seg_ids, [*info, {**info[0], "id": 999}]


def _bad_area(seg_ids, info):
    return seg_ids, [{**info[0], "area": info[0]["area"] + 1}, *info[1:]]


def _bad_bbox(seg_ids, info):
    return seg_ids, [{**info[0], "bbox": [0, 0, 1, 1]}, *info[1:]]


def _duplicate_id(seg_ids, info):
    return seg_ids, [*info, dict(info[0])]


def _zero_category(seg_ids, info):
    return seg_ids, [{**info[0], "category_id": 0}, *info[1:]]


def _unknown_category(seg_ids, info):
    return seg_ids, [{**info[0], "category_id": K_THINGS + K_STUFF + 1}, *info[1:]]


def _stuff_twice(seg_ids, info):
    stuff = [s for s in info if s["category_id"] > K_THINGS]
    return seg_ids, [{**s, "category_id": stuff[0]["category_id"]} if s is stuff[1] else s for s in info]


def _bad_crowd(seg_ids, info):
    return seg_ids, [{**info[0], "iscrowd": 2}, *info[1:]]


def _missing_key(seg_ids, info):
    return seg_ids, [{k: v for k, v in info[0].items() if k != "bbox"}, *info[1:]]


def _void_listed(seg_ids, info):
    return seg_ids, [*info, {**info[0], "id": 0}]


def _float_map(seg_ids, info):
    return seg_ids.astype(np.float32), info


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (_drop_first, "not in segments_info"),
        (_add_ghost, "no pixels"),
        (_bad_area, "area"),
        (_bad_bbox, "bbox"),
        (_duplicate_id, "more than once"),
        (_zero_category, "not positive"),
        (_unknown_category, "unknown category"),
        (_stuff_twice, "already has segment"),
        (_bad_crowd, "iscrowd"),
        (_missing_key, "missing keys"),
        (_void_listed, "0 is void"),
        (_float_map, "integer"),
    ],
)
def test_validate_panoptic_catches(mutate, needle: str) -> None:
    seg_ids, info = _valid_label()
    assert validate_panoptic(seg_ids, info, categories=pseudo_categories(K_THINGS, K_STUFF)) == []
    problems = validate_panoptic(*mutate(seg_ids, info), categories=pseudo_categories(K_THINGS, K_STUFF))
    assert problems and any(needle in p for p in problems), problems


def test_segment_stats_matches_pixels() -> None:
    seg = np.zeros((6, 8), np.int32)
    seg[1:3, 2:7] = 5_000_000
    seg[5, 0] = 7
    assert segment_stats(seg) == {7: (1, [0, 5, 1, 1]), 5_000_000: (10, [2, 1, 5, 2])}


# ---------------------------------------------------------------- COCO instances / categories


def test_pseudo_categories_layout() -> None:
    cats = pseudo_categories(3, 2)
    assert [c["id"] for c in cats] == [1, 2, 3, 4, 5]
    assert [c["isthing"] for c in cats] == [1, 1, 1, 0, 0]
    assert [c["name"] for c in cats] == ["thing_0", "thing_1", "thing_2", "stuff_0", "stuff_1"]
    assert all(len(c["color"]) == 3 and all(0 <= v <= 255 for v in c["color"]) for c in cats)
    assert len({tuple(c["color"]) for c in cats}) == 5


def test_instances_load_in_pycocotools(tmp_path) -> None:
    masks, classes, scores, _ = _toy_scene()
    masks.append(np.zeros((H, W), bool))  # empty mask: skipped
    classes, scores = [*classes, 0], [*scores, 0.1]
    anns = instance_annotations(7, masks[:2], classes[:2], scores[:2], start_ann_id=10)
    anns += instance_annotations(7, [encode_rle(m) for m in masks[2:]], classes[2:], scores[2:],
                                 start_ann_id=10 + len(anns))
    assert [a["id"] for a in anns] == [10, 11, 12, 13]
    assert all(isinstance(a["segmentation"]["counts"], str) for a in anns)
    doc = {"images": [{"id": 7, "file_name": "x.jpg", "height": H, "width": W}],
           "annotations": anns, "categories": pseudo_categories(K_THINGS, K_STUFF)}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(doc))
    coco = COCO(str(path))
    for ann, mask, cls in zip(anns, masks[:4], classes[:4], strict=True):
        loaded = coco.loadAnns(ann["id"])[0]
        assert np.array_equal(coco.annToMask(loaded).astype(bool), mask)
        assert loaded["category_id"] == cls + 1 and loaded["area"] == int(mask.sum())
    assert anns[1]["bbox"] == [10.0, 10.0, 10.0, 8.0] and anns[1]["score"] == pytest.approx(0.9)


def test_panoptic_annotation_shape() -> None:
    _, info = _valid_label()
    ann = panoptic_annotation(3, "3.png", info)
    assert ann == {"image_id": 3, "file_name": "3.png", "segments_info": info}
    assert ann["segments_info"][0] is not info[0]


# ---------------------------------------------------------------- streaming merge


def _instance_part(part: int) -> str:
    masks, classes, scores, _ = _toy_scene()
    images, anns = [], []
    for j in range(2):
        image_id = part * 10 + j
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "height": H, "width": W})
        anns += instance_annotations(image_id, masks, classes, scores, start_ann_id=1 + len(anns))
    return json.dumps({"images": images, "annotations": anns})


def test_merge_coco_parts_unique_ids_and_pycocotools(tmp_path) -> None:
    texts = [_instance_part(p) for p in range(3)]
    assert json.loads(texts[0])["annotations"][0]["id"] == json.loads(texts[1])["annotations"][0]["id"]
    header = {"info": {"description": "pseudo"}, "categories": pseudo_categories(K_THINGS, K_STUFF)}
    path = tmp_path / "instances.json"
    with open(path, "w") as out:
        counts = merge_coco_parts(lambda: iter(texts), header, out)
    assert counts == {"parts": 3, "images": 6, "annotations": 6 * 4}
    coco = COCO(str(path))
    ids = coco.getAnnIds()
    assert sorted(ids) == list(range(1, 25))
    assert sorted(coco.getImgIds()) == [0, 1, 10, 11, 20, 21]
    ann = coco.loadAnns(coco.getAnnIds(imgIds=[21]))[1]
    assert np.array_equal(coco.annToMask(ann).astype(bool), _toy_scene()[0][1])
    # Binary file objects (fsspec "wb") get the same bytes.
    buf = io.BytesIO()
    merge_coco_parts(texts, header, buf)
    assert buf.getvalue().decode("utf-8") == path.read_text()


def test_merge_coco_parts_panoptic_and_errors() -> None:
    _, info = _valid_label()
    parts = [{"images": [{"id": i, "file_name": f"{i}.jpg", "height": H, "width": W}],
              "annotations": [panoptic_annotation(i, f"{i}.png", info)]} for i in range(3)]
    out = io.StringIO()
    merge_coco_parts(lambda: iter(parts), {"categories": pseudo_categories(K_THINGS, K_STUFF)}, out)
    merged = json.loads(out.getvalue())
    assert [a["segments_info"] for a in merged["annotations"]] == [info] * 3  # per-image ids untouched
    assert list(merged) == ["categories", "images", "annotations"]
    with pytest.raises(TypeError):
        merge_coco_parts(iter(parts), {}, io.StringIO())
    with pytest.raises(ValueError, match="more than one"):
        merge_coco_parts([parts[0], parts[0]], {}, io.StringIO())
    with pytest.raises(ValueError, match="unknown image"):
        merge_coco_parts([{"images": [], "annotations": parts[0]["annotations"]}], {}, io.StringIO())
    with pytest.raises(ValueError, match="header"):
        merge_coco_parts(parts, {"images": []}, io.StringIO())
    local = [json.loads(_instance_part(p)) for p in range(2)]
    with pytest.raises(ValueError, match="duplicate annotation id"):
        merge_coco_parts(local, {}, io.StringIO(), renumber_annotations=False)
