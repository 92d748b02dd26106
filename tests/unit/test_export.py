"""`u2seg export coco` on hand-built label sets: all or a subset, PNGs copied or referenced; the COCO
panoptic file-level rules; the threshold knob stays out of every stage hash."""

from __future__ import annotations

import json

import numpy as np
import pytest

from u2seg.errors import InputsError, UserError
from u2seg.io import RunRoot
from u2seg.io.labelset import Fragment, LabelSet
from u2seg.labels import coco_panoptic_problems, decode_panoptic_png, pseudo_categories, validate_panoptic
from u2seg.pipeline.export import export_coco, label_set_prefix, read_image_list

pytestmark = pytest.mark.unit

K_THINGS, K_STUFF = 2, 2


def _seg(k: int) -> tuple[np.ndarray, list[dict]]:
    """Image k: a thing square (class 1 + k % 2) whose size depends on k, stuff (class 3) on the right."""
    seg = np.zeros((8, 10), np.int32)
    seg[1:3 + k % 3, 1:4] = 5
    seg[:, 6:] = 9
    return seg, [{"id": 5, "category_id": 1 + k % 2}, {"id": 9, "category_id": 3}]


def _image_id(k: int) -> str:
    return f"{k:x}".ljust(16, "c")  # the first 13 hex digits make the COCO id


def _set(root: RunRoot, prefix: str = "labels", sizes: tuple[int, ...] = (2, 2, 1)) -> list[str]:
    """Groups of ``sizes`` images (a group per entry); returns the image ids in set order."""
    labels = LabelSet(root, prefix, K_THINGS, K_STUFF)
    ids, k = [], 0
    for g, n in enumerate(sizes):
        fragment = Fragment()
        for _ in range(n):
            seg, segments = _seg(k)
            fragment.add(labels.write_image(f"part-{g}", _image_id(k), f"/data/img{k}.jpg", seg, segments,
                                            scores={5: 0.5 + k / 100}))
            ids.append(_image_id(k))
            k += 1
        labels.commit(f"part-{g}", fragment, "d")
    return ids


def _check_export(out, n_images: int, *, copied: bool) -> dict:
    """The exported pair loads in pycocotools and passes the COCO panoptic rules, PNG by PNG when copied."""
    from pycocotools.coco import COCO

    coco = COCO(str(out / "instances.json"))
    pan = json.loads((out / "panoptic.json").read_text())
    assert len(coco.imgs) == len(pan["images"]) == len(pan["annotations"]) == n_images
    assert coco_panoptic_problems(pan) == []
    assert pan["categories"] == pseudo_categories(K_THINGS, K_STUFF)
    images = {im["id"]: im for im in pan["images"]}
    for ann in pan["annotations"]:
        if copied:
            assert ann["file_name"] == f"{images[ann['image_id']]['u2seg_image_id']}.png"
            ids = decode_panoptic_png((out / "panoptic" / ann["file_name"]).read_bytes())
            assert ids.shape == (images[ann["image_id"]]["height"], images[ann["image_id"]]["width"])
            assert validate_panoptic(ids, ann["segments_info"], categories=pan["categories"]) == []
        things = [s for s in ann["segments_info"] if s["category_id"] <= K_THINGS]
        inst = coco.imgToAnns[ann["image_id"]]
        assert len(inst) == len(things) == 1
        assert coco.annToMask(inst[0]).sum() == inst[0]["area"] == things[0]["area"]
        assert inst[0]["score"] == things[0]["score"]
    assert sorted(coco.anns) == list(range(1, len(coco.anns) + 1))
    if copied:
        assert sorted(p.name for p in (out / "panoptic").iterdir()) == sorted(
            f"{im['u2seg_image_id']}.png" for im in pan["images"])
    return pan


def test_export_all_with_pngs_loads_and_validates(tmp_path):
    root = RunRoot(str(tmp_path / "run"))
    ids = _set(root)
    stats = export_coco(root, "labels", str(tmp_path / "out"), copy_pngs=True)
    assert stats["images"] == 5 and stats["instances"] == 5 and stats["pngs_copied"] == 5
    assert stats["parts_read"] == 3 and stats["not_found"] == 0
    pan = _check_export(tmp_path / "out", 5, copied=True)
    assert [im["u2seg_image_id"] for im in pan["images"]] == ids
    assert pan["info"]["u2seg_png_dir"] == str(tmp_path / "out" / "panoptic")
    assert not root.exists("labels/panoptic.json")  # the export leaves the run root as it was


def test_export_a_listed_subset_without_pngs(tmp_path):
    root = RunRoot(str(tmp_path / "run"))
    ids = _set(root, "predict")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# a comment\n{ids[1]}\n\n/data/img4.jpg\nffffffffffffffff\n")
    keys = read_image_list(str(listing))
    assert keys == {ids[1], "/data/img4.jpg", "ffffffffffffffff"}
    stats = export_coco(root, "predict", str(tmp_path / "out"), images=keys)
    assert stats["images"] == 2 and stats["not_found"] == 1 and stats["pngs_copied"] == 0
    pan = _check_export(tmp_path / "out", 2, copied=False)
    assert [im["u2seg_image_id"] for im in pan["images"]] == [ids[1], ids[4]]
    # the JSON names the set's own PNGs, under the folder its info names
    assert [a["file_name"] for a in pan["annotations"]] == [f"part-0/{ids[1]}.png", f"part-2/{ids[4]}.png"]
    assert pan["info"]["u2seg_png_dir"] == root.join("predict", "panoptic")
    for a in pan["annotations"]:
        ids_map = decode_panoptic_png(root.read_bytes("predict/panoptic", a["file_name"]))
        assert validate_panoptic(ids_map, a["segments_info"], categories=pan["categories"]) == []


