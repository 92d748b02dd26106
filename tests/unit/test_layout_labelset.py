"""The run-root vocabulary (layout) and the label-set format (write, commit as Parquet parts, read back, merge)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from u2seg.io import RunRoot, layout
from u2seg.io.labelset import Fragment, LabelSet, LabelSetFormatError
from u2seg.io.schemas import LABELS_SCHEMA
from u2seg.labels import decode_semantic_png, validate_panoptic
from u2seg.labels.coco import coco_image_id

pytestmark = pytest.mark.unit


def test_group_names_depend_on_the_set_of_ids_only():
    assert layout.group_name(["b", "a"]) == layout.group_name(["a", "b"]) != layout.group_name(["a"])
    assert layout.group_name(["a"]).startswith("part-") and layout.group_name(["a"]).endswith(".parquet")
    assert layout.group_stem(layout.group_name(["a"])) + ".parquet" == layout.group_name(["a"])


def test_round_paths():
    assert layout.round_labels(0) == "labels"
    assert layout.round_labels(2) == "selftrain/round-2/labels"
    assert layout.round_predictions(1) == "selftrain/round-2/predictions"  # round 1's model -> round 2's labels
    assert layout.round_model(3) == "train/round-3/model.pt"


def test_counts_parts_rounds_and_classes(tmp_path):
    root = RunRoot(str(tmp_path))
    for name, ids in (("p1.parquet", ["a", "b"]), ("p2.parquet", ["c"])):
        root.write_parquet(f"manifest/{name}", pa.table({"image_id": ids}))
    assert layout.count_rows(root, "manifest") == 3
    assert layout.read_part(root, "manifest/p1.parquet", image_ids=["b", "z"]).column("image_id").to_pylist() == ["b"]
    assert layout.read_part(root, "manifest/missing.parquet") is None
    assert layout.latest_round(root) == -1
    root.write_text("train/round-0/model.pt", "w")
    root.write_text("train/round-1/metrics.jsonl", "")  # started, not finished
    root.write_text("train/round-10/model.pt", "w")
    assert layout.rounds_with(root, "train") == [0, 1, 10]
    assert layout.latest_round(root) == 10
    with pytest.raises(FileNotFoundError, match="run `u2seg cluster` first"):
        layout.class_counts(root)
    root.write_json(layout.CLUSTER_FIT, {"k_things": 4, "k_stuff": 2, "classes": "abc"})
    assert layout.class_counts(root) == (4, 2) and layout.classes_digest(root) == "abc"


def _image(h: int = 6, w: int = 8) -> tuple[np.ndarray, list[dict]]:
    seg = np.zeros((h, w), np.int32)
    seg[1:4, 1:4] = 1  # a thing (category 2)
    seg[:, 5:] = 2     # stuff (category k_things + 1 = 4)
    return seg, [{"id": 1, "category_id": 2, "area": 9, "bbox": [1, 1, 3, 3], "iscrowd": 0},
                 {"id": 2, "category_id": 4, "area": 18, "bbox": [5, 0, 3, 6], "iscrowd": 0}]


GROUPS = (("g1", ["1aaa000000000000", "2aaa000000000000"]), ("g2", ["3bbb000000000000"]))


def _write_set(root: RunRoot, prefix: str = "predict") -> tuple[LabelSet, dict[str, dict]]:
    """Two groups of the same image; the first image's thing is scored. Returns the set and the rows written."""
    labels = LabelSet(root, prefix, k_things=3, k_stuff=2)
    seg, segments = _image()
    written = {}
    for group, ids in GROUPS:
        fragment = Fragment()
        for image_id in ids:
            row = labels.write_image(group, image_id, f"/data/{image_id}.jpg", seg, segments,
                                     scores={1: 0.8} if image_id.startswith("1") else None)
            fragment.add(row)
            written[image_id] = {**row, "inputs": f"made-from-{group}", "group": group}
        labels.commit(group, fragment, inputs=f"made-from-{group}")
    return labels, written


