"""Unit tests for u2seg.evaluate: hand-computed PQ, mIoU, matching, COCOeval wrapper, report."""

import io
import json

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from u2seg.evaluate.instance import instance_metrics, instance_overlap
from u2seg.evaluate.matching import (
    Confusion,
    OverlapAccumulator,
    hungarian_mapping,
    majority_mapping,
    mapping_from_json,
    panoptic_category_map,
)
from u2seg.evaluate.pq import PanopticImage, panoptic_quality, pq_from_arrays
from u2seg.evaluate.report import error_overlay, write_report
from u2seg.evaluate.semantic import semantic_metrics

pytestmark = pytest.mark.unit

CATS = [{"id": 1, "name": "person", "isthing": 1}, {"id": 2, "name": "car", "isthing": 1},
        {"id": 3, "name": "dog", "isthing": 1}, {"id": 10, "name": "sky", "isthing": 0}]


def _seg(i, c, crowd=0):
    return {"id": i, "category_id": c, "iscrowd": crowd}


def _case_8x8():
    """Stuff with void, a thing, a crowd region, a wrong-class prediction (see the hand count below)."""
    gt = np.zeros((8, 8), np.int64)
    gt[:4] = 10
    gt[0, :2] = 0  # void
    gt[4:, :4] = 1  # person (16 px)
    gt[4:, 4:6] = 2  # person crowd (8 px)
    gt[4:, 6:] = 3  # car (8 px)
    gt_segs = [_seg(10, 10), _seg(1, 1), _seg(2, 1, crowd=1), _seg(3, 2)]
    pr = np.zeros((8, 8), np.int64)
    pr[:4] = 100  # sky, 2 px on void -> IoU 30 / 30 = 1
    pr[4:, :3] = 101  # person, IoU 12 / 16 = 0.75
    pr[4:, 3:6] = 102  # person over 8 crowd px of 12 -> not matched, not a FP
    pr[4:, 6:] = 103  # says person, is car -> FP person, FN car
    pr_segs = [_seg(100, 10), _seg(101, 1), _seg(102, 1), _seg(103, 1)]
    return PanopticImage(gt, gt_segs), PanopticImage(pr, pr_segs)


