"""Evaluate stage end to end: synthetic ground truth turned into permuted "predictions", locally and on S3.

A prediction that is the ground truth with pseudo category ids (a fixed permutation) must score
PQ = mIoU = AP = 1 under both the Hungarian and U2Seg's protocol; corrupting some segments must lower the
scores. A hand-built image where the two protocols differ checks their numbers exactly, and the
`u2seg gt-supercategory` command is run on the synthetic world's ground truth.
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

import cv2
import fsspec
import numpy as np
import pytest
import yaml

from u2seg.cli import main
from u2seg.config import ConfigError, load_config
from u2seg.data.synthetic import make_synthetic
from u2seg.io import RunRoot
from u2seg.io.labelset import Fragment, LabelSet
from u2seg.labels.coco import decode_panoptic_png, instance_annotations, panoptic_png_bytes
from u2seg.pipeline.evaluate import run_evaluate_labels, run_evaluate_model
from u2seg.pipeline.markers import mark_done
from u2seg.pipeline.stages import stage

pytestmark = pytest.mark.integration

N_IMAGES = 6
K_THINGS, K_STUFF = 9, 7  # more pseudo classes than the world's 6 things / 5 stuff
_rng = np.random.default_rng(0)
_things = _rng.permutation(np.arange(1, K_THINGS + 1))
_stuff = _rng.permutation(np.arange(K_THINGS + 1, K_THINGS + K_STUFF + 1))
THING_PERM = {c: int(_things[c - 1]) for c in range(1, 7)}  # gt thing id -> pseudo thing id
STUFF_PERM = {c: int(_stuff[c - 7]) for c in range(7, 12)}  # gt stuff id -> pseudo stuff id
PERM = {**THING_PERM, **STUFF_PERM}
SPARE_STUFF = sorted(set(range(K_THINGS + 1, K_THINGS + K_STUFF + 1)) - set(STUFF_PERM.values()))[0]


def write_prediction(root: RunRoot, world: str, storage_options: dict | None = None, *,
                     prefix: str = "labels", noise: bool = False, split_stuff: int = 0,
                     drop_first: bool = False, extra: bool = False) -> None:
    """The world's ground truth as a label set (two parts), with pseudo category ids PERM[gt id].

    noise: on every other image the first thing becomes a wrong pseudo class and the first stuff
    segment becomes void. split_stuff: on odd images gt stuff class ``split_stuff`` uses a spare pseudo id.
    drop_first: the first gt image gets no prediction. extra: a prediction image unknown to the gt.
    """
    fs, base = fsspec.core.url_to_fs(world, **(storage_options or {}))
    gt = json.loads(fs.cat_file(f"{base}/gt/panoptic.json"))
    inst = json.loads(fs.cat_file(f"{base}/gt/instances.json"))
    anns = {a["image_id"]: a for a in gt["annotations"]}
    wrong = {c: THING_PERM[c % 6 + 1] for c in THING_PERM}  # a different (mapped) thing class
    labels = LabelSet(root, prefix, K_THINGS, K_STUFF)
    labels.clear()
    fragments: dict[str, Fragment] = {}
    n_instances = 0
    for k, im in enumerate(gt["images"]):
        if drop_first and k == 0:
            continue
        hex_id = im["u2seg_image_id"]
        ids = decode_panoptic_png(fs.cat_file(f"{base}/gt/panoptic/{anns[im['id']]['file_name']}"))
        segs = [dict(s) for s in anns[im["id"]]["segments_info"]]
        noisy = noise and k % 2 == 1
        if noisy:
            first_stuff = next((s for s in segs if s["category_id"] >= 7), None)
            if first_stuff is not None:
                ids[ids == first_stuff["id"]] = 0
                segs.remove(first_stuff)
        out_segs, done_wrong = [], False
        for s in segs:
            cat = PERM[s["category_id"]]
            if noisy and s["category_id"] <= 6 and not done_wrong:
                cat, done_wrong = wrong[s["category_id"]], True
            if k % 2 == 1 and s["category_id"] == split_stuff:
                cat = SPARE_STUFF
            out_segs.append({"id": s["id"] + 100, "category_id": cat, "iscrowd": 0})
        ids = np.where(ids > 0, ids + 100, 0)
        instances, first = [], True
        for a in inst["annotations"]:
            if a["image_id"] != im["id"]:
                continue
            cat = wrong[a["category_id"]] if noisy and first else PERM[a["category_id"]]
            first = False
            instances.append({"category_id": cat, "segmentation": a["segmentation"], "bbox": a["bbox"],
                              "area": a["area"], "score": 0.9 - 0.01 * n_instances})
            n_instances += 1
        group = f"g{k % 2}"  # two parts
        fragments.setdefault(group, Fragment()).add(
            labels.write_image(group, hex_id, im["uri"], ids, out_segs, instances=instances))
    if extra:
        fragments.setdefault("g0", Fragment()).add(labels.write_image(
            "g0", "0" * 16, "/nonexistent/not_in_gt.jpg", np.zeros((8, 8), np.int32), []))
    for group, fragment in fragments.items():
        labels.commit(group, fragment)


def mark_upstream(root: RunRoot, cfg, *names: str) -> None:
    """Mark stages done with ``cfg`` (the written predictions stand in for their outputs), as the stage
    runner's upstream check requires before an evaluation."""
    for name in names:
        st = stage(name)
        mark_done(root, st, st.config_hash(cfg), {}, config=st.config_values(cfg))


