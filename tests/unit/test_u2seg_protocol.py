"""U2Seg's evaluation protocol (many-to-one vote mapping) and the stuff-supercategory ground truth."""

import json

import numpy as np
import pytest

from u2seg.evaluate.matching import Confusion, OverlapAccumulator
from u2seg.evaluate.pq import PanopticImage, pq_from_arrays
from u2seg.evaluate.semantic import semantic_metrics
from u2seg.evaluate.supercategory import (
    relabel_segments,
    remap_panoptic_image,
    supercategory_categories,
    write_supercategory_set,
)
from u2seg.evaluate.u2seg_protocol import (
    box_iou_xywh,
    collapse_confusion,
    collapse_things,
    combine_mappings,
    inplace_semantic_mapping,
    stuff_votes,
    thing_votes,
    thing_votes_coco,
    u2seg_inplace_semantic_mapping,
    vote_mapping,
)
from u2seg.labels import decode_panoptic_png, panoptic_png_bytes

pytestmark = pytest.mark.unit

BOX = [0.0, 0.0, 10.0, 10.0]


# ----------------------------------------------------------------------------- things


def test_box_iou_matches_hand_values():
    iou = box_iou_xywh([[0, 0, 8, 10], [20, 20, 5, 5]], [BOX, [0, 0, 5, 10]])
    assert iou[0, 0] == pytest.approx(0.8) and iou[0, 1] == pytest.approx(50 / 80)
    assert iou[1].tolist() == [0.0, 0.0]
    assert box_iou_xywh(np.zeros((0, 4)), [BOX]).shape == (0, 1)


def test_thing_votes_score_and_iou_thresholds_are_inclusive_and_strict():
    # score 0.6 votes (>=), 0.59 does not; IoU exactly 0.7 does not vote (>), 0.8 does
    votes = thing_votes([[0, 0, 8, 10], [0, 0, 8, 10], [0, 0, 7, 10]], [0.6, 0.59, 0.99], [1, 2, 3],
                        [BOX], [18])
    assert dict(votes) == {(1, 18): 1}


def test_thing_votes_one_detection_votes_for_every_gt_box_above_iou():
    votes = thing_votes([BOX], [0.9], [4], [BOX, [0, 0, 10, 9], [30, 30, 4, 4]], [1, 2, 3])
    assert dict(votes) == {(4, 1): 1, (4, 2): 1}


def test_vote_mapping_majority_ties_many_to_one_and_unmatched():
    votes = {(0, 5): 2, (0, 3): 1,  # cluster 0 overlaps two classes: the larger vote wins
             (1, 7): 1, (1, 2): 1,  # tie: lowest gt id
             (2, 5): 1}  # a second cluster on class 5 is allowed
    vm = vote_mapping(votes, pseudo_ids=range(4))
    assert vm.mapping == {0: 5, 1: 2, 2: 5}
    assert vm.unmatched == [3]  # declared, never voted: unmapped (U2Seg's -1)
    rec = json.loads(json.dumps(vm.to_dict()))
    assert rec["mapping"] == {"0": 5, "1": 2, "2": 5}
    assert rec["winning_votes"] == {"0": 2, "1": 1, "2": 1} and rec["cluster_votes"]["0"] == 3
    assert rec["unmatched"] == [3]
    # the same from an accumulator and from a Confusion
    acc = OverlapAccumulator()
    acc.add_pairs(votes)
    assert vote_mapping(acc, pseudo_ids=[3]).mapping == vm.mapping
    assert vote_mapping(acc.result(), pseudo_ids=[3]).unmatched == [3]