def test_export_limit_reads_only_the_groups_it_needs(tmp_path):
    root = RunRoot(str(tmp_path / "run"))
    ids = _set(root, "selftrain/round-1/labels", sizes=(2, 2, 2))
    stats = export_coco(root, "selftrain/round-1/labels", str(tmp_path / "out"), limit=3, copy_pngs=True)
    assert stats["images"] == 3 and stats["parts_read"] == 2 and stats["pngs_copied"] == 3
    pan = _check_export(tmp_path / "out", 3, copied=True)
    assert [im["u2seg_image_id"] for im in pan["images"]] == ids[:3]
    # a limit over a list: the first N listed images the set holds
    stats = export_coco(root, "selftrain/round-1/labels", str(tmp_path / "out2"), limit=1,
                        images={ids[5], ids[2], ids[4]})
    assert stats["images"] == 1
    assert json.loads((tmp_path / "out2" / "panoptic.json").read_text())["images"][0]["u2seg_image_id"] == ids[2]


def test_export_refuses_bad_requests(tmp_path):
    root = RunRoot(str(tmp_path / "run"))
    with pytest.raises(UserError, match="not a label set"):
        label_set_prefix("extract")
    assert label_set_prefix("selftrain/round-12/predictions/") == "selftrain/round-12/predictions"
    with pytest.raises(InputsError, match=r"no committed label part.*u2seg predict"):
        export_coco(root, "predict", str(tmp_path / "out"))
    _set(root)
    with pytest.raises(UserError, match="positive"):
        export_coco(root, "labels", str(tmp_path / "out"), limit=0)
    with pytest.raises(InputsError, match="no such file"):
        read_image_list(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(InputsError, match="lists no image"):
        read_image_list(str(tmp_path / "empty.txt"))


def test_cli_export_coco(tmp_path, capsys):
    from u2seg.cli import main

    run = tmp_path / "run"
    _set(RunRoot(str(run)))
    out = tmp_path / "coco"
    assert main(["export", "coco", "--limit", "2", "--copy-pngs", "--out", str(out), f"run.run_root={run}"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["images"] == 2 and stats["instances_json"] == str(out / "instances.json")
    _check_export(out, 2, copied=True)
    assert main(["export", "coco", "--set", "eval", "--out", str(out), f"run.run_root={run}"]) == 2
    assert "not a label set" in capsys.readouterr().err


def test_coco_panoptic_problems_names_each_broken_rule():
    cats = pseudo_categories(1, 1)
    good = {"images": [{"id": 1, "file_name": "a.jpg", "width": 4, "height": 4}],
            "annotations": [{"image_id": 1, "file_name": "a.png", "segments_info": [{"id": 1, "category_id": 2}]}],
            "categories": cats}
    assert coco_panoptic_problems(good) == []
    bad = {"images": [*good["images"], {"id": 1, "file_name": "b.jpg", "width": 4, "height": 4},
                      {"id": 3, "file_name": "c.jpg"}],
           "annotations": [*good["annotations"], {"image_id": 1, "file_name": "a.png", "segments_info": []},
                           {"image_id": 9, "file_name": "z.jpg", "segments_info": [{"id": 1, "category_id": 7}]}],
           "categories": [*cats, {"id": 2, "name": "x", "supercategory": "s", "isthing": 2, "color": [1, 2]}]}
    problems = "\n".join(coco_panoptic_problems(bad))
    for expected in ("image id 1: listed more than once", "image 3: missing keys ['width', 'height']",
                     "image id 1: more than one annotation", "file_name 'a.png' used twice",
                     "unknown image id 9", "'z.jpg' is not a .png", "unknown category ids [7]",
                     "image id 3: no annotation", "category id 2: listed more than once", "isthing 2",
                     "is not RGB"):
        assert expected in problems, expected
    assert coco_panoptic_problems({"images": []}) == ["'annotations' must be a list", "'categories' must be a list"]


def test_coco_max_images_is_in_no_stage_hash():
    from u2seg.config import load_config
    from u2seg.pipeline.stages import STAGES

    small, large = load_config(None, []), load_config(None, ["label.coco_max_images=7"])
    assert large.label.coco_max_images == 7
    assert all(st.config_hash(small) == st.config_hash(large) for st in STAGES)
    assert load_config(None, ["label.min_stuff_area=0"]).label.min_stuff_area == 0  # other label knobs still count
    assert STAGES[4].name == "label" and STAGES[4].config_hash(load_config(None, ["label.min_stuff_area=0"])) \
        != STAGES[4].config_hash(small)