def gt_overrides(world: str) -> list[str]:
    return [f"evaluate.gt_panoptic_json={world}/gt/panoptic.json",
            f"evaluate.gt_panoptic_dir={world}/gt/panoptic",
            f"evaluate.gt_instances_json={world}/gt/instances.json", "evaluate.report_images=3"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("eval-world")
    make_synthetic(str(out), N_IMAGES, seed=3, min_size=48, max_size=80)
    return str(out)


def stuff_in_both_parities(world: str) -> int:
    """A gt stuff class present on an even- and an odd-indexed image (so splitting it by parity shows)."""
    with open(f"{world}/gt/panoptic.json") as fh:
        gt = json.load(fh)
    anns = {a["image_id"]: a for a in gt["annotations"]}
    seen: dict[int, set[int]] = {}
    for k, im in enumerate(gt["images"]):
        for s in anns[im["id"]]["segments_info"]:
            if s["category_id"] >= 7:
                seen.setdefault(s["category_id"], set()).add(k % 2)
    both = sorted(c for c, parities in seen.items() if parities == {0, 1})
    assert both, "the synthetic world changed: no stuff class on both even and odd images"
    return both[0]


def check_outputs(root: RunRoot, stats: dict, out: str = "eval/labels",
                  protocols: tuple[str, ...] = ("hungarian", "u2seg")) -> None:
    metrics = root.read_json(out, "metrics.json")
    assert list(metrics["protocols"]) == list(protocols) == list(stats["protocols"])
    assert stats["protocol"] == protocols[0]
    for p in protocols:
        assert metrics["protocols"][p]["panoptic"]["All"]["pq"] == pytest.approx(stats["protocols"][p]["pq"])
    assert metrics["protocols"][protocols[0]]["panoptic"]["All"]["pq"] == pytest.approx(stats["pq"])
    mappings = root.read_json(out, "mapping.json")["protocols"]
    assert list(mappings) == list(protocols) and all(mappings[p]["mapping"] for p in protocols)
    html = root.read_text(out, "report.html")
    assert "<table" in html and "PQ" in html and "mIoU" in html and "protocols side by side" in html
    # 3 samples x (image, gt, then prediction and errors per protocol)
    assert html.count("data:image/png;base64,") == 3 * (2 + 2 * len(protocols))


def test_evaluate_local_perfect_noisy_majority_model(tmp_path, world):
    run = str(tmp_path / "run")
    root = RunRoot(run)
    cfg = load_config(None, [f"run.run_root={run}", *gt_overrides(world)])

    write_prediction(root, world, drop_first=True, extra=True)
    stats = run_evaluate_labels(cfg, root)
    assert stats["images"] == N_IMAGES - 1
    assert stats["gt_without_prediction"] == 1 and stats["predictions_without_gt"] == 1
    for key in ("pq", "sq", "rq", "pq_things", "pq_stuff", "miou", "pixel_accuracy"):
        assert stats[key] == pytest.approx(1.0), key
    for key in ("ap_segm", "ap_bbox", "ap_agnostic_segm", "ap_agnostic_bbox", "ar100_segm"):
        assert stats[key] == pytest.approx(1.0, abs=1e-6), key
    u2 = stats["protocols"]["u2seg"]
    for key in ("pq", "sq", "rq", "pq_things", "pq_stuff", "miou", "pixel_accuracy"):
        assert u2[key] == pytest.approx(1.0), key
    assert u2["ap_bbox"] == pytest.approx(1.0, abs=1e-6) and "ap_segm" not in u2  # U2Seg: box AP only
    inverse = {v: k for k, v in PERM.items()}
    records = root.read_json("eval/labels", "mapping.json")["protocols"]
    for p in ("hungarian", "u2seg"):
        mapping = {int(k): v for k, v in records[p]["mapping"].items()}
        assert mapping and all(inverse[q] == g for q, g in mapping.items()), p
    assert records["u2seg"]["mapping"] == records["hungarian"]["mapping"]  # every class present got a vote
    # U2Seg's in-place relabel chains through this permutation's cluster ids: its mIoU is below the intended 1.0
    assert u2["miou_inplace"] < 0.99 and records["u2seg"]["semantic_inplace_mapping"] != \
        records["u2seg"]["semantic_mapping"]
    assert records["u2seg"]["thing_evidence"] == "gt instances"
    check_outputs(root, stats)

    write_prediction(root, world, noise=True)
    noisy = run_evaluate_labels(cfg, root)
    assert noisy["images"] == N_IMAGES and noisy["gt_without_prediction"] == 0
    assert 0.2 < noisy["pq"] < 0.99 and noisy["pq_things"] < 0.99 and noisy["pq_stuff"] < 0.99
    assert noisy["miou"] < 0.99 and noisy["ap_segm"] < 0.99
    assert noisy["ap_agnostic_segm"] == pytest.approx(1.0, abs=1e-6)  # every mask is still right

    # one gt stuff class split over two pseudo ids: Hungarian keeps one, majority maps both
    write_prediction(root, world, split_stuff=stuff_in_both_parities(world))
    hung = run_evaluate_labels(cfg, root)
    maj = run_evaluate_labels(load_config(None, [f"run.run_root={run}", *gt_overrides(world),
                                          "evaluate.protocols=[majority]"]), root)
    assert hung["pq_stuff"] < 0.99 and hung["pq_things"] == pytest.approx(1.0)
    assert maj["protocol"] == "majority" and list(maj["protocols"]) == ["majority"]
    assert maj["pq"] == pytest.approx(1.0) and maj["miou"] == pytest.approx(1.0)
    assert maj["mapped_categories"] == hung["mapped_categories"] + 1
    u2 = hung["protocols"]["u2seg"]  # votes map the split class's two pseudo ids too (one per image each)
    assert u2["pq"] == pytest.approx(1.0) and u2["mapped_categories"] == maj["mapped_categories"]

    # the model's predictions (predict/) score into eval/model/
    write_prediction(root, world, prefix="predict")
    model = run_evaluate_model(cfg, root)
    assert model["predictions"] == "predict" and model["pq"] == pytest.approx(1.0)
    check_outputs(root, model, "eval/model")


def test_evaluate_on_s3(s3, caplog):
    world = s3.uri(f"world-{uuid.uuid4().hex[:8]}")
    make_synthetic(world, N_IMAGES, seed=3, min_size=48, max_size=80, storage_options=s3.storage_options())
    run = s3.uri(f"run-{uuid.uuid4().hex[:8]}")
    so = s3.storage_options()
    storage = [f"run.storage.endpoint_url={so['client_kwargs']['endpoint_url']}", f"run.storage.key={so['key']}",
               f"run.storage.secret={so['secret']}", "run.storage.region=us-east-1"]
    cfg = load_config(None, [f"run.run_root={run}", *storage,
                             *[o for o in gt_overrides(world) if "gt_panoptic_dir" not in o]])
    root = RunRoot(run, cfg.run.storage.storage_options())  # as the stage runner opens it
    write_prediction(root, world, so, noise=True)
    with caplog.at_level(logging.WARNING, logger="u2seg.pipeline.evaluate"):
        stats = run_evaluate_labels(cfg, root)  # gt_panoptic_dir defaults to gt/panoptic next to the JSON
    assert stats["images"] == N_IMAGES and 0.2 < stats["pq"] < 0.99
    check_outputs(root, stats)
    assert not [r for r in caplog.records if r.name == "u2seg.pipeline.evaluate"]  # source images read

    # U2Seg's supercategory ground truth made on S3 (storage from the run.storage overrides), then scored against
    sup = f"{world}/gt/panoptic_supercategory.json"
    assert main(["gt-supercategory", "--panoptic-json", f"{world}/gt/panoptic.json", "--out-json", sup,
                 *storage]) == 0
    sup_cfg = load_config(None, [f"run.run_root={run}", *storage, f"evaluate.gt_panoptic_json={sup}",
                                 f"evaluate.gt_instances_json={world}/gt/instances.json", "evaluate.protocols=[u2seg]"])
    sup_stats = run_evaluate_labels(sup_cfg, root)
    metrics = root.read_json("eval/labels", "metrics.json")
    assert metrics["summary"]["gt_categories"] == 6 + 1  # the world's things and its one stuff supercategory
    record = root.read_json("eval/labels", "mapping.json")["protocols"]["u2seg"]
    assert set(record["stuff"]["mapping"].values()) == {301}  # every voting stuff cluster -> the supercategory
    assert sup_stats["images"] == N_IMAGES and sup_stats["protocol"] == "u2seg" and sup_stats["pq_stuff"] > 0


def test_cli_evaluate_and_missing_gt(tmp_path, world, capsys):
    run = str(tmp_path / "run")
    write_prediction(RunRoot(run), world)
    tree: dict = {"run": {"run_root": run}, "evaluate": {}}
    for o in gt_overrides(world):
        k, v = o.split("=", 1)
        tree["evaluate"][k.split(".")[1]] = yaml.safe_load(v)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tree))
    mark_upstream(RunRoot(run), load_config(str(path)), "label")
    assert main(["evaluate", "--config", str(path)]) == 0
    stats = json.loads(RunRoot(run).read_text("eval/labels", "stats.json"))
    assert stats["pq"] == pytest.approx(1.0) and stats["stage"] == "evaluate"
    assert RunRoot(run).exists("eval/labels", "report.html") and RunRoot(run).exists("eval/labels", "_SUCCESS")

    with pytest.raises(ConfigError, match=r"evaluate\.gt_panoptic_json"):
        run_evaluate_labels(load_config(None, [f"run.run_root={run}"]), RunRoot(run))
    capsys.readouterr()
    other = str(tmp_path / "other")
    mark_upstream(RunRoot(other), load_config(None, [f"run.run_root={other}"]), "label")
    assert main(["evaluate", f"run.run_root={other}"]) == 2
    assert "evaluate.gt_panoptic_json" in capsys.readouterr().err