def test_thing_votes_coco_counts_crowd_boxes_and_skips_other_images():
    gt = {"images": [{"id": 1}, {"id": 2}],
          "annotations": [{"image_id": 1, "bbox": BOX, "category_id": 7, "iscrowd": 1},
                          {"image_id": 2, "bbox": BOX, "category_id": 8, "iscrowd": 0},
                          {"image_id": 2, "bbox": [50, 50, 10, 10], "category_id": 9, "iscrowd": 0}]}
    preds = [{"image_id": 1, "bbox": BOX, "score": 0.9, "category_id": 0},
             {"image_id": 2, "bbox": [0, 0, 10, 9], "score": 0.7, "category_id": 0},
             {"image_id": 2, "bbox": [50, 50, 10, 10], "score": 0.5, "category_id": 1},  # low score
             {"image_id": 3, "bbox": BOX, "score": 0.9, "category_id": 2}]  # no gt image
    acc = thing_votes_coco(gt, preds)
    assert dict(acc.pairs) == {(0, 7): 1, (0, 8): 1}
    vm = vote_mapping(acc, pseudo_ids=range(3))
    assert vm.mapping == {0: 7} and vm.unmatched == [1, 2]
    with pytest.raises(ValueError, match="bbox"):
        thing_votes_coco(gt, [{"image_id": 1, "category_id": 0, "score": 1.0}])


def test_thing_votes_rejects_bad_inputs():
    with pytest.raises(ValueError, match="differ in number"):
        thing_votes([BOX], [0.9, 0.8], [1], [BOX], [1])
    with pytest.raises(ValueError, match="xywh"):
        thing_votes([[0, 0, 1]], [0.9], [1], [BOX], [1])


# ----------------------------------------------------------------------------- stuff


def test_stuff_votes_count_images_not_pixels():
    # image 1: cluster 1 covers all of class 10 (big); images 2 and 3: class 20 at IoU 0.25 (small)
    a_pred = np.ones((4, 4), int)
    a_gt = np.full((4, 4), 10)
    b_pred = np.array([[1, 1, 2, 2]] * 4)
    b_gt = np.array([[20, 9, 9, 9]] * 4)  # 9 = gt ignore: no vote, but its pixels are in the union
    acc = OverlapAccumulator()
    for p, g in ((a_pred, a_gt), (b_pred, b_gt), (b_pred, b_gt)):
        acc.add_pairs(stuff_votes(p, g, gt_ignore=[9]))
    assert dict(acc.pairs) == {(1, 10): 1, (1, 20): 2}
    assert vote_mapping(acc).mapping == {1: 20}  # pixel overlap would say 10 (16 px vs 8 px)


def test_stuff_votes_iou_strictly_above_threshold_and_ignored_classes():
    # cluster 1: 20 pixels; class 5: 3 of them -> IoU 3/20 = 0.15 exactly: no vote; class 6: 4 -> 0.2
    pred = np.ones((4, 5), int)
    gt = np.zeros((4, 5), int)
    gt.flat[:3] = 5
    gt.flat[3:7] = 6
    assert dict(stuff_votes(pred, gt, gt_ignore=[0])) == {(1, 6): 1}
    # the ignored "things" class neither casts (pred) nor receives (gt) votes
    assert dict(stuff_votes(pred, gt, pred_ignore=[1])) == {}
    assert dict(stuff_votes(pred, np.zeros_like(gt), gt_ignore=[0])) == {}
    with pytest.raises(ValueError, match="shape"):
        stuff_votes(pred, gt[:2])


def test_combine_mappings_and_collapse_things():
    m = combine_mappings({1: 3}, {10: 301}, extra={0: 0})
    assert m == {1: 3, 10: 301, 0: 0}
    with pytest.raises(ValueError, match="mapped twice"):
        combine_mappings({1: 3}, {1: 301})
    cat = np.array([[0, 3, 301], [5, 5, 302]])
    assert collapse_things(cat, [3, 5], 999).tolist() == [[0, 999, 301], [999, 999, 302]]


