"""Unit tests for u2seg.bench.refine: the best-match IoU and the summary's drop / pairing arithmetic."""

from __future__ import annotations

import numpy as np
import pytest

from u2seg.bench.refine import _summary, bench_refine, best_match_ious

pytestmark = pytest.mark.unit


def test_best_match_ious_hand_built() -> None:
    seg = np.zeros((4, 6), np.int32)
    seg[:, :3] = 1  # 12 px
    seg[:2, 3:] = 2  # 6 px
    m = np.zeros((3, 4, 6), bool)
    m[0, :, :3] = True  # exactly segment 1
    m[1, :, 2:4] = True  # 8 px: 4 in seg 1 (IoU 4/16), 2 in seg 2 (2/12), 2 in seg 0
    ious = best_match_ious(m, seg, [1, 2])
    np.testing.assert_allclose(ious, [1.0, 0.25, 0.0])
    np.testing.assert_allclose(best_match_ious(m, seg, [2]), [0.0, 2 / 12, 0.0])
    assert best_match_ious(m, seg, []).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        best_match_ious(m[:, :3], seg, [1])


def test_summary_counts_drops_and_pairs() -> None:
    rec = {"raw_iou_things": [0.2, 0.6, 0.4], "guided_iou_things": [0.3, 0.5], "raw_iou_any": [0.5, 0.7, 0.9],
           "guided_iou_any": [0.6, 0.8], "dropped": [False, True, False], "refined_vs_raw_iou": [0.9, 0.3, 0.8],
           "pairs": [(0, 0), (2, 1)], "n_gt_things": 2, "consistent": True, "time_none_s": 1.0,
           "time_guided_s": 2.0}
    s = _summary([rec])
    assert s["raw_masks"] == 3 and s["guided_masks"] == 2 and s["drop_fired"] == 1
    assert s["drop_rate"] == pytest.approx(1 / 3, abs=1e-4)
    t = s["iou_things"]
    assert t["raw_dropped"] == 0.6 and t["raw_kept_paired"] == 0.3 and t["guided_kept_paired"] == 0.4
    assert t["paired_gain"] == pytest.approx(0.1) and t["paired_improved_fraction"] == 1.0


def test_bench_refine_runs_small() -> None:
    out = bench_refine(n_images=1, image_size=64, n_masks=2)
    assert out["images"] == 1 and out["config"]["weights"] == "random-init"
    assert out["guided_masks"] == out["raw_masks"] - out["drop_fired"] or not out["pairing_by_order"]
    assert 0.0 <= (out["iou_any_segment"]["raw_all"] or 0.0) <= 1.0