def _snapshot(root: RunRoot, folder: str) -> dict[str, bytes]:
    return {name: root.read_bytes(folder, name) for name in root.list(folder)}


def test_model_and_label_evaluations_never_touch_each_other(tmp_path, world):
    """Evaluating the model leaves the labels' eval files byte-identical, and the reverse; a failed
    evaluation leaves the previous results (and their marker) as they were."""
    run = str(tmp_path / "run")
    root = RunRoot(run)
    write_prediction(root, world, noise=True)
    write_prediction(root, world, prefix="predict")
    base = [f"run.run_root={run}", *gt_overrides(world)]
    mark_upstream(root, load_config(None, base), "label", "predict")
    assert main(["evaluate", *base]) == 0
    labels_eval = _snapshot(root, "eval/labels")
    assert {"metrics.json", "mapping.json", "report.html", "_SUCCESS", "stats.json"} <= set(labels_eval)
    assert main(["evaluate", *base, "evaluate.target=model"]) == 0
    assert _snapshot(root, "eval/labels") == labels_eval
    model_eval = _snapshot(root, "eval/model")
    model_metrics = root.read_json("eval/model", "metrics.json")["protocols"]
    assert model_metrics["hungarian"]["panoptic"]["All"]["pq"] == pytest.approx(1.0)
    assert model_metrics["u2seg"]["panoptic"]["All"]["pq"] == pytest.approx(1.0)
    assert main(["evaluate", *base, "evaluate.report_images=2"]) == 0  # the labels again, another config
    assert _snapshot(root, "eval/model") == model_eval
    assert _snapshot(root, "eval/labels") != labels_eval
    labels_eval = _snapshot(root, "eval/labels")

    unrelated = tmp_path / "unrelated.json"  # a labeled set sharing no image with the run
    with open(f"{world}/gt/panoptic.json") as fh:
        gt = json.load(fh)
    for im in gt["images"]:
        im["file_name"] = "other_" + im["file_name"]
    unrelated.write_text(json.dumps(gt))
    with pytest.raises(ValueError, match="matches a ground-truth image"):
        main(["evaluate", *base, f"evaluate.gt_panoptic_json={unrelated}",
              f"evaluate.gt_panoptic_dir={world}/gt/panoptic"])
    assert _snapshot(root, "eval/labels") == {**labels_eval, "_STARTED": root.read_bytes("eval/labels", "_STARTED")}
    assert _snapshot(root, "eval/model") == model_eval