def test_u2seg_inplace_relabel_chains_through_later_keys():
    # in place, key by key: cluster 1 -> 3, then key 3 relabels those pixels again -> 2
    assert u2seg_inplace_semantic_mapping({1: 3, 3: 2, 0: 0}, n_clusters=3, ignore_label=16) == {0: 0, 1: 2, 3: 2}
    # unmapped clusters go to the ignore label (4), which key 4 relabels -> 2; cluster 5 comes after key 4
    # and stays unmapped
    assert u2seg_inplace_semantic_mapping({4: 2}, n_clusters=5, ignore_label=4) == {0: 0, 1: 2, 2: 2, 3: 2, 4: 2}
    # no chain when every target is a processed or non-key label
    assert u2seg_inplace_semantic_mapping({2: 1, 3: 1}, n_clusters=3, ignore_label=16) == {0: 0, 2: 1, 3: 1}
    with pytest.raises(ValueError, match="outside"):
        u2seg_inplace_semantic_mapping({7: 1}, n_clusters=3, ignore_label=16)


def test_collapse_confusion_equals_collapsing_the_maps_image_by_image():
    rng = np.random.default_rng(0)
    pred = rng.choice([0, 1, 2, 5, 6], size=(2, 9, 9))  # pred things 1, 2; stuff 5, 6; 0 void
    gt = rng.choice([0, 3, 4, 7, 8], size=(2, 9, 9))  # gt things 3, 4; stuff 7, 8
    full = OverlapAccumulator()
    collapsed = OverlapAccumulator(pred_void=100, gt_void=100)  # void moved to 100: "things" is 0
    for p, g in zip(pred, gt, strict=True):
        full.add(p, g)
        collapsed.add(np.where(p == 0, 100, collapse_things(p, [1, 2], 0)),
                      np.where(g == 0, 100, collapse_things(g, [3, 4], 0)))
    got, ref = collapse_confusion(full.result(), [1, 2], [3, 4]), collapsed.result()
    assert got.pred_ids.tolist() == ref.pred_ids.tolist() == [0, 5, 6]
    assert got.gt_ids.tolist() == ref.gt_ids.tolist() == [0, 7, 8]
    assert got.counts.tolist() == ref.counts.tolist() and got.unassigned.tolist() == ref.unassigned.tolist()
    with pytest.raises(ValueError, match="non-thing"):
        collapse_confusion(full.result(), [1, 2], [3, 4], things_id=5)


def test_inplace_semantic_mapping_in_our_ids():
    # pseudo stuff 12, 13, 14 are U2Seg's clusters 1, 2, 3; gt stuff 301, 302 its labels 1, 2; ignore 3
    mapping = {12: 302, 13: 301, 14: 301}  # cluster 1 -> label 2, which key 2 (cluster 13) relabels -> 1
    assert inplace_semantic_mapping(mapping, pred_stuff_ids=[14, 12, 13], gt_stuff_ids=[302, 301]) == \
        {12: 301, 13: 301, 14: 301, 0: 0}
    # no chain when no label is a later key
    assert inplace_semantic_mapping({12: 301, 13: 301, 14: 302}, pred_stuff_ids=[12, 13, 14],
                                    gt_stuff_ids=[301, 302]) == {12: 301, 13: 301, 14: 302, 0: 0}
    # an unmapped cluster goes to the ignore label 3 = the key of cluster 14, which relabels it
    assert inplace_semantic_mapping({14: 302}, pred_stuff_ids=[12, 13, 14], gt_stuff_ids=[301, 302]) == \
        {12: 302, 13: 302, 14: 302, 0: 0}
    with pytest.raises(ValueError, match="pseudo stuff"):
        inplace_semantic_mapping({99: 301}, pred_stuff_ids=[12], gt_stuff_ids=[301])
    with pytest.raises(ValueError, match="gt stuff"):
        inplace_semantic_mapping({12: 999}, pred_stuff_ids=[12], gt_stuff_ids=[301])


# ----------------------------------------------------------------------------- scorers, U2Seg style


