"""Unit tests for CutLER's self-training merge rule (u2seg.labels.selftrain), on hand-built 1x20 masks."""

from __future__ import annotations

import numpy as np
import pytest

from u2seg.labels.selftrain import mask_iou_matrix, selftrain_image

pytestmark = pytest.mark.unit

W = 20


def cols(*ranges: tuple[int, int]) -> np.ndarray:
    """A (1, W) mask with columns [a, b) set for each range."""
    m = np.zeros((1, W), bool)
    for a, b in ranges:
        m[0, a:b] = True
    return m


def stack(*masks: np.ndarray) -> np.ndarray:
    return np.stack(masks) if masks else np.zeros((0, 1, W), bool)


PRED = cols((0, 10))  # 10 px


def test_score_threshold_is_inclusive():
    preds = stack(cols((0, 4)), cols((5, 8)), cols((10, 12)))
    masks, classes, scores, sources = selftrain_image(
        stack(), [], preds, [3, 4, 5], [0.75, 0.7499, 0.9], score_threshold=0.75
    )
    assert classes.tolist() == [3, 5] and scores.tolist() == pytest.approx([0.75, 0.9])
    assert sources.tolist() == ["pred", "pred"] and masks.shape == (2, 1, W)
    _, classes, _, _ = selftrain_image(stack(), [], stack(PRED), [1], [0.7])  # default threshold 0.7
    assert classes.tolist() == [1]


def test_old_mask_kept_only_below_iou_threshold_strictly():
    old = stack(
        cols((0, 5)),  # IoU 5/10 = 0.5 -> dropped (CutLER keeps iou < 0.5)
        cols((0, 5), (15, 16)),  # IoU 5/11 = 0.4545 -> kept
        cols((0, 6)),  # IoU 0.6 -> dropped
        cols((15, 20)),  # IoU 0 -> kept
    )
    masks, classes, scores, sources = selftrain_image(old, [11, 12, 13, 14], stack(PRED), [2], [0.9])
    assert classes.tolist() == [2, 12, 14]  # predictions first, then kept old masks in their order
    assert sources.tolist() == ["pred", "old", "old"]
    assert scores[0] == pytest.approx(0.9) and np.isnan(scores[1:]).all()
    assert np.array_equal(masks[1], old[1]) and np.array_equal(masks[2], old[3])
    _, classes, _, _ = selftrain_image(old, [11, 12, 13, 14], stack(PRED), [2], [0.9], iou_threshold=0.6)
    assert classes.tolist() == [2, 11, 12, 14]  # 0.5 < 0.6 now kept, 0.6 still dropped


def test_only_confident_predictions_suppress_and_each_of_them_does():
    old = stack(cols((12, 18)), cols((0, 8)))
    preds = stack(PRED, cols((12, 18)), cols((0, 8)))
    # pred 0 (IoU 0.8 with old 1) is confident; pred 1 (IoU 1 with old 0) is not; pred 2 is not either.
    _, classes, _, sources = selftrain_image(old, [7, 8], preds, [1, 2, 3], [0.8, 0.5, 0.1])
    assert classes.tolist() == [1, 7] and sources.tolist() == ["pred", "old"]
    # old 0 has IoU 0 with pred 0 but 1 with pred 1: once pred 1 is confident it goes (max over predictions).
    _, classes, _, _ = selftrain_image(old, [7, 8], preds, [1, 2, 3], [0.8, 0.95, 0.1])
    assert classes.tolist() == [1, 2]


def test_no_confident_prediction_keeps_all_old_and_no_old_keeps_predictions():
    old = stack(cols((0, 3)), cols((5, 9)))
    masks, classes, scores, sources = selftrain_image(old, [1, 2], stack(PRED), [3], [0.2])
    assert classes.tolist() == [1, 2] and sources.tolist() == ["old", "old"] and np.isnan(scores).all()
    masks, classes, _, _ = selftrain_image(old, [1, 2], stack(), [], [])
    assert classes.tolist() == [1, 2] and masks.shape == (2, 1, W)
    masks, classes, scores, sources = selftrain_image(stack(), [], stack(), [], [])
    assert masks.shape == (0, 1, W) and classes.shape == scores.shape == sources.shape == (0,)