def test_parts_round_trip_what_was_written(tmp_path):
    root = RunRoot(str(tmp_path))
    labels, written = _write_set(root)
    assert root.list("predict/parts", ".parquet") == ["g1.parquet", "g2.parquet"]
    assert pq.read_schema(root.path("predict/parts/g1.parquet")).remove_metadata() == LABELS_SCHEMA
    rows = list(labels.iter_rows())
    assert rows == [written[i] for _, ids in GROUPS for i in ids]
    first = rows[0]
    assert first["png"] == "panoptic/g1/1aaa000000000000.png" and first["coco_id"] == coco_image_id(first["image_id"])
    assert first["segments"][0]["score"] == 0.8 and "score" not in first["segments"][1]
    assert "score" not in rows[1]["segments"][0]  # unscored: no key, as written (not a null)
    # instances are the thing segments' masks, scored by their segment (else 1.0)
    assert [len(r["instances"]) for r in rows] == [1, 1, 1]
    assert first["instances"][0]["score"] == 0.8 and rows[1]["instances"][0]["score"] == 1.0
    assert first["instances"][0]["area"] == 9 and first["instances"][0]["bbox"] == [1.0, 1.0, 3.0, 3.0]
    # projection, groups, footers
    assert list(labels.iter_rows(["image_id", "group"])) == [
        {"image_id": i, "group": g} for g, ids in GROUPS for i in ids]
    assert list(labels.iter_rows(["uri"], groups=["g2"])) == [{"uri": "/data/3bbb000000000000.jpg"}]
    with pytest.raises(ValueError, match="unknown label-set columns"):
        list(labels.iter_rows(["image_id", "nope"]))
    assert labels.groups() == ["g1", "g2"]
    assert labels.group_inputs() == {"g1": "made-from-g1", "g2": "made-from-g2"}
    assert labels.size() == {"images": 3, "instances": 3, "parts": 2}
    images = list(labels.iter_images())
    assert [im.image_id for im in images] == ["1aaa000000000000", "2aaa000000000000", "3bbb000000000000"]
    assert images[0].uri == "/data/1aaa000000000000.jpg" and images[0].segments == first["segments"]
    assert images[0].png == "predict/panoptic/g1/1aaa000000000000.png" and images[0].group == "g1"
    assert (images[0].width, images[0].height) == (8, 6)
    seg, _ = _image()
    assert np.array_equal(labels.read_panoptic(images[0].png), seg)
    semantic = decode_semantic_png(root.read_bytes("predict/semantic/g1/1aaa000000000000.png"))
    assert semantic[2, 2] == 2 and semantic[0, 6] == 4 and semantic[0, 0] == 0
    # a set opened to read learns its class counts from a footer
    reader = LabelSet(root, "predict")
    assert (reader.k_things, reader.k_stuff) == (3, 2) and len(reader.categories()) == 5


def test_write_image_fills_missing_segment_stats_and_takes_given_instances(tmp_path):
    from u2seg.labels import encode_rle

    labels = LabelSet(RunRoot(str(tmp_path)), "labels", k_things=3, k_stuff=2)
    seg, _ = _image()
    box = np.zeros((6, 8), bool)
    box[0:2, 0:2] = True  # an instance that is not a panoptic segment (e.g. an occluded part)
    row = labels.write_image("g", "a" * 16, "/x/a.jpg", seg, [{"id": 1, "category_id": 2}, {"id": 2, "category_id": 4}],
                             instances=[{"category_id": 3, "segmentation": encode_rle(box), "score": 0.5}])
    assert row["segments"] == _image()[1]  # area, bbox and iscrowd from the pixels
    assert validate_panoptic(seg, row["segments"], categories=labels.categories()) == []
    assert row["instances"] == [{"category_id": 3, "segmentation": encode_rle(box), "area": 4,
                                 "bbox": [0.0, 0.0, 2.0, 2.0], "score": 0.5}]
    labels.commit("g", Fragment([row]))
    assert next(labels.iter_rows())["instances"] == row["instances"]


