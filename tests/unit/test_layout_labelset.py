"""The run-root vocabulary (layout) and the label-set format (write, commit, read back, merge)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from u2seg.io import RunRoot, layout
from u2seg.io.labelset import Fragment, LabelSet
from u2seg.labels import decode_semantic_png, validate_panoptic

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


def test_write_commit_read_merge_and_clear(tmp_path):
    from pycocotools.coco import COCO

    root = RunRoot(str(tmp_path))
    labels = LabelSet(root, "predict", k_things=3, k_stuff=2)
    root.write_json("predict/_SUCCESS", {"config_hash": "h"})  # a stage marker in the same folder
    seg, segments = _image()
    for group, ids in (("g1", ["1aaa000000000000", "2aaa000000000000"]), ("g2", ["3bbb000000000000"])):
        fragment = Fragment()
        for image_id in ids:
            fragment.add(*labels.write_image(group, image_id, f"/data/{image_id}.jpg", seg, segments,
                                             scores={1: 0.8}))
        labels.commit(group, fragment, inputs=f"made-from-{group}")
    assert labels.groups() == ["g1", "g2"]
    assert labels.group_inputs() == {"g1": "made-from-g1", "g2": "made-from-g2"}
    images = list(labels.iter_images())
    assert [im.image_id for im in images] == ["1aaa000000000000", "2aaa000000000000", "3bbb000000000000"]
    assert images[0].uri == "/data/1aaa000000000000.jpg" and images[0].segments[0]["score"] == 0.8
    assert np.array_equal(labels.read_panoptic(images[0].png), seg)
    assert images[0].png == "predict/panoptic/g1/1aaa000000000000.png" and images[0].group == "g1"
    semantic = decode_semantic_png(root.read_bytes("predict/semantic/g1/1aaa000000000000.png"))
    assert semantic[2, 2] == 2 and semantic[0, 6] == 4 and semantic[0, 0] == 0
    counts = labels.merge("test")
    assert counts == {"images": 3, "instances": 3, "parts": 2}
    pan = labels.read_merged()
    assert len(pan["categories"]) == 5 and len(pan["annotations"]) == 3
    assert validate_panoptic(seg, pan["annotations"][0]["segments_info"], categories=pan["categories"]) == []
    coco = COCO(root.path("predict/instances.json"))
    ann = next(iter(coco.anns.values()))
    assert ann["score"] == 0.8 and ann["category_id"] == 2 and coco.annToMask(ann).sum() == 9
    labels.remove_groups(["g1"])
    assert labels.groups() == ["g2"] and not root.exists("predict/panoptic/g1") and root.exists("predict/panoptic/g2")
    labels.clear()
    assert labels.groups() == [] and not labels.has_merged() and root.exists("predict/_SUCCESS")


def test_a_label_set_opened_to_read_cannot_write(tmp_path):
    labels = LabelSet(RunRoot(str(tmp_path)), "labels")
    seg, segments = _image()
    with pytest.raises(ValueError, match="can only be read"):
        labels.write_image("g", "a" * 16, "/x.jpg", seg, segments)
