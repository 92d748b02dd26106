"""The synthetic world: deterministic bytes, and ground truth that agrees across its three encodings."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import cv2
import fsspec
import numpy as np
import pytest
from pycocotools.coco import COCO

from u2seg.data.synthetic import main, make_synthetic
from u2seg.data.world import CATEGORIES, MIN_VISIBLE_AREA, STUFF, THINGS, label_scene
from u2seg.io.images import decode_image, image_id_for

pytestmark = [pytest.mark.unit,  # pycocotools' annToMask trips a numpy 2 deprecation inside pycocotools
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

N = 12
SIZES = {"min_size": 64, "max_size": 112}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synthetic")
    summary = make_synthetic(str(out), N, seed=3, **SIZES)
    return out, summary


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _panoptic_ids(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED).astype(np.int64)
    return bgr[:, :, 2] + 256 * bgr[:, :, 1] + 65536 * bgr[:, :, 0]


def _load(root: Path, name: str) -> dict:
    return json.loads((root / "gt" / name).read_text())


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    out = tmp_path / "out"  # same root both times: the JSON records the image URIs
    make_synthetic(str(out), 4, seed=7, **SIZES)
    first = _files(out)
    shutil.rmtree(out)
    make_synthetic(str(out), 4, seed=7, **SIZES)
    second = _files(out)
    make_synthetic(str(tmp_path / "other"), 4, seed=8, **SIZES)
    other = _files(tmp_path / "other")
    assert len(first) == 4 * 3 + 2
    assert first.keys() == second.keys() and all(first[k] == second[k] for k in first)
    assert first["images/000000.jpg"] != other["images/000000.jpg"]


def test_layout_and_mixed_formats(world: tuple[Path, dict]) -> None:
    root, summary = world
    names = sorted(p.name for p in (root / "images").iterdir())
    assert {n.rsplit(".", 1)[1] for n in names} == {"jpg", "png"}
    assert len(names) == N == summary["n_images"]
    stems = sorted(n.rsplit(".", 1)[0] for n in names)
    assert stems == sorted(p.stem for p in (root / "gt" / "panoptic").iterdir())
    assert stems == sorted(p.stem for p in (root / "gt" / "semantic").iterdir())


@pytest.mark.parametrize("image_format", ["jpg", "png"])
def test_single_format(tmp_path: Path, image_format: str) -> None:
    make_synthetic(str(tmp_path), 3, image_format=image_format, **SIZES)
    assert {p.suffix for p in (tmp_path / "images").iterdir()} == {f".{image_format}"}


def test_image_records(world: tuple[Path, dict]) -> None:
    root, _ = world
    panoptic, instances = _load(root, "panoptic.json"), _load(root, "instances.json")
    assert panoptic["images"] == instances["images"]
    ids = [img["id"] for img in panoptic["images"]]
    assert ids == list(range(1, N + 1)) and all(type(i) is int for i in ids)
    shapes = set()
    for img in panoptic["images"]:
        assert img["uri"] == f"{root}/images/{img['file_name']}"
        assert img["u2seg_image_id"] == image_id_for(img["uri"])
        pixels = decode_image((root / "images" / img["file_name"]).read_bytes())
        assert pixels.shape == (img["height"], img["width"], 3)
        assert SIZES["min_size"] <= min(pixels.shape[:2]) <= max(pixels.shape[:2]) <= SIZES["max_size"]
        assert img["height"] != img["width"]
        shapes.add(pixels.shape)
    assert len(shapes) > N // 2


def test_categories(world: tuple[Path, dict]) -> None:
    root, summary = world
    cats = _load(root, "panoptic.json")["categories"]
    assert [c["id"] for c in cats] == list(range(1, len(CATEGORIES) + 1))
    assert sum(c["isthing"] for c in cats) == len(THINGS) == 6
    assert sum(1 - c["isthing"] for c in cats) == len(STUFF) == 5
    assert _load(root, "instances.json")["categories"] == [c for c in cats if c["isthing"]]
    assert summary["categories"] == cats


def test_panoptic_png_matches_segments_info(world: tuple[Path, dict]) -> None:
    root, _ = world
    panoptic = _load(root, "panoptic.json")
    thing_ids = {c.id for c in THINGS}
    by_image = {img["id"]: img for img in panoptic["images"]}
    for ann in panoptic["annotations"]:
        img = by_image[ann["image_id"]]
        ids = _panoptic_ids(root / "gt" / "panoptic" / ann["file_name"])
        assert ids.shape == (img["height"], img["width"])
        segs = ann["segments_info"]
        assert set(np.unique(ids)) - {0} == {s["id"] for s in segs}
        semantic = cv2.imread(str(root / "gt" / "semantic" / ann["file_name"]), cv2.IMREAD_UNCHANGED)
        assert semantic.dtype == np.uint8 and semantic.shape == ids.shape
        assert np.array_equal(semantic == 0, ids == 0)
        for seg in segs:
            where = ids == seg["id"]
            assert seg["area"] == int(where.sum()) > 0
            ys, xs = np.nonzero(where)
            assert seg["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert np.all(semantic[where] == seg["category_id"])
            assert seg["iscrowd"] == 0
            if seg["category_id"] in thing_ids:
                assert seg["area"] >= MIN_VISIBLE_AREA
        stuff_cats = [s["category_id"] for s in segs if s["category_id"] not in thing_ids]
        assert len(stuff_cats) == len(set(stuff_cats))  # one segment per stuff class


def test_instances_json_agrees_with_panoptic(world: tuple[Path, dict]) -> None:
    root, summary = world
    coco = COCO(str(root / "gt" / "instances.json"))
    panoptic = _load(root, "panoptic.json")
    thing_ids = {c.id for c in THINGS}
    n_things = 0
    for ann in panoptic["annotations"]:
        ids = _panoptic_ids(root / "gt" / "panoptic" / ann["file_name"])
        things = [s for s in ann["segments_info"] if s["category_id"] in thing_ids]
        inst = coco.loadAnns(coco.getAnnIds(imgIds=[ann["image_id"]]))
        assert len(inst) == len(things) >= 1
        for seg, inst_ann in zip(things, inst, strict=True):  # same order: paint order
            mask = coco.annToMask(inst_ann)
            assert np.array_equal(mask.astype(bool), ids == seg["id"])
            assert inst_ann["area"] == seg["area"] == int(mask.sum())
            assert inst_ann["category_id"] == seg["category_id"]
            assert inst_ann["bbox"] == [float(v) for v in seg["bbox"]]
            assert isinstance(inst_ann["segmentation"]["counts"], str) and inst_ann["iscrowd"] == 0
        n_things += len(things)
    assert n_things == summary["n_instances"] == len(coco.getAnnIds())
    assert len({a["id"] for a in coco.dataset["annotations"]}) == n_things


def _boxes_overlap(a: list[int], b: list[int]) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def test_occlusion_rules_drop_hidden_and_void_slivers() -> None:
    """Instance 0 is fully hidden (dropped), instance 1 keeps a sliver (void), instance 2 is whole."""
    h, w = 20, 30
    owner = np.full((h, w), -1, np.int32)
    owner[0:10, 0:10] = 1
    owner[0:10, 2:10] = 2  # covers instance 1 except a 10 x 2 = 20 px column ...
    owner[8:10, 0:2] = 2  # ... trimmed to 16 px < MIN_VISIBLE_AREA
    stuff = np.full((h, w), STUFF[0].id, np.int32)
    stuff[10:] = STUFF[1].id
    scene = label_scene(np.zeros((h, w, 3), np.uint8), stuff, owner, [c.id for c in THINGS[:3]])
    cats = [s.category_id for s in scene.segments]
    assert cats == [STUFF[0].id, STUFF[1].id, THINGS[2].id]  # no segment for instances 0 and 1
    assert int((scene.segment_map == 0).sum()) == 16 < MIN_VISIBLE_AREA
    assert scene.segments[2].area == int((owner == 2).sum()) and scene.segments[2].bbox == (0, 0, 10, 10)
    assert np.array_equal(scene.semantic_map() == 0, scene.segment_map == 0)
    assert sum(s.area for s in scene.segments) + 16 == h * w


def test_world_variety_and_distinct_appearance(tmp_path: Path) -> None:
    make_synthetic(str(tmp_path), 30, seed=0, image_format="png", **SIZES)
    panoptic = _load(tmp_path, "panoptic.json")
    thing_ids = {c.id for c in THINGS}
    colours: dict[int, list[np.ndarray]] = {c.id: [] for c in CATEGORIES}
    n_stuff, n_things = set(), set()
    overlapping = 0
    for img, ann in zip(panoptic["images"], panoptic["annotations"], strict=True):
        pixels = decode_image((tmp_path / "images" / img["file_name"]).read_bytes()).astype(np.float64)
        ids = _panoptic_ids(tmp_path / "gt" / "panoptic" / ann["file_name"])
        for seg in ann["segments_info"]:
            colours[seg["category_id"]].append(pixels[ids == seg["id"]].mean(axis=0))
        n_stuff.add(sum(s["category_id"] not in thing_ids for s in ann["segments_info"]))
        n_things.add(sum(s["category_id"] in thing_ids for s in ann["segments_info"]))
        boxes = [s["bbox"] for s in ann["segments_info"] if s["category_id"] in thing_ids]
        overlapping += sum(_boxes_overlap(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    assert all(colours.values()), "every category appears"
    assert n_stuff == {1, 2, 3}
    assert min(n_things) >= 1 and max(n_things) >= 5
    assert overlapping > 0, "some instances occlude others"
    means = np.array([np.mean(colours[c.id], axis=0) for c in CATEGORIES])
    gaps = np.linalg.norm(means[:, None] - means[None], axis=-1) + np.eye(len(means)) * 1e9
    assert gaps.min() > 20, "category mean colours must differ"


def test_fsspec_uri_output() -> None:
    uri = "memory://u2seg-synthetic-test"
    make_synthetic(uri, 2, **SIZES)
    fs = fsspec.filesystem("memory")
    panoptic = json.loads(fs.cat_file("/u2seg-synthetic-test/gt/panoptic.json"))
    first = panoptic["images"][0]
    assert first["uri"] == f"memory:///u2seg-synthetic-test/images/{first['file_name']}"
    assert fs.exists(f"/u2seg-synthetic-test/images/{first['file_name']}")
    fs.rm("/u2seg-synthetic-test", recursive=True)


def test_cli_and_cpu_time(tmp_path: Path) -> None:
    start = time.process_time()
    summary = main(["--n", "20", "--out", str(tmp_path), "--min-size", "240", "--max-size", "272"])
    assert summary["n_images"] == 20 and (tmp_path / "gt" / "panoptic.json").exists()
    assert time.process_time() - start < 5.0  # ~0.5 s expected: vectorised drawing, no per-pixel loops


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        make_synthetic(str(tmp_path), 1, image_format="gif")
    with pytest.raises(ValueError):
        make_synthetic(str(tmp_path), 1, min_size=100, max_size=50)
