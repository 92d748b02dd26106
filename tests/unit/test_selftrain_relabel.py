"""Self-training's relabel of one image (CutLER's rule + the panoptic merge) and its wiring in the pipeline.

One 20x20 scene: sky (stuff 0) over grass (stuff 1); old pseudo things A (class 0, rows 2-9, cols 2-9) and
B (class 1, rows 12-17, cols 12-17). Predictions: P1 (class 2, 0.9) covers A shifted one column (IoU 56/72),
P2 (class 1, 0.8) covers B shifted two columns (IoU exactly 24/48 = 0.5), P3 (class 0, 0.69) is below the
score threshold.
"""

from __future__ import annotations

import numpy as np
import pytest

from u2seg.config import load_config
from u2seg.io import RunRoot, layout
from u2seg.io.labelset import Fragment, LabelSet
from u2seg.labels import decode_mask, panoptic_merge
from u2seg.labels.selftrain import panoptic_stuff, panoptic_things, relabel_image, semantic_stuff
from u2seg.model import Prediction
from u2seg.pipeline.predict import write_prediction
from u2seg.pipeline.selftrain import prediction_index, relabel_group

pytestmark = pytest.mark.unit

K_THINGS, K_STUFF = 3, 2
SKY, GRASS = K_THINGS + 1, K_THINGS + 2  # category ids