# ----------------------------------------------------------------------------- where the protocols differ

HAND_GT_CATS = [{"id": 1, "name": "box", "supercategory": "object", "isthing": 1},
                {"id": 2, "name": "sky", "supercategory": "sky", "isthing": 0},
                {"id": 3, "name": "grass", "supercategory": "plant", "isthing": 0}]


def write_hand_case(tmp_path, root: RunRoot) -> list[str]:
    """One 10x10 image: sky on rows 0-4 (50 px), grass below (41 px) around a 3x3 box (rows 6-8, cols 2-4).

    Pseudo classes (1 thing, 3 stuff): the box is thing 1, grass is stuff 2, and the sky is split in two
    stuff clusters, 3 on columns 0-5 (30 px) and 4 on columns 6-9 (20 px). Returns the gt overrides.
    """
    sky, grass, box = np.zeros((10, 10), bool), np.zeros((10, 10), bool), np.zeros((10, 10), bool)
    sky[:5] = True
    box[6:9, 2:5] = True
    grass[5:] = True
    grass &= ~box
    gt_ids = np.zeros((10, 10), np.int64)
    gt_ids[sky], gt_ids[grass], gt_ids[box] = 1, 2, 3
    gt_dir = tmp_path / "gt"
    (gt_dir / "panoptic").mkdir(parents=True)
    (gt_dir / "panoptic" / "a.png").write_bytes(panoptic_png_bytes(gt_ids))
    (tmp_path / "img").mkdir()
    cv2.imwrite(str(tmp_path / "img" / "a.png"), np.full((10, 10, 3), 99, np.uint8))
    gt_image = {"id": 1, "file_name": "a.jpg", "width": 10, "height": 10}
    segs = [{"id": 1, "category_id": 2, "iscrowd": 0, "area": 50, "bbox": [0, 0, 10, 5]},
            {"id": 2, "category_id": 3, "iscrowd": 0, "area": 41, "bbox": [0, 5, 10, 5]},
            {"id": 3, "category_id": 1, "iscrowd": 0, "area": 9, "bbox": [2, 6, 3, 3]}]
    (gt_dir / "panoptic.json").write_text(json.dumps(
        {"images": [gt_image], "annotations": [{"image_id": 1, "file_name": "a.png", "segments_info": segs}],
         "categories": HAND_GT_CATS}))
    gt_inst = instance_annotations(1, [box], [0], None, start_ann_id=1)
    (gt_dir / "instances.json").write_text(json.dumps(
        {"images": [gt_image], "annotations": gt_inst, "categories": HAND_GT_CATS[:1]}))

    pred_ids = np.zeros((10, 10), np.int64)
    left = np.zeros((10, 10), bool)
    left[:, :6] = True
    pred_ids[box], pred_ids[grass], pred_ids[sky & left], pred_ids[sky & ~left] = 1, 2, 3, 4
    pred_segs = [{"id": 1, "category_id": 1, "iscrowd": 0}, {"id": 2, "category_id": 2, "iscrowd": 0},
                 {"id": 3, "category_id": 3, "iscrowd": 0}, {"id": 4, "category_id": 4, "iscrowd": 0}]
    labels = LabelSet(root, "labels", 1, 3)
    labels.commit("g", Fragment([labels.write_image("g", "a" * 16, str(tmp_path / "img" / "a.png"), pred_ids,
                                                    pred_segs, scores={1: 0.9})]))
    return [f"evaluate.gt_panoptic_json={gt_dir}/panoptic.json", f"evaluate.gt_panoptic_dir={gt_dir}/panoptic",
            f"evaluate.gt_instances_json={gt_dir}/instances.json", "evaluate.report_images=1"]


