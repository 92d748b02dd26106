"""Evaluate stage end to end: synthetic ground truth turned into permuted "predictions", locally and on S3.

A prediction that is the ground truth with pseudo category ids (a fixed permutation) must score
PQ = mIoU = AP = 1 after Hungarian mapping; corrupting some segments must lower the scores.
"""

from __future__ import annotations

import json
import logging
import posixpath
import uuid

import fsspec
import numpy as np
import pytest
import yaml

from u2seg.cli import main
from u2seg.config import ConfigError, load_config
from u2seg.data.synthetic import make_synthetic
from u2seg.io import RunRoot
from u2seg.labels.coco import coco_image_id, decode_panoptic_png, panoptic_png_bytes, pseudo_categories
from u2seg.pipeline.evaluate import run_evaluate_labels, run_evaluate_model

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
    """The world's ground truth in the labels format, with pseudo category ids PERM[gt id].

    noise: on every other image the first thing becomes a wrong pseudo class and the first stuff
    segment becomes void. split_stuff: on odd images gt stuff class ``split_stuff`` uses a spare pseudo id.
    drop_first: the first gt image gets no prediction. extra: a prediction image unknown to the gt.
    """
    fs, base = fsspec.core.url_to_fs(world, **(storage_options or {}))
    gt = json.loads(fs.cat_file(f"{base}/gt/panoptic.json"))
    inst = json.loads(fs.cat_file(f"{base}/gt/instances.json"))
    anns = {a["image_id"]: a for a in gt["annotations"]}
    wrong = {c: THING_PERM[c % 6 + 1] for c in THING_PERM}  # a different (mapped) thing class
    images, pan, ins = [], [], []
    for k, im in enumerate(gt["images"]):
        if drop_first and k == 0:
            continue
        hex_id, cid = im["u2seg_image_id"], coco_image_id(im["u2seg_image_id"])
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
        png = f"{hex_id}.png"
        root.write_bytes(f"{prefix}/panoptic/{png}", panoptic_png_bytes(ids))
        images.append({"id": cid, "file_name": posixpath.basename(im["uri"]), "width": im["width"],
                       "height": im["height"], "u2seg_image_id": hex_id, "uri": im["uri"]})
        pan.append({"image_id": cid, "file_name": png, "segments_info": out_segs})
        first = True
        for a in inst["annotations"]:
            if a["image_id"] != im["id"]:
                continue
            cat = wrong[a["category_id"]] if noisy and first else PERM[a["category_id"]]
            first = False
            ins.append({"id": len(ins) + 1, "image_id": cid, "category_id": cat,
                        "segmentation": a["segmentation"], "bbox": a["bbox"], "area": a["area"],
                        "iscrowd": 0, "score": 0.9 - 0.01 * len(ins)})
    if extra:
        images.append({"id": 7, "file_name": "not_in_gt.jpg", "width": 8, "height": 8,
                       "u2seg_image_id": "0" * 16, "uri": "/nonexistent/not_in_gt.jpg"})
        pan.append({"image_id": 7, "file_name": "0000000000000000.png", "segments_info": []})
    cats = pseudo_categories(K_THINGS, K_STUFF)
    root.write_json(f"{prefix}/panoptic.json", {"images": images, "annotations": pan, "categories": cats})
    root.write_json(f"{prefix}/instances.json", {"images": images, "annotations": ins, "categories": cats})


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


def check_outputs(root: RunRoot, stats: dict, out: str = "eval/labels") -> None:
    metrics = root.read_json(out, "metrics.json")
    assert metrics["panoptic"]["All"]["pq"] == pytest.approx(stats["pq"])
    assert root.read_json(out, "mapping.json")["mapping"]
    html = root.read_text(out, "report.html")
    assert "<table" in html and "PQ" in html and "mIoU" in html
    assert html.count("data:image/png;base64,") == 3 * 4  # 3 samples x 4 tiles


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
    mapping = {int(k): v for k, v in root.read_json("eval/labels", "mapping.json")["mapping"].items()}
    inverse = {v: k for k, v in PERM.items()}
    assert mapping and all(inverse[p] == g for p, g in mapping.items())
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
                                          "evaluate.matching=majority"]), root)
    assert hung["pq_stuff"] < 0.99 and hung["pq_things"] == pytest.approx(1.0)
    assert maj["pq"] == pytest.approx(1.0) and maj["miou"] == pytest.approx(1.0)
    assert maj["mapped_categories"] == hung["mapped_categories"] + 1

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
    cfg = load_config(None, [f"run.run_root={run}",
                             f"run.storage.endpoint_url={so['client_kwargs']['endpoint_url']}",
                             f"run.storage.key={so['key']}", f"run.storage.secret={so['secret']}",
                             "run.storage.region=us-east-1",
                             *[o for o in gt_overrides(world) if "gt_panoptic_dir" not in o]])
    root = RunRoot(run, cfg.run.storage.storage_options())  # as the stage runner opens it
    write_prediction(root, world, so, noise=True)
    with caplog.at_level(logging.WARNING, logger="u2seg.pipeline.evaluate"):
        stats = run_evaluate_labels(cfg, root)  # gt_panoptic_dir defaults to gt/panoptic next to the JSON
    assert stats["images"] == N_IMAGES and 0.2 < stats["pq"] < 0.99
    check_outputs(root, stats)
    assert not [r for r in caplog.records if r.name == "u2seg.pipeline.evaluate"]  # source images read


def test_cli_evaluate_and_missing_gt(tmp_path, world, capsys):
    run = str(tmp_path / "run")
    write_prediction(RunRoot(run), world)
    tree: dict = {"run": {"run_root": run}, "evaluate": {}}
    for o in gt_overrides(world):
        k, v = o.split("=", 1)
        tree["evaluate"][k.split(".")[1]] = yaml.safe_load(v)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tree))
    assert main(["evaluate", "--config", str(path)]) == 0
    stats = json.loads(RunRoot(run).read_text("eval/labels", "stats.json"))
    assert stats["pq"] == pytest.approx(1.0) and stats["stage"] == "evaluate"
    assert RunRoot(run).exists("eval/labels", "report.html") and RunRoot(run).exists("eval/labels", "_SUCCESS")

    with pytest.raises(ConfigError, match=r"evaluate\.gt_panoptic_json"):
        run_evaluate_labels(load_config(None, [f"run.run_root={run}"]), RunRoot(run))
    capsys.readouterr()
    assert main(["evaluate", f"run.run_root={tmp_path / 'other'}"]) == 2
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
    assert main(["evaluate", *base]) == 0
    labels_eval = _snapshot(root, "eval/labels")
    assert {"metrics.json", "mapping.json", "report.html", "_SUCCESS", "stats.json"} <= set(labels_eval)
    assert main(["evaluate", *base, "evaluate.target=model"]) == 0
    assert _snapshot(root, "eval/labels") == labels_eval
    model_eval = _snapshot(root, "eval/model")
    assert root.read_json("eval/model", "metrics.json")["panoptic"]["All"]["pq"] == pytest.approx(1.0)
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