def test_semantic_metrics_u2seg_ignores_unmapped_pixels_and_averages_gt_classes():
    # rows: pred 10 (-> gt 0), 11 (-> gt 1), 12 (-> gt 2, a class absent from gt), 13 (unmapped)
    conf = Confusion(np.array([10, 11, 12, 13]), np.array([0, 1, 2]),
                     np.array([[3, 1, 0], [0, 2, 0], [0, 1, 0], [2, 2, 0]]), np.array([1, 0, 0]))
    mapping = {10: 0, 11: 1, 12: 2}
    strict = semantic_metrics(conf, mapping)
    # default: unmapped + void pred pixels are misses; class 2 (pred only) counts with IoU 0
    assert strict["per_class"][0]["iou"] == pytest.approx(3 / 7)  # gt 3+2+1, pred 4, tp 3
    assert strict["n_classes"] == 3 and strict["pixel_accuracy"] == pytest.approx(5 / 12)
    u2 = semantic_metrics(conf, mapping, unmapped="ignore", average="gt")
    # U2Seg: unmapped/void pred pixels are scored nowhere; classes without gt pixels are not averaged
    assert u2["per_class"][0]["iou"] == pytest.approx(3 / 4)  # gt 3, pred 4, tp 3
    assert u2["per_class"][1]["iou"] == pytest.approx(2 / 4)  # gt 4, pred 2, tp 2
    assert u2["n_classes"] == 2 and u2["miou"] == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert u2["pixel_accuracy"] == pytest.approx(5 / 7)
    with pytest.raises(ValueError, match="unmapped"):
        semantic_metrics(conf, mapping, unmapped="drop")


def _stuff_cats():
    return [{"id": 1, "isthing": 1}, {"id": 301, "isthing": 0}]


def test_pq_without_stuff_merge_keeps_two_segments_of_one_class_apart():
    gt = PanopticImage(np.full((4, 4), 7), [{"id": 7, "category_id": 301, "iscrowd": 0}])
    ids = np.full((4, 4), 1)
    ids[3] = 2  # segment 1: 12 px (cluster 21), segment 2: 4 px (cluster 22), both -> class 301
    pred = PanopticImage(ids, [{"id": 1, "category_id": 21}, {"id": 2, "category_id": 22}])
    many = {21: 301, 22: 301}
    merged = pq_from_arrays([(gt, pred)], categories=_stuff_cats(), mapping=many)
    assert merged["Stuff"]["pq"] == pytest.approx(1.0)
    apart = pq_from_arrays([(gt, pred)], categories=_stuff_cats(), mapping=many, merge_stuff=False)
    st = apart["per_class"][301]
    assert (st["tp"], st["fp"], st["fn"]) == (1, 1, 0)
    assert apart["Stuff"]["pq"] == pytest.approx(0.75 / 1.5)
    # one-to-one: both settings agree
    one = {21: 301}
    assert pq_from_arrays([(gt, pred)], categories=_stuff_cats(), mapping=one) == \
        pq_from_arrays([(gt, pred)], categories=_stuff_cats(), mapping=one, merge_stuff=False)


# ----------------------------------------------------------------------------- supercategories

# COCO panoptic stuff categories (id, supercategory) and U2Seg's hard-coded supercategory index of each
COCO_STUFF = [
    (92, "textile", 1), (93, "textile", 1), (95, "building", 2), (100, "raw-material", 3),
    (107, "furniture-stuff", 4), (109, "textile", 1), (112, "furniture-stuff", 4), (118, "floor", 5),
    (119, "plant", 6), (122, "food-stuff", 7), (125, "ground", 8), (128, "building", 2),
    (130, "furniture-stuff", 4), (133, "furniture-stuff", 4), (138, "structural", 9), (141, "textile", 1),
    (144, "ground", 8), (145, "ground", 8), (147, "ground", 8), (148, "water", 10), (149, "ground", 8),
    (151, "building", 2), (154, "ground", 8), (155, "water", 10), (156, "furniture-stuff", 4),
    (159, "ground", 8), (161, "furniture-stuff", 4), (166, "building", 2), (168, "textile", 1),
    (171, "wall", 11), (175, "wall", 11), (176, "wall", 11), (177, "wall", 11), (178, "water", 10),
    (180, "window", 12), (181, "window", 12), (184, "plant", 6), (185, "structural", 9),
    (186, "ceiling", 13), (187, "sky", 14), (188, "furniture-stuff", 4), (189, "furniture-stuff", 4),
    (190, "floor", 5), (191, "ground", 8), (192, "solid", 15), (193, "plant", 6), (194, "ground", 8),
    (195, "raw-material", 3), (196, "food-stuff", 7), (197, "building", 2), (198, "solid", 15),
    (199, "wall", 11), (200, "textile", 1)]