def test_pq_hand_computed_things_stuff_crowd_void():
    gt, pr = _case_8x8()
    r = pq_from_arrays([(gt, pr)], categories=CATS)
    pc = r["per_class"]
    assert pc[10] == pytest.approx({"pq": 1.0, "sq": 1.0, "rq": 1.0, "tp": 1, "fp": 0, "fn": 0})
    assert pc[1] == pytest.approx({"pq": 0.75 / 1.5, "sq": 0.75, "rq": 1 / 1.5, "tp": 1, "fp": 1, "fn": 0})
    assert pc[2] == pytest.approx({"pq": 0.0, "sq": 0.0, "rq": 0.0, "tp": 0, "fp": 0, "fn": 1})
    assert pc[3]["tp"] + pc[3]["fp"] + pc[3]["fn"] == 0  # absent class: listed, not averaged
    assert r["Things"] == pytest.approx({"pq": 0.25, "sq": 0.375, "rq": 1 / 3, "n": 2})
    assert r["Stuff"] == pytest.approx({"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 1})
    assert r["All"] == pytest.approx({"pq": 0.5, "sq": 1.75 / 3, "rq": (1 + 1 / 1.5) / 3, "n": 3})


def test_pq_prediction_mostly_on_void_is_not_fp_and_half_iou_is_no_match():
    gt = np.zeros((4, 4), np.int64)
    gt[2:] = 1  # sky, top half void
    pr = np.full((4, 4), 2, np.int64)
    pr[:2] = 1
    pr[2, 0] = 1  # 9 px person segment, 8 of them on void
    r = pq_from_arrays([(PanopticImage(gt, [_seg(1, 10)]), PanopticImage(pr, [_seg(1, 1), _seg(2, 10)]))],
                       categories=CATS)
    assert r["per_class"][1]["fp"] == 0
    assert r["per_class"][10] == pytest.approx({"pq": 7 / 8, "sq": 7 / 8, "rq": 1.0, "tp": 1, "fp": 0,
                                                "fn": 0})
    assert r["All"]["n"] == 1 and r["Things"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}

    # IoU exactly 0.5 does not match: one FN and one FP
    gt2 = np.zeros((2, 2), np.int64)
    gt2[:] = 1
    pr2 = np.zeros((2, 2), np.int64)
    pr2[0] = 5
    r2 = pq_from_arrays([(PanopticImage(gt2, [_seg(1, 1)]), PanopticImage(pr2, [_seg(5, 1)]))],
                        categories=CATS)
    assert (r2["per_class"][1]["tp"], r2["per_class"][1]["fp"], r2["per_class"][1]["fn"]) == (0, 1, 1)


def test_pq_mapping_merges_stuff_keeps_things_and_voids_unmapped():
    gt = np.zeros((4, 4), np.int64)
    gt[:2] = 10
    gt[2:, :2] = 1
    gt[2:, 2:] = 2
    gt_segs = [_seg(10, 10), _seg(1, 1), _seg(2, 1)]
    pr = np.zeros((4, 4), np.int64)
    pr[:2, :2], pr[:2, 2:] = 7, 8  # two sky clusters: each half of sky (IoU 0.5) unless merged
    pr[2:, :2], pr[2:, 2:3], pr[2:, 3] = 5, 6, 9  # 6 and 9: parts of instance 2
    pr_segs = [_seg(7, 201), _seg(8, 202), _seg(5, 101), _seg(6, 102), _seg(9, 999)]
    mapping = {201: 10, 202: 10, 101: 1, 102: 1}
    r = pq_from_arrays([(PanopticImage(gt, gt_segs), PanopticImage(pr, pr_segs))], categories=CATS,
                       mapping=mapping)
    assert r["per_class"][10] == pytest.approx({"pq": 1.0, "sq": 1.0, "rq": 1.0, "tp": 1, "fp": 0, "fn": 0})
    # things stay separate: 101 matches instance 1 (IoU 1), 102 is 2 px of 4 (IoU 0.5 -> no match)
    assert (r["per_class"][1]["tp"], r["per_class"][1]["fp"], r["per_class"][1]["fn"]) == (1, 1, 1)
    assert r["diagnostics"]["unmapped_segments"] == 1 and r["diagnostics"]["unmapped_would_be_fp"] == 1
    with pytest.raises(ValueError, match="unknown to the ground truth"):
        pq_from_arrays([(PanopticImage(gt, gt_segs), PanopticImage(pr, pr_segs))], categories=CATS)


def _write_panoptic(root, name, items):
    folder = root / name
    folder.mkdir()
    anns = []
    for k, img in enumerate(items):
        ids = img.ids.astype(np.int64)
        rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
        cv2.imwrite(str(folder / f"{k}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        anns.append({"image_id": k, "file_name": f"{k}.png", "segments_info": img.segments})
    path = root / f"{name}.json"
    path.write_text(json.dumps({"annotations": anns, "categories": CATS,
                                "images": [{"id": k} for k in range(len(items))]}))
    return str(path), str(folder)


def test_panoptic_quality_files_equal_in_memory_and_missing_prediction(tmp_path):
    gt, pr = _case_8x8()
    gt.ids[gt.ids == 10] = 70000  # exercise all three RGB channels
    gt.segments[0] = _seg(70000, 10)
    gj, gd = _write_panoptic(tmp_path, "gt", [gt, gt])
    pj, pd = _write_panoptic(tmp_path, "pred", [pr])  # image 1 has no prediction
    r = panoptic_quality(gj, pj, gd, pd, workers=1)
    empty = PanopticImage(np.zeros((8, 8), np.int64), [])
    ref = pq_from_arrays([(gt, pr), (gt, empty)], categories=CATS)
    assert r["per_class"] == ref["per_class"] and r["All"] == pytest.approx(ref["All"])
    assert r["diagnostics"]["missing_predictions"] == 1


def test_panoptic_quality_parallel_equals_serial(tmp_path):
    gt, pr = _case_8x8()
    gj, gd = _write_panoptic(tmp_path, "gt", [gt] * 17)  # 2 chunks of work
    pj, pd = _write_panoptic(tmp_path, "pred", [pr] * 17)
    serial = panoptic_quality(gj, pj, gd, pd, workers=1)
    parallel = panoptic_quality(gj, pj, gd, pd, workers=2)
    assert serial == parallel
    assert serial["per_class"][1]["tp"] == 17


def test_hungarian_beats_greedy_and_handles_rectangles():
    c = np.array([[10, 9, 0], [9, 1, 0], [0, 0, 3], [0, 0, 0]])
    assert hungarian_mapping(c) == {0: 1, 1: 0, 2: 2}  # 21 > greedy 10 + 1 + 3; row 3 unmapped
    assert hungarian_mapping(c.T) == {1: 0, 0: 1, 2: 2}
    assert hungarian_mapping(np.array([[5, 0], [0, 0]])) == {0: 0}  # zero-overlap pair dropped
    conf = Confusion(np.array([101, 102, 103, 104]), np.array([1, 2, 3]), c, np.zeros(3, np.int64))
    m = hungarian_mapping(conf)
    assert m == {101: 2, 102: 1, 103: 3}
    assert mapping_from_json(json.loads(json.dumps(m))) == m
    assert hungarian_mapping(conf.subset(pred_ids=[101, 102], gt_ids=[1])) == {101: 1}


def test_majority_mapping_many_to_one():
    conf = Confusion(np.array([101, 102, 103, 104]), np.array([1, 2, 3]),
                     np.array([[10, 9, 0], [9, 1, 0], [0, 0, 3], [0, 0, 0]]), np.zeros(3, np.int64))
    assert majority_mapping(conf) == {101: 1, 102: 1, 103: 3}


def test_overlap_accumulator_and_confusion_roundtrip():
    acc = OverlapAccumulator(pred_void=0, gt_void=255)
    acc.add(np.array([[5, 5, 0], [7, 7, 7]]), np.array([[1, 255, 1], [2, 2, 1]]))
    other = OverlapAccumulator(pred_void=0, gt_void=255)
    other.add(np.array([[5]]), np.array([[2]]))
    conf = acc.merge(other).result(pred_ids=[9])
    assert conf.pred_ids.tolist() == [5, 7, 9] and conf.gt_ids.tolist() == [1, 2]
    assert conf.counts.tolist() == [[1, 1], [1, 2], [0, 0]]
    assert conf.unassigned.tolist() == [1, 0]
    back = Confusion.from_dict(json.loads(json.dumps(conf.to_dict())))
    assert np.array_equal(back.counts, conf.counts) and np.array_equal(back.unassigned, conf.unassigned)


def test_panoptic_category_map():
    ids = np.array([[0, 3, 3], [9, 4, 77]])
    out = panoptic_category_map(ids, [_seg(3, 10), _seg(4, 1), _seg(9, 2)])
    assert out.tolist() == [[0, 10, 10], [2, 1, 0]]


def test_semantic_miou_hand_computed():
    gt = np.array([[0, 0, 0, 1], [1, 1, 255, 255]])
    pred = np.array([[10, 10, 11, 11], [11, 12, 10, 11]])
    acc = OverlapAccumulator(pred_void=255, gt_void=255)
    acc.add(pred, gt)
    conf = acc.result()
    mapping = hungarian_mapping(conf)
    assert mapping == {10: 0, 11: 1}
    r = semantic_metrics(conf, mapping)
    # class 0: tp 2, gt 3, pred 2 -> 2/3; class 1: tp 2, gt 3, pred 3 -> 2/4; 12 unmapped: a miss only
    assert r["per_class"][0]["iou"] == pytest.approx(2 / 3)
    assert r["per_class"][1]["iou"] == pytest.approx(0.5)
    assert r["miou"] == pytest.approx((2 / 3 + 0.5) / 2)
    assert r["pixel_accuracy"] == pytest.approx(4 / 6)
    # a void prediction on labeled gt is a miss for that class
    acc.add(np.array([[255]]), np.array([[0]]))
    r2 = semantic_metrics(acc.result(), mapping)
    assert r2["per_class"][0]["iou"] == pytest.approx(2 / 4) and r2["pixel_accuracy"] == pytest.approx(4 / 7)


def _rle(mask):
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    r["counts"] = r["counts"].decode()
    return r


def _instances():
    anns, preds = [], []
    for k in range(3):
        for j, cat in enumerate((1, 2)):
            m = np.zeros((32, 32), bool)
            m[4 + 12 * j:14 + 12 * j, 3 + 5 * k:20 + 5 * k] = True
            anns.append({"id": len(anns) + 1, "image_id": k, "category_id": cat, "segmentation": _rle(m),
                         "iscrowd": 0})
            preds.append({"image_id": k, "category_id": 100 + cat, "segmentation": _rle(m), "score": 0.9,
                          "bbox": mask_utils.toBbox(_rle(m)).tolist()})
    gt = {"images": [{"id": k, "height": 32, "width": 32} for k in range(3)], "annotations": anns,
          "categories": CATS[:3]}
    return gt, preds


def test_instance_metrics_perfect_mapped_agnostic_and_empty():
    gt, preds = _instances()
    mapping = hungarian_mapping(instance_overlap(gt, preds).result())
    assert mapping == {101: 1, 102: 2}
    r = instance_metrics(gt, preds, mapping=mapping)
    for t in ("segm", "bbox"):
        assert r[t]["AP"] == pytest.approx(1.0) and r[t]["AP50"] == pytest.approx(1.0)
        assert r[t]["AR100"] == pytest.approx(1.0)
    swapped = instance_metrics(gt, preds, mapping={101: 2, 102: 1}, iou_types=("segm",))
    assert swapped["segm"]["AP"] == pytest.approx(0.0)
    agnostic = instance_metrics(gt, preds, mapping={101: 2, 102: 1}, class_agnostic=True)
    assert agnostic["segm"]["AP"] == pytest.approx(1.0)
    assert instance_metrics(gt, preds, class_agnostic=True)["bbox"]["AP"] == pytest.approx(1.0)
    empty = instance_metrics(gt, [])
    assert empty["segm"]["AP"] == 0.0 and empty["bbox"]["AR100"] == 0.0
    unmapped = instance_metrics(gt, preds, mapping={})
    assert unmapped["segm"]["AP"] == 0.0 and unmapped["diagnostics"]["unmapped"] == len(preds)
    with pytest.raises(ValueError, match="not a gt category"):
        instance_metrics(gt, preds)


def test_error_overlay_marks_wrong_pixels():
    img = np.full((2, 3, 3), 128, np.uint8)
    gt = np.array([[1, 1, 0], [2, 2, 2]])
    pred = np.array([[1, 2, 5], [2, 0, 2]])
    out = error_overlay(img, gt, pred, void_label=0).astype(int)
    red = out[..., 0] - out[..., 1] > 100
    assert red.tolist() == [[False, True, False], [False, True, False]]


def test_write_report_html_is_self_contained(tmp_path):
    gt, pr = _case_8x8()
    metrics = {"panoptic": pq_from_arrays([(gt, pr)], categories=CATS),
               "semantic": {"miou": 0.5, "pixel_accuracy": 0.75, "per_class": {1: {"iou": 0.5}}}}
    rng = np.random.default_rng(0)
    gcat = panoptic_category_map(gt.ids, gt.segments)
    sample = {"image": rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), "gt": gcat,
              "pred": np.where(gcat == 2, 7, gcat), "name": "img<0>"}
    path = tmp_path / "report.html"
    text = write_report(metrics, [sample], str(path), category_names={c["id"]: c["name"] for c in CATS},
                        thing_ids=[1, 2, 3], mapping={1: 1, 10: 10, 7: 3})
    assert path.read_text() == text
    assert "<script" not in text and "http" not in text.replace("http-equiv", "")
    assert text.count("data:image/png;base64,") == 4
    assert "img&lt;0&gt;" in text and "50.0" in text and "sky" in text
    buf = io.BytesIO()
    write_report(metrics, [], buf)
    assert buf.getvalue().startswith(b"<!DOCTYPE html>")


def _block(pq: float, miou: float, *, inplace: float | None = None, ap_box: float | None = None) -> dict:
    pan = {part: {"pq": pq, "sq": 1.0, "rq": pq, "n": 1} for part in ("All", "Things", "Stuff")}
    pan["per_class"] = {1: {"pq": pq, "sq": 1.0, "rq": pq, "tp": 1, "fp": 0, "fn": 0}}
    block = {"summary": {"mapping": "x", "mapped_categories": 3}, "panoptic": pan,
             "semantic": {"miou": miou, "pixel_accuracy": 0.5, "per_class": {1: {"iou": miou}}}}
    if inplace is not None:
        block["semantic_inplace"] = {"miou": inplace, "pixel_accuracy": 0.25}
    if ap_box is not None:
        block["instance"] = {"class_aware": {"bbox": {"AP": ap_box, "AP50": None}}}
    return block


def _metrics() -> dict:
    return {"summary": {"protocols": ["hungarian", "u2seg"], "ground_truth": "gt.json"},
            "images": {"evaluated": 4, "gt": 5, "gt_without_prediction": 1, "predictions_without_gt": 0},
            "protocols": {"hungarian": _block(0.8, 0.7), "u2seg": _block(0.6, 0.9, inplace=0.4, ap_box=0.5)}}


def test_flat_stats_first_protocol_on_top_and_every_protocol_apart():
    from u2seg.evaluate.summary import flat_stats, format_table, metric_rows, protocol_blocks

    stats = flat_stats(_metrics(), "labels")
    assert stats["protocol"] == "hungarian" and stats["pq"] == 0.8 and stats["miou"] == 0.7
    assert stats["images"] == 4 and stats["gt_without_prediction"] == 1 and "ap_bbox" not in stats
    u2 = stats["protocols"]["u2seg"]
    assert u2["pq"] == 0.6 and u2["miou"] == 0.9 and u2["miou_inplace"] == 0.4 and u2["ap_bbox"] == 0.5
    assert "ap50_bbox" not in u2 and u2["mapped_categories"] == 3  # None (unmeasurable) left out
    table = format_table(stats)
    assert "hungarian" in table and "u2seg" in table and "80.0" in table and "in-place" in table
    lines = metric_rows([("pseudo-labels/hungarian", stats["protocols"]["hungarian"]), ("model/u2seg", u2)])
    assert lines[1].startswith("pseudo-labels/hungarian ") and "60.0" in lines[2]
    # a metrics.json from before protocols reads as one block named after its matching
    legacy = {"summary": {"matching": "majority", "mapped_categories": 2}, "images": _metrics()["images"],
              **{k: v for k, v in _block(0.3, 0.2).items() if k != "summary"}}
    assert list(protocol_blocks(legacy)) == ["majority"]
    assert flat_stats(legacy, "labels")["protocols"]["majority"]["pq"] == 0.3


def test_pipeline_summary_has_a_row_per_target_and_protocol():
    from u2seg.evaluate.summary import flat_stats
    from u2seg.pipeline.run_pipeline import format_summary

    stats = flat_stats(_metrics(), "labels")
    text = format_summary({"run_root": "/r", "wall_s": 1.0, "stages": {
        "evaluate": {**stats, "wall_s": 0.5}, "evaluate_model": {**stats, "skipped": True}}})
    rows = [line.split()[0] for line in text.splitlines() if line.startswith(("pseudo-labels/", "model/"))]
    assert rows == ["pseudo-labels/hungarian", "pseudo-labels/u2seg", "model/hungarian", "model/u2seg"]
    assert "protocol=hungarian" in text


def test_report_shows_protocols_side_by_side():
    from u2seg.evaluate.report import render_report

    gt = np.array([[1, 1], [10, 10]])
    sample = {"image": np.zeros((2, 2, 3), np.uint8), "gt": gt, "pred": np.array([[5, 5], [7, 8]]), "name": "s"}
    html = render_report(_metrics(), [sample], category_names={1: "person", 10: "sky"},
                         mappings={"hungarian": {5: 1, 7: 10}, "u2seg": {5: 1, 7: 10, 8: 10}},
                         protocol_notes={"hungarian": "one-to-one", "u2seg": "U2Seg's votes"})
    assert "protocols side by side" in html and "per-class PQ side by side" in html
    assert "<th>hungarian</th><th>u2seg</th>" in html
    assert "<td>PQ</td><td>80.0</td><td>60.0</td>" in html
    assert "<td>mIoU (U2Seg in-place relabel)</td><td>—</td><td>40.0</td>" in html
    assert "U2Seg&#x27;s votes" in html and "protocol: u2seg" in html
    assert html.count("data:image/png;base64,") == 2 + 2 * 2
    assert "hungarian: errors" in html and "pixel acc 75.0" in html and "pixel acc 100.0" in html