def test_probability_masks_are_binarised_above_half():
    probs = np.zeros((1, 1, W), np.float32)
    probs[0, 0, :10] = 0.9
    probs[0, 0, 10:14] = 0.5  # exactly 0.5 is background (CutLER: masks > 0.5)
    old = stack(cols((0, 5)))  # IoU with the binarised 10-px prediction = 0.5 -> dropped
    masks, classes, _, _ = selftrain_image(old, [1], probs, [2], [0.9])
    assert classes.tolist() == [2] and masks.dtype == bool and int(masks[0].sum()) == 10


def test_mask_iou_matrix_values_and_empty_masks():
    a = stack(cols((0, 10)), cols())
    b = stack(cols((5, 15)), cols())
    iou = mask_iou_matrix(a, b)
    assert np.allclose(iou, [[5 / 15, 0.0], [0.0, 0.0]])


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="predictions"):
        selftrain_image(stack(PRED), [1], np.zeros((1, 2, W), bool), [1], [0.9])
    with pytest.raises(ValueError, match="old_classes"):
        selftrain_image(stack(PRED), [1, 2], stack(PRED), [1], [0.9])
    with pytest.raises(ValueError, match="pred_masks"):
        selftrain_image(stack(PRED), [1], PRED, [1], [0.9])
    with pytest.raises(ValueError, match="iou_threshold"):
        selftrain_image(stack(PRED), [1], stack(PRED), [1], [0.9], iou_threshold=1.5)


def test_pred_nms_drops_a_lower_scoring_duplicate_and_keeps_input_order():
    # b nests in a's object (IoU 8/10 = 0.8 with a), c is elsewhere, d overlaps b at 4/14 = 0.29, c at 3/10
    a, b, c, d = cols((0, 10)), cols((1, 9)), cols((12, 16)), cols((5, 15))
    preds, classes, scores = stack(a, b, c, d), [1, 1, 2, 3], [0.8, 0.9, 0.75, 0.7]
    masks, cls, sc, _ = selftrain_image(stack(), [], preds, classes, scores)
    assert cls.tolist() == [1, 1, 2, 3]  # off by default: CutLER's rule keeps every confident prediction
    masks, cls, sc, _ = selftrain_image(stack(), [], preds, classes, scores, pred_nms=0.5)
    assert cls.tolist() == [1, 2, 3] and sc.tolist() == pytest.approx([0.9, 0.75, 0.7])  # b (0.9) beats a (0.8)
    assert (masks[0] == b).all()
    _, cls, _, _ = selftrain_image(stack(), [], preds, classes, scores, pred_nms=0.8)  # 0.8 is not above 0.8
    assert cls.tolist() == [1, 1, 2, 3]
    _, cls, _, _ = selftrain_image(stack(), [], preds, classes, scores, pred_nms=0.25)  # d goes too (0.29 > 0.25)
    assert cls.tolist() == [1, 2]
    with pytest.raises(ValueError, match="pred_nms"):
        selftrain_image(stack(), [], preds, classes, scores, pred_nms=1.5)


def test_pred_nms_breaks_equal_scores_by_input_order_and_ignores_unconfident_ones():
    a, b = cols((0, 10)), cols((0, 9))
    _, cls, _, _ = selftrain_image(stack(), [], stack(a, b), [4, 5], [0.8, 0.8], pred_nms=0.5)
    assert cls.tolist() == [4]
    _, cls, _, _ = selftrain_image(stack(), [], stack(a, b), [4, 5], [0.5, 0.8], pred_nms=0.5)
    assert cls.tolist() == [5]  # a is not confident: it suppresses nothing