def test_supercategory_ids_reproduce_u2seg_table_on_coco():
    cats = [{"id": 1, "name": "person", "supercategory": "person", "isthing": 1}]
    cats += [{"id": i, "name": f"s{i}", "supercategory": s, "isthing": 0} for i, s, _ in reversed(COCO_STUFF)]
    new, old_to_new = supercategory_categories(cats)
    assert old_to_new == {1: 1, **{i: 300 + k for i, _, k in COCO_STUFF}}
    assert [c["id"] for c in new] == [1, *range(301, 316)]
    assert [c["name"] for c in new[1:]] == ["textile", "building", "raw-material", "furniture-stuff", "floor",
                                            "plant", "food-stuff", "ground", "structural", "water", "wall",
                                            "window", "ceiling", "sky", "solid"]
    assert all(c["isthing"] == 0 for c in new[1:]) and new[0]["name"] == "person"


def test_supercategory_categories_rejects_bad_tables():
    with pytest.raises(ValueError, match="repeated"):
        supercategory_categories([{"id": 1, "isthing": 1}, {"id": 1, "isthing": 1}])
    with pytest.raises(ValueError, match="supercategory"):
        supercategory_categories([{"id": 92, "isthing": 0}])
    with pytest.raises(ValueError, match="collide"):
        supercategory_categories([{"id": 5, "isthing": 1}, {"id": 92, "isthing": 0, "supercategory": "x"}],
                                 offset=3)
    with pytest.raises(ValueError, match="isthing"):
        supercategory_categories([{"id": 5}])


CATS = [{"id": 1, "name": "person", "supercategory": "person", "isthing": 1, "color": [1, 2, 3]},
        {"id": 171, "name": "wall-brick", "supercategory": "wall", "isthing": 0, "color": [4, 5, 6]},
        {"id": 187, "name": "sky", "supercategory": "sky", "isthing": 0, "color": [7, 8, 9]},
        {"id": 199, "name": "wall-other", "supercategory": "wall", "isthing": 0, "color": [0, 0, 0]}]


def _image_a():
    ids = np.array([[5, 5, 6, 6], [5, 5, 6, 6], [9, 9, 8, 0], [3, 4, 8, 0]])
    segs = [{"id": 5, "category_id": 171, "iscrowd": 0, "area": 4, "bbox": [0, 0, 2, 2]},
            {"id": 6, "category_id": 199, "iscrowd": 0, "area": 4, "bbox": [2, 0, 2, 2]},
            {"id": 9, "category_id": 187, "iscrowd": 0, "area": 2, "bbox": [0, 2, 2, 1]},
            {"id": 8, "category_id": 199, "iscrowd": 0, "area": 2, "bbox": [2, 2, 1, 2]},
            {"id": 3, "category_id": 1, "iscrowd": 0, "area": 1, "bbox": [0, 3, 1, 1]},
            {"id": 4, "category_id": 1, "iscrowd": 0, "area": 1, "bbox": [1, 3, 1, 1]}]
    return ids, segs


