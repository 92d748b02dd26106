"""cluster -> label -> evaluate on the 2-node Ray cluster with the run root and images on S3."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from u2seg.io import RunRoot
from u2seg.io.layout import subdirs
from u2seg.labels import decode_mask, decode_panoptic_png, validate_panoptic
from u2seg.pipeline.run_stage import run_stage

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def s3_run(ray_cluster, s3, synthetic_world):
    """A tiny run on S3: 10 synthetic images (inputs and ground truth on S3 too), every stage done."""
    import s3fs
    from helpers import tiny_config

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3.storage_options())
    data = f"{s3.bucket}/world-{time.time_ns()}"
    names = sorted(p.name for p in (synthetic_world / "images").iterdir())[:10]
    for n in names:
        fs.pipe_file(f"{data}/images/{n}", (synthetic_world / "images" / n).read_bytes())
    gt = json.loads((synthetic_world / "gt" / "panoptic.json").read_text())
    for ann in gt["annotations"]:
        fs.pipe_file(f"{data}/gt/panoptic/{ann['file_name']}",
                     (synthetic_world / "gt" / "panoptic" / ann["file_name"]).read_bytes())
    fs.pipe_file(f"{data}/gt/panoptic.json", (synthetic_world / "gt" / "panoptic.json").read_bytes())
    fs.pipe_file(f"{data}/gt/instances.json", (synthetic_world / "gt" / "instances.json").read_bytes())
    root_uri = s3.uri(f"run-{time.time_ns()}")
    cfg = tiny_config(root_uri, [f"s3://{data}/images"], s3,
                      f"evaluate.gt_panoptic_json=s3://{data}/gt/panoptic.json",
                      f"evaluate.gt_panoptic_dir=s3://{data}/gt/panoptic",
                      f"evaluate.gt_instances_json=s3://{data}/gt/instances.json")
    stats = {s: run_stage(s, cfg) for s in ("manifest", "stuff", "extract", "cluster", "label", "evaluate")}
    return cfg, RunRoot(root_uri, cfg.run.storage.storage_options()), stats, len(names)


def test_cluster_outputs(s3_run):
    cfg, root, stats, _ = s3_run
    from u2seg.io.layout import load_npy

    things, stuff = load_npy(root, "cluster/things.npy"), load_npy(root, "cluster/stuff.npy")
    assert things.shape == (cfg.cluster.things_k, 384) and things.dtype == np.float32
    assert stuff.shape == (cfg.cluster.stuff_k, cfg.extract.stuff_dim)
    np.testing.assert_allclose(np.linalg.norm(things, axis=1), 1.0, atol=1e-4)   # spherical
    masks = root.read_parquet("extract/masks", columns=["image_id", "mask_id"]).to_pylist()
    assigned = root.read_parquet("cluster/assignments").to_pylist()
    key = sorted((r["image_id"], r["mask_id"]) for r in assigned)
    assert key == sorted((m["image_id"], m["mask_id"]) for m in masks)           # every mask once
    assert all(0 <= r["cluster_id"] < cfg.cluster.things_k for r in assigned)
    st = root.read_json("cluster/stats.json")
    assert len(st["things"]["inertia"]) >= 1 and "size_histogram" in st["stuff"]
    assert stats["cluster"]["masks_assigned"] == len(masks)


def test_labels_load_in_pycocotools_and_satisfy_panoptic_rules(s3_run, tmp_path):
    from pycocotools.coco import COCO

    cfg, root, _, n_images = s3_run
    (tmp_path / "instances.json").write_bytes(root.read_bytes("labels/instances.json"))
    coco = COCO(str(tmp_path / "instances.json"))
    assert len(coco.imgs) == n_images
    k_things = cfg.cluster.things_k
    for ann in coco.anns.values():
        m = coco.annToMask(ann)
        assert m.sum() == ann["area"] > 0
        assert 1 <= ann["category_id"] <= k_things
    pan = root.read_json("labels/panoptic.json")
    cats = {c["id"]: c for c in pan["categories"]}
    assert len(cats) == k_things + cfg.cluster.stuff_k
    assert all(cats[i]["isthing"] == (1 if i <= k_things else 0) for i in cats)
    assert len(pan["annotations"]) == n_images
    for ann in pan["annotations"]:
        ids = decode_panoptic_png(root.read_bytes("labels/panoptic", ann["file_name"]))
        img = next(i for i in pan["images"] if i["id"] == ann["image_id"])
        assert ids.shape == (img["height"], img["width"])
        assert validate_panoptic(ids, ann["segments_info"], categories=pan["categories"]) == []
        # instances.json masks are exactly the thing segments of the panoptic PNG
        inst = [a for a in coco.anns.values() if a["image_id"] == ann["image_id"]]
        things = [s for s in ann["segments_info"] if s["category_id"] <= k_things]
        assert len(inst) == len(things)
        for a in inst:
            assert any(np.array_equal(decode_mask(a["segmentation"]), ids == s["id"]) for s in things)
    semantic = [png for group in subdirs(root, "labels/semantic")
                for png in root.list(f"labels/semantic/{group}", ".png")]
    assert len(semantic) == n_images


def test_evaluate_reports_pseudo_label_quality(s3_run):
    _, root, stats, n_images = s3_run
    ev = stats["evaluate"]
    assert ev["images"] == n_images and ev["gt_without_prediction"] == ev["gt_images"] - n_images
    for k in ("pq", "sq", "rq", "miou", "pixel_accuracy", "ap_segm", "ap_agnostic_segm"):
        assert 0.0 <= ev[k] <= 1.0
    assert ev["pq"] > 0.0 and ev["miou"] > 0.0   # random-init features still find the stuff regions
    print(f"\nPSEUDO_LABEL_QUALITY_S3 pq={ev['pq']:.3f} sq={ev['sq']:.3f} rq={ev['rq']:.3f} "
          f"miou={ev['miou']:.3f} ap_segm={ev['ap_segm']:.3f}")
    assert "<table" in root.read_text("eval/labels/report.html")
    assert root.exists("eval/labels/metrics.json") and root.exists("eval/labels/mapping.json")