def box(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    m = np.zeros((20, 20), bool)
    m[r0:r1, c0:c1] = True
    return m


A, B = box(2, 10, 2, 10), box(12, 18, 12, 18)
P1, P2, P3 = box(2, 10, 3, 11), box(12, 18, 14, 20), box(0, 2, 0, 6)
PRED_MASKS = np.stack([P1, P2, P3])
PRED_CLASSES, PRED_SCORES = np.array([2, 1, 0]), np.array([0.9, 0.8, 0.69])
SKY_GRASS = np.where(np.arange(20)[:, None] < 10, 0, 1) * np.ones((1, 20), np.int64)


def old_label():
    return panoptic_merge([A, B], [0, 1], [1.0, 0.9], SKY_GRASS, k_things=K_THINGS, k_stuff=K_STUFF,
                          min_stuff_area=0, min_thing_area=0)


def category_map(seg: np.ndarray, segments: list[dict]) -> np.ndarray:
    lut = np.zeros(int(seg.max()) + 1, np.int64)
    for s in segments:
        lut[s["id"]] = s["category_id"]
    return lut[seg]


def test_panoptic_things_and_stuff_read_back_a_label():
    old = old_label()
    masks, classes = panoptic_things(old.seg_ids, old.segments_info, K_THINGS)
    assert classes.tolist() == [0, 1] and np.array_equal(masks[0], A) and np.array_equal(masks[1], B)
    stuff = panoptic_stuff(old.seg_ids, old.segments_info, K_THINGS)
    assert np.array_equal(stuff, np.where(A | B, -1, SKY_GRASS))
    assert semantic_stuff(np.array([[0, 1, SKY, GRASS]]), K_THINGS).tolist() == [[-1, -1, 0, 1]]


@pytest.mark.parametrize(("iou", "b_kept"), [(0.5, False), (0.55, True)])
def test_old_masks_replaced_or_kept_on_either_side_of_the_iou_threshold(iou: float, b_kept: bool):
    old = old_label()
    stuff = panoptic_stuff(old.seg_ids, old.segments_info, K_THINGS)
    res = relabel_image(old.seg_ids, old.segments_info, PRED_MASKS, PRED_CLASSES, PRED_SCORES, stuff,
                        k_things=K_THINGS, k_stuff=K_STUFF, score_threshold=0.7, iou_threshold=iou)
    seg, segments = res.panoptic.seg_ids, res.panoptic.segments_info
    cats = category_map(seg, segments)
    things = [s for s in segments if s["category_id"] <= K_THINGS]
    # A (IoU 0.78 with P1) is always replaced; B (IoU 0.5 with P2) only while 0.5 is not below the threshold
    assert [s["category_id"] for s in things] == ([3, 2, 2] if b_kept else [3, 2])
    assert (res.pred_things, res.old_kept, res.old_replaced) == ((2, 1, 1) if b_kept else (2, 0, 2))
    assert res.thing_scores == pytest.approx([0.9, 0.8, 1.0] if b_kept else [0.9, 0.8])
    assert np.all(seg[P1] == 1) and np.all(seg[P2] == 2)  # the predictions' full masks, P2 wins over B
    if b_kept:
        assert things[2]["area"] == 12 and np.all(seg[B & ~P2] == 3)
    else:
        assert np.all(cats[B & ~P2] == 0)  # under the old B there is no stuff in the labels: void
    assert np.all(cats[A & ~P1] == 0)
    assert np.all(cats[P3] == SKY)  # P3 scores 0.69 < 0.7: not a thing
    assert np.all(cats[box(0, 10, 11, 20)] == SKY) and np.all(cats[box(10, 12, 0, 20)] == GRASS)


def test_no_confident_prediction_keeps_the_old_label():
    old = old_label()
    stuff = panoptic_stuff(old.seg_ids, old.segments_info, K_THINGS)
    res = relabel_image(old.seg_ids, old.segments_info, PRED_MASKS, PRED_CLASSES, PRED_SCORES * 0.5, stuff,
                        k_things=K_THINGS, k_stuff=K_STUFF)
    assert np.array_equal(category_map(res.panoptic.seg_ids, res.panoptic.segments_info),
                          category_map(old.seg_ids, old.segments_info))
    assert (res.pred_things, res.old_kept, res.old_replaced) == (0, 2, 0)


def test_mismatched_sizes_raise():
    old = old_label()
    with pytest.raises(ValueError, match="predicted masks are"):
        relabel_image(old.seg_ids, old.segments_info, PRED_MASKS[:, :10], PRED_CLASSES, PRED_SCORES,
                      SKY_GRASS, k_things=K_THINGS, k_stuff=K_STUFF)


# ---------------------------------------------------------------- the pipeline's group relabel

IMG, OTHER = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4", "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c"
P4 = box(4, 8, 4, 8)  # a nested prediction on top of P1: P1's panoptic segment is P1 minus P4


def model_semantic() -> np.ndarray:
    """The semantic head: grass everywhere, "thing" (-1) on the predicted things."""
    return np.where(P1 | P2 | P4, -1, 1).astype(np.int32)


def write_round0(tmp_path) -> RunRoot:
    root = RunRoot(str(tmp_path))
    root.write_json(layout.CLUSTER_FIT, {"k_things": K_THINGS, "k_stuff": K_STUFF, "classes": "test"})
    prev = LabelSet(root, layout.round_labels(0), K_THINGS, K_STUFF)
    old = old_label()
    fragment = Fragment()
    for image_id in (IMG, OTHER):
        fragment.add(prev.write_image("g0", image_id, f"file:///data/{image_id}.png", old.seg_ids,
                                      old.segments_info, semantic=old.semantic))
    prev.commit("g0", fragment)

    pred = LabelSet(root, layout.round_predictions(0), K_THINGS, K_STUFF)
    masks, classes, scores = np.stack([P4, P1, P2, P3]), np.array([0, 2, 1, 0]), np.array([0.95, 0.9, 0.8, 0.69],
                                                                                          np.float32)
    pan = panoptic_merge(list(masks), classes.tolist(), scores.tolist(), model_semantic(), k_things=K_THINGS,
                         k_stuff=K_STUFF, min_stuff_area=0, min_thing_area=0)
    segments = [{**s, "score": float(scores[pan.thing_sources[s["id"]]])} if s["id"] in pan.thing_sources else s
                for s in pan.segments_info]
    p = Prediction(boxes=np.zeros((4, 4), np.float32), scores=scores, classes=classes, masks=masks,
                   semantic=model_semantic(), panoptic=pan.seg_ids, segments_info=segments)
    fragment = Fragment()
    fragment.add(write_prediction(pred, "pg", IMG, f"file:///data/{IMG}.png", p, 0.7))  # OTHER: not predicted
    pred.commit("pg", fragment)
    return root


def test_predictions_keep_full_masks_of_confident_detections_and_the_semantic_head(tmp_path):
    from u2seg.labels import decode_semantic_png

    root = write_round0(tmp_path)
    pred = LabelSet(root, layout.round_predictions(0), K_THINGS, K_STUFF)
    (row,) = pred.read_group("pg")
    inst = row["instances"]
    assert [a["score"] for a in inst] == pytest.approx([0.95, 0.9, 0.8])  # P3 (0.69) left out
    assert np.array_equal(decode_mask(inst[1]["segmentation"]), P1) and inst[1]["area"] == 64  # full, not 48
    seg = pred.read_panoptic(pred.rel(row["png"]))
    assert int((seg == seg[2, 3]).sum()) == 48  # the panoptic segment of P1 is what P4 leaves visible
    sem = decode_semantic_png(root.read_bytes(pred.rel(row["png"].replace("panoptic/", "semantic/", 1))))
    assert np.array_equal(sem, np.where(P1 | P2 | P4, 0, GRASS))
    assert prediction_index(pred) == {IMG: "pg"}


def relabelled(root: RunRoot, *overrides: str) -> dict[str, tuple[np.ndarray, list[dict], dict]]:
    cfg = load_config(None, ["label.min_stuff_area=0", *overrides])
    pred = LabelSet(root, layout.round_predictions(0), K_THINGS, K_STUFF)
    counts = relabel_group("g0", root, 1, prediction_index(pred), cfg.train, cfg.label)
    out = LabelSet(root, layout.round_labels(1), K_THINGS, K_STUFF)
    return {row["image_id"]: (out.read_panoptic(out.rel(row["png"])), row["segments"], counts)
            for row in out.read_group("g0")}


def test_group_relabel_with_stuff_from_the_labels(tmp_path):
    root = write_round0(tmp_path)
    got = relabelled(root, "train.selftrain_stuff=labels", "train.selftrain_iou=0.55", "label.min_thing_area=0")
    seg, segments, counts = got[IMG]
    assert counts == {"images": 2, "pred_things": 3, "old_kept": 1 + 2, "old_replaced": 1}  # OTHER keeps A and B
    cats = category_map(seg, segments)
    assert np.all(cats[P4] == 1) and np.all(cats[P1 & ~P4] == 3) and np.all(cats[P2] == 2)
    assert np.all(cats[B & ~P2] == 2) and np.all(cats[A & ~P1] == 0)  # old B kept; no stuff under the old A
    assert np.all(cats[box(0, 2, 0, 20)] == SKY) and np.all(cats[box(18, 20, 0, 20)] == GRASS)
    old = old_label()
    other_seg, other_segments, _ = got[OTHER]  # not predicted: its label is unchanged
    assert np.array_equal(category_map(other_seg, other_segments), category_map(old.seg_ids, old.segments_info))


def test_group_relabel_with_stuff_from_the_model_and_the_label_rules(tmp_path):
    root = write_round0(tmp_path)
    got = relabelled(root, "train.selftrain_stuff=model", "train.selftrain_iou=0.55", "label.min_thing_area=16")
    seg, segments, counts = got[IMG]
    cats = category_map(seg, segments)
    # the kept old B shows 12 px (P2 wins the overlap): below label.min_thing_area, so dropped
    assert [s["category_id"] for s in segments if s["category_id"] <= K_THINGS] == [1, 3, 2]
    # the semantic head's stuff: grass wherever it does not say "thing" (the old A's and B's free pixels
    # too), sky nowhere
    assert np.all(cats[~(P1 | P2 | P4)] == GRASS) and not np.any(cats == SKY)
    assert counts["pred_things"] == 3 and counts["old_kept"] == 1 + 2  # B was kept by the rule, then too small
    other_seg, other_segments, _ = got[OTHER]  # no prediction: the previous stuff stays
    assert np.any(category_map(other_seg, other_segments) == SKY)


def test_group_relabel_follows_the_label_stages_thing_order(tmp_path):
    root = write_round0(tmp_path)
    knobs = ("train.selftrain_iou=0.55", "label.min_thing_area=0")
    by_score = relabelled(root, *knobs)[IMG][0]
    by_box = relabelled(root, *knobs, "label.thing_order=bbox_area")[IMG][0]
    overlap, p2_only, b_only = B & P2, (13, 19), (13, 12)
    assert np.all(by_score[overlap] == by_score[p2_only])  # P2 (0.8) before the old B (no score)
    # U2Seg's order: larger boxes first, smaller ones over them; P2 and B tie, the later (B) paints last
    assert np.all(by_box[overlap] == by_box[b_only]) and np.all(by_box[P4] == by_box[5, 5])
    assert by_box[5, 5] != by_box[2, 3]  # P4 (smaller) over P1