def test_hungarian_and_u2seg_differ_on_a_split_stuff_class(tmp_path):
    """Hungarian maps one of the two sky clusters (the other is void), U2Seg's votes map both; the numbers
    follow by hand (module doc of u2seg.pipeline.evaluate):
    - hungarian: sky = the 30 px cluster, IoU 30/50 = 0.6 -> PQ (1 + 0.6 + 1) / 3; mIoU the same (the 20
      unmapped sky pixels are misses), pixel accuracy (9 + 30 + 41) / 100;
    - u2seg: both clusters -> sky, kept apart in PQ: the 30 px one matches (0.6), the 20 px one is a false
      positive -> sky PQ 0.6 / 1.5 = 0.4, PQ (1 + 0.4 + 1) / 3; mIoU 1 (things, sky, grass all exact);
      U2Seg's in-place relabel sends grass (cluster 1 in U2Seg's numbering -> label 2 = the key of sky
      cluster 3 -> label 1) to sky as well: sky IoU 50/91, grass 0, things 1, pixel accuracy 59/100;
    - majority: both clusters -> sky, merged per image in PQ: everything exact.
    """
    run = str(tmp_path / "run")
    root = RunRoot(run)
    overrides = write_hand_case(tmp_path, root)
    cfg = load_config(None, [f"run.run_root={run}", *overrides, "evaluate.protocols=[hungarian, u2seg, majority]"])
    stats = run_evaluate_labels(cfg, root)
    hung, u2, maj = (stats["protocols"][p] for p in ("hungarian", "u2seg", "majority"))
    assert stats["protocol"] == "hungarian" and stats["pq"] == hung["pq"]

    assert hung["mapped_categories"] == 3 and u2["mapped_categories"] == 4 and maj["mapped_categories"] == 4
    assert hung["pq"] == pytest.approx(2.6 / 3) and hung["pq_stuff"] == pytest.approx(0.8)
    assert hung["pq_things"] == pytest.approx(1.0) and hung["rq"] == pytest.approx(1.0)
    assert hung["miou"] == pytest.approx(2.6 / 3) and hung["pixel_accuracy"] == pytest.approx(0.80)
    assert hung["ap_segm"] == pytest.approx(1.0) and hung["ap_bbox"] == pytest.approx(1.0)

    assert u2["pq"] == pytest.approx(2.4 / 3) and u2["pq_stuff"] == pytest.approx(0.7)
    assert u2["sq"] == pytest.approx(2.6 / 3) and u2["rq"] == pytest.approx((2 + 2 / 3) / 3)
    assert u2["pq_things"] == pytest.approx(1.0)
    assert u2["miou"] == pytest.approx(1.0) and u2["pixel_accuracy"] == pytest.approx(1.0)
    assert u2["miou_inplace"] == pytest.approx((1 + 50 / 91 + 0) / 3)
    assert u2["pixel_accuracy_inplace"] == pytest.approx(0.59)
    assert u2["ap_bbox"] == pytest.approx(1.0) and "ap_segm" not in u2

    assert maj["pq"] == pytest.approx(1.0) and maj["miou"] == pytest.approx(1.0)

    metrics = root.read_json("eval/labels", "metrics.json")["protocols"]
    sky = metrics["u2seg"]["panoptic"]["per_class"]["2"]
    assert (sky["tp"], sky["fp"], sky["fn"]) == (1, 1, 0)
    assert metrics["u2seg"]["summary"]["inplace_relabel_changes_mapping"] is True
    assert set(metrics["u2seg"]["semantic"]["per_class"]) == {"0", "2", "3"}  # "things" + the gt stuff classes
    records = root.read_json("eval/labels", "mapping.json")["protocols"]
    assert records["hungarian"]["mapping"] == {"1": 1, "2": 3, "3": 2}
    assert records["u2seg"]["mapping"] == {"1": 1, "2": 3, "3": 2, "4": 2}
    assert records["u2seg"]["stuff"]["winning_votes"] == {"2": 1, "3": 1, "4": 1}
    assert records["u2seg"]["semantic_inplace_mapping"] == {"0": 0, "2": 2, "3": 2, "4": 2}
    html = root.read_text("eval/labels", "report.html")
    assert html.count("data:image/png;base64,") == 2 + 2 * 3 and "per-class PQ side by side" in html

    # without gt instances, U2Seg's thing votes take the gt panoptic boxes: same mapping, no AP
    no_inst = load_config(None, [f"run.run_root={run}", *overrides[:2], "evaluate.protocols=[u2seg]"])
    alone = run_evaluate_labels(no_inst, root)
    assert alone["protocol"] == "u2seg" and alone["pq"] == pytest.approx(u2["pq"]) and "ap_bbox" not in alone
    record = root.read_json("eval/labels", "mapping.json")["protocols"]["u2seg"]
    assert record["thing_evidence"] == "gt panoptic segments" and record["mapping"]["1"] == 1


