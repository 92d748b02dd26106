"""`u2seg export coco` on a labelled tiny run (manifest..label on the 2-node cluster): a set above
label.coco_max_images has only its Parquet parts; the export writes COCO files that load in pycocotools
and pass the COCO panoptic rules, for the whole set (PNGs copied, local) and for a listed subset (s3://)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import s3_overrides, tiny_config

from u2seg.cli import main
from u2seg.io import RunRoot
from u2seg.io.labelset import LabelSet
from u2seg.labels import coco_panoptic_problems, decode_mask, decode_panoptic_png, validate_panoptic
from u2seg.pipeline.run_pipeline import run_pipeline

pytestmark = pytest.mark.integration

UP_TO_LABEL = ("manifest", "stuff", "extract", "cluster", "label")


@pytest.fixture(scope="module")
def labelled(ray_cluster, tmp_path_factory):
    """A tiny labelled run whose label set is above label.coco_max_images=3 (no merged files)."""
    from u2seg.data.synthetic import make_synthetic

    data = tmp_path_factory.mktemp("export-data")
    make_synthetic(str(data), 8, seed=4, min_size=64, max_size=96)
    run = tmp_path_factory.mktemp("export-run") / "run"
    cfg = tiny_config(str(run), [str(data / "images")], None, "label.coco_max_images=3")
    stats = run_pipeline(cfg, stages=UP_TO_LABEL)["stages"]
    return cfg, RunRoot(str(run)), stats["label"]


def _check(pan: dict, instances_path: str, read_png, k_things: int) -> None:
    """pycocotools loads the instances; the panoptic dict passes the file rules and every PNG its segments;
    the instances of an image are exactly its thing segments."""
    from pycocotools.coco import COCO

    coco = COCO(instances_path)
    assert coco_panoptic_problems(pan) == []
    assert len(coco.imgs) == len(pan["images"]) == len(pan["annotations"])
    images = {im["id"]: im for im in pan["images"]}
    for ann in pan["annotations"]:
        ids = read_png(ann["file_name"])
        assert ids.shape == (images[ann["image_id"]]["height"], images[ann["image_id"]]["width"])
        assert validate_panoptic(ids, ann["segments_info"], categories=pan["categories"]) == []
        things = [s for s in ann["segments_info"] if s["category_id"] <= k_things]
        inst = coco.imgToAnns[ann["image_id"]]
        assert len(inst) == len(things)
        for a in inst:
            assert coco.annToMask(a).sum() == a["area"] > 0
            assert any(np.array_equal(decode_mask(a["segmentation"]), ids == s["id"]) for s in things)


def test_large_set_has_only_parts_and_exports_whole_with_pngs(labelled, tmp_path, capsys):
    cfg, root, label_stats = labelled
    labels = LabelSet(root, "labels")
    n = len([r for r in root.read_parquet("extract/images").to_pylist() if r["status"] == "ok"])
    assert n > 3 and label_stats["images"] == n and label_stats["coco_files"] is False
    assert not root.exists("labels/panoptic.json") and not root.exists("labels/instances.json")
    assert labels.size()["images"] == n and len(labels.groups()) >= 2

    out = tmp_path / "coco"
    assert main(["export", "coco", "--set", "labels", "--copy-pngs", "--out", str(out),
                 f"run.run_root={root.uri}"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["images"] == stats["pngs_copied"] == n and stats["parts_read"] == len(labels.groups())
    pan = json.loads((out / "panoptic.json").read_text())
    assert len(pan["categories"]) == cfg.cluster.things_k + cfg.cluster.stuff_k
    assert {im["u2seg_image_id"] for im in pan["images"]} == {r["image_id"] for r in labels.iter_rows(["image_id"])}
    assert sorted(p.name for p in (out / "panoptic").iterdir()) == sorted(a["file_name"] for a in pan["annotations"])
    _check(pan, str(out / "instances.json"), lambda name: decode_panoptic_png((out / "panoptic" / name).read_bytes()),
           cfg.cluster.things_k)
    # the export's segments are the set's own
    by_id = {r["coco_id"]: r["segments"] for r in labels.iter_rows(["coco_id", "segments"])}
    assert all(a["segments_info"] == by_id[a["image_id"]] for a in pan["annotations"])


def test_listed_subset_exports_to_s3(labelled, s3, tmp_path, capsys):
    import fsspec

    cfg, root, _ = labelled
    rows = list(LabelSet(root, "labels").iter_rows(["image_id", "uri"]))
    chosen = [rows[0]["uri"], rows[-1]["image_id"]]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(chosen) + "\n")
    out = s3.uri("exports/coco-subset")
    assert main(["export", "coco", "--images", str(listing), "--out", out, f"run.run_root={root.uri}",
                 *s3_overrides(s3)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["images"] == 2 and stats["not_found"] == 0 and stats["pngs_copied"] == 0
    fs = fsspec.filesystem("s3", **s3.storage_options())
    base = out[len("s3://"):]
    (tmp_path / "instances.json").write_bytes(fs.cat_file(f"{base}/instances.json"))
    pan = json.loads(fs.cat_file(f"{base}/panoptic.json"))
    assert {im["u2seg_image_id"] for im in pan["images"]} == {rows[0]["image_id"], rows[-1]["image_id"]}
    assert pan["info"]["u2seg_png_dir"] == root.join("labels", "panoptic")
    _check(pan, str(tmp_path / "instances.json"),
           lambda name: decode_panoptic_png(root.read_bytes("labels/panoptic", name)), cfg.cluster.things_k)