def test_empty_group_keeps_its_inputs_and_counts(tmp_path):
    root = RunRoot(str(tmp_path))
    labels = LabelSet(root, "labels", k_things=3, k_stuff=2)
    labels.commit("empty", Fragment(), inputs="digest")  # a group whose images all failed
    assert labels.groups() == ["empty"] and labels.group_inputs() == {"empty": "digest"}
    assert list(labels.iter_rows()) == [] and labels.size() == {"images": 0, "instances": 0, "parts": 1}
    assert LabelSet(root, "labels").k_stuff == 2


def test_merged_files_only_below_the_threshold(tmp_path):
    from pycocotools.coco import COCO

    root = RunRoot(str(tmp_path))
    labels, _ = _write_set(root)
    done = labels.finish("test", max_images=3)
    assert done == {"images": 3, "instances": 3, "parts": 2, "coco_files": True}
    pan = labels.read_merged()
    assert pan == {**labels.panoptic_dict(), "info": pan["info"], "licenses": []}
    assert len(pan["categories"]) == 5 and len(pan["annotations"]) == 3
    assert [a["file_name"] for a in pan["annotations"]] == [
        "g1/1aaa000000000000.png", "g1/2aaa000000000000.png", "g2/3bbb000000000000.png"]
    seg, _ = _image()
    for ann in pan["annotations"]:
        assert validate_panoptic(seg, ann["segments_info"], categories=pan["categories"]) == []
    coco = COCO(root.path("predict/instances.json"))
    assert sorted(coco.anns) == [1, 2, 3]
    ann = coco.anns[1]
    assert ann["score"] == 0.8 and ann["category_id"] == 2 and coco.annToMask(ann).sum() == 9
    assert labels.read_merged("instances.json")["annotations"] == labels.instances_dict()["annotations"]
    # above the threshold: no merged files (and a stale pair from a smaller run is removed)
    skipped = labels.finish("test", max_images=2)
    assert skipped == {"images": 3, "instances": 3, "parts": 2, "coco_files": False}
    assert not labels.has_merged() and not root.exists("predict/instances.json")
    assert len(labels.panoptic_dict()["annotations"]) == 3  # readers use the parts either way


def test_remove_groups_and_clear(tmp_path):
    root = RunRoot(str(tmp_path))
    labels, _ = _write_set(root)
    root.write_json("predict/_SUCCESS", {"config_hash": "h"})  # a stage marker in the same folder
    labels.merge("test")
    labels.remove_groups(["g1"])
    assert labels.groups() == ["g2"] and not root.exists("predict/panoptic/g1") and root.exists("predict/panoptic/g2")
    assert not root.exists("predict/semantic/g1") and [r["image_id"] for r in labels.iter_rows(["image_id"])] == [
        "3bbb000000000000"]
    labels.clear()
    assert labels.groups() == [] and not labels.has_merged() and root.exists("predict/_SUCCESS")
    assert not root.exists("predict/panoptic") and not root.exists("predict/parts")


def test_an_older_label_format_is_refused_until_rewritten(tmp_path):
    root = RunRoot(str(tmp_path))
    root.write_json("labels/_parts/part-abc.json", {"images": [], "panoptic": [], "instances": [], "inputs": ""})
    labels = LabelSet(root, "labels", k_things=3, k_stuff=2)
    assert labels.is_legacy()
    with pytest.raises(LabelSetFormatError, match="older u2seg"):
        labels.groups()
    labels.clear()
    assert not labels.is_legacy() and labels.groups() == []


def test_a_label_set_opened_to_read_cannot_write(tmp_path):
    labels = LabelSet(RunRoot(str(tmp_path)), "labels")
    seg, segments = _image()
    with pytest.raises(ValueError, match="can only be read"):
        labels.write_image("g", "a" * 16, "/x.jpg", seg, segments)
    with pytest.raises(ValueError, match="can only be read"):
        labels.commit("g", Fragment())
    assert labels.categories() == [] and labels.panoptic_dict()["images"] == []