def test_cli_gt_supercategory_on_the_synthetic_world(tmp_path, capsys):
    world = str(tmp_path / "world")
    assert main(["synth", "--n", "3", "--out", world, "--min-size", "48", "--max-size", "64"]) == 0
    out_json = str(tmp_path / "sup" / "panoptic_sup.json")
    capsys.readouterr()
    assert main(["gt-supercategory", "--panoptic-json", f"{world}/gt/panoptic.json", "--out-json", out_json]) == 0
    printed = json.loads(capsys.readouterr().out)
    src = json.loads(Path(f"{world}/gt/panoptic.json").read_text())
    out = json.loads(Path(out_json).read_text())
    things = [c for c in src["categories"] if c["isthing"]]
    supers = sorted({c["supercategory"] for c in src["categories"] if not c["isthing"]})
    assert [c["id"] for c in out["categories"]] == [c["id"] for c in things] + [301 + k for k in range(len(supers))]
    stuff_ids = {c["id"] for c in src["categories"] if not c["isthing"]}
    assert printed["images"] == len(src["annotations"]) == len(out["annotations"])
    assert printed["stuff_relabeled"] == sum(s["category_id"] in stuff_ids for a in src["annotations"]
                                             for s in a["segments_info"])
    for a, b in zip(src["annotations"], out["annotations"], strict=True):
        assert [s["id"] for s in a["segments_info"]] == [s["id"] for s in b["segments_info"]]
        assert all(t["category_id"] == (301 if s["category_id"] in stuff_ids else s["category_id"])
                   for s, t in zip(a["segments_info"], b["segments_info"], strict=True))
        # the PNG folder defaults to the JSON's name; PNGs are copied byte for byte (U2Seg relabels JSON only)
        with open(f"{world}/gt/panoptic/{a['file_name']}", "rb") as f1, \
                open(f"{tmp_path}/sup/panoptic_sup/{b['file_name']}", "rb") as f2:
            assert f1.read() == f2.read()
    assert main(["gt-supercategory", "--panoptic-json", f"{tmp_path}/missing.json", "--out-json", out_json]) == 2
    assert "missing" in capsys.readouterr().err