def test_remap_relabels_only_by_default_and_merges_on_request():
    new, old_to_new = supercategory_categories(CATS)
    assert old_to_new == {1: 1, 171: 301, 187: 302, 199: 301}
    assert new[1] == {"id": 301, "name": "wall", "supercategory": "wall", "isthing": 0, "color": [4, 5, 6]}
    ids, segs = _image_a()
    same_ids, out = remap_panoptic_image(ids, segs, old_to_new, new)
    assert same_ids is ids  # U2Seg: PNG untouched, three gt "wall" segments stay apart
    assert [(s["id"], s["category_id"]) for s in out] == [(5, 301), (6, 301), (9, 302), (8, 301), (3, 1), (4, 1)]
    assert segs[0]["category_id"] == 171  # input not mutated
    merged_ids, merged = remap_panoptic_image(ids, segs, old_to_new, new, merge_stuff=True)
    # walls 5, 6, 8 -> 5 (lowest id); things 3, 4 stay separate instances
    assert merged_ids.tolist() == [[5, 5, 5, 5], [5, 5, 5, 5], [9, 9, 5, 0], [3, 4, 5, 0]]
    assert [(s["id"], s["category_id"]) for s in merged] == [(5, 301), (9, 302), (3, 1), (4, 1)]
    assert merged[0]["area"] == 10 and merged[0]["bbox"] == [0, 0, 4, 4]
    assert ids[0, 2] == 6  # input array not mutated
    with pytest.raises(ValueError, match="old_to_new"):
        relabel_segments([{"id": 1, "category_id": 42}], old_to_new, new)


def test_write_supercategory_set_two_images(tmp_path):
    ids_a, segs_a = _image_a()
    ids_b = np.array([[2, 2], [7, 7]])
    segs_b = [{"id": 2, "category_id": 187, "iscrowd": 0, "area": 2, "bbox": [0, 0, 2, 1]},
              {"id": 7, "category_id": 1, "iscrowd": 1, "area": 2, "bbox": [0, 1, 2, 1]}]
    (tmp_path / "pan").mkdir()
    (tmp_path / "pan" / "a.png").write_bytes(panoptic_png_bytes(ids_a))
    (tmp_path / "pan" / "b.png").write_bytes(panoptic_png_bytes(ids_b))
    src = {"info": {"v": 1}, "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
           "annotations": [{"image_id": 1, "file_name": "a.png", "segments_info": segs_a},
                           {"image_id": 2, "file_name": "b.png", "segments_info": segs_b}],
           "categories": CATS}
    (tmp_path / "pan.json").write_text(json.dumps(src))
    stats = write_supercategory_set(str(tmp_path / "pan.json"), str(tmp_path / "pan"), str(tmp_path / "sup.json"),
                                    str(tmp_path / "sup"))
    assert stats == {"images": 2, "segments": 8, "stuff_relabeled": 5, "merged_away": 0, "pngs_rewritten": 0}
    out = json.loads((tmp_path / "sup.json").read_text())
    assert out["info"] == {"v": 1} and out["images"] == src["images"]
    assert [c["id"] for c in out["categories"]] == [1, 301, 302]
    assert [s["category_id"] for s in out["annotations"][0]["segments_info"]] == [301, 301, 302, 301, 1, 1]
    assert out["annotations"][1]["segments_info"] == [{**segs_b[0], "category_id": 302}, segs_b[1]]
    for name in ("a.png", "b.png"):
        assert (tmp_path / "sup" / name).read_bytes() == (tmp_path / "pan" / name).read_bytes()
    # the merged variant rewrites image a only
    stats = write_supercategory_set(str(tmp_path / "pan.json"), str(tmp_path / "pan"), str(tmp_path / "m.json"),
                                    str(tmp_path / "m"), merge_stuff=True)
    assert stats["merged_away"] == 2 and stats["pngs_rewritten"] == 1
    assert decode_panoptic_png((tmp_path / "m" / "a.png").read_bytes())[0].tolist() == [5, 5, 5, 5]
    assert (tmp_path / "m" / "b.png").read_bytes() == (tmp_path / "pan" / "b.png").read_bytes()
    assert len(json.loads((tmp_path / "m.json").read_text())["annotations"][0]["segments_info"]) == 4
