"""Write a synthetic panoptic dataset (images + COCO / COCO-panoptic / semantic ground truth) to a URI.

Why: the pipeline must be testable end to end without downloading COCO, and the evaluator needs
exact ground truth in the same formats as the real benchmarks. Output is byte-identical for the same
arguments (fixed encoder settings, one numpy Generator per image seeded with (seed, index)), so
reruns overwrite identical objects and tests can compare files.

Layout under ``out_uri`` (local path or any fsspec URI such as s3://bucket/prefix)::

    images/<name>.jpg|png        the pictures
    gt/panoptic/<name>.png       COCO panoptic segment ids (id = R + 256 G + 256^2 B)
    gt/semantic/<name>.png       uint8 category id per pixel, 0 = void
    gt/panoptic.json             COCO panoptic: images, annotations (segments_info), categories
    gt/instances.json            COCO instances of the thing classes, RLE masks

Each image record has the integer COCO ``id``, ``file_name``, ``width``, ``height``, plus
``uri`` (the image's URI) and ``u2seg_image_id`` = image_id_for(uri), the key the
pipeline uses. The JSON files are written last: their presence means the dataset is complete.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import cv2
import fsspec
import numpy as np
from pycocotools import mask as mask_util

from u2seg.data.world import CATEGORIES, THINGS, Scene, render_scene
from u2seg.io.images import image_id_for

log = logging.getLogger(__name__)

JPEG_QUALITY = 92
PNG_COMPRESSION = 1
IMAGE_FORMATS = ("mixed", "jpg", "png")


def _encode(ext: str, array: np.ndarray) -> bytes:
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if ext == ".jpg" else [cv2.IMWRITE_PNG_COMPRESSION,
                                                                            PNG_COMPRESSION]
    ok, buf = cv2.imencode(ext, array, params)
    if not ok:
        raise RuntimeError(f"cv2 could not encode {ext}")
    return buf.tobytes()


def panoptic_png(segment_map: np.ndarray) -> bytes:
    """COCO panoptic PNG: segment id spread over R (low byte), G, B; cv2 wants the channels as BGR."""
    ids = segment_map.astype(np.uint32)
    bgr = np.stack([(ids >> 16) & 255, (ids >> 8) & 255, ids & 255], axis=-1).astype(np.uint8)
    return _encode(".png", bgr)


def _instance_annotations(scene: Scene, image_id: int, first_ann_id: int) -> list[dict]:
    thing_ids = {c.id for c in THINGS}
    anns = []
    for seg in scene.segments:
        if seg.category_id not in thing_ids:
            continue
        rle = mask_util.encode(np.asfortranarray((scene.segment_map == seg.id).astype(np.uint8)))
        anns.append({
            "id": first_ann_id + len(anns),
            "image_id": image_id,
            "category_id": seg.category_id,
            "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
            "area": int(mask_util.area(rle)),
            "bbox": [float(v) for v in mask_util.toBbox(rle)],
            "iscrowd": 0,
        })
    return anns


def _image_format(image_format: str, index: int) -> str:
    if image_format == "mixed":
        return "jpg" if index % 2 == 0 else "png"
    return image_format


def _image_size(rng: np.random.Generator, min_size: int, max_size: int) -> tuple[int, int]:
    """(height, width) drawn independently; never square when the range allows it."""
    h, w = (int(v) for v in rng.integers(min_size, max_size + 1, 2))
    if h == w and max_size > min_size:
        w = w + 1 if w < max_size else w - 1
    return h, w


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return "file" in protocols or "local" in protocols


def _root_uri(fs: fsspec.AbstractFileSystem, root: str) -> str:
    """URI form of the root: a plain absolute path locally, protocol://path elsewhere."""
    return root if _is_local(fs) else fs.unstrip_protocol(root)


def make_synthetic(out_uri: str, n: int, *, seed: int = 0, min_size: int = 160, max_size: int = 320,
                   storage_options: dict | None = None, image_format: str = "mixed", prefix: str = "") -> dict:
    """Render ``n`` images of the synthetic world with their ground truth under ``out_uri``.

    ``prefix`` starts every file name (e.g. ``val_``), so a held-out world's images are told apart from a
    training world's by name, as COCO's val2017 from train2017.

    Returns a summary: out_uri, n_images, n_instances, n_segments, image_format, categories, seconds.
    """
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    if not 2 <= min_size <= max_size:
        raise ValueError(f"need 2 <= min_size <= max_size, got {min_size}, {max_size}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    start = time.perf_counter()
    fs, root = fsspec.core.url_to_fs(out_uri, **(storage_options or {}))
    root = root.rstrip("/")
    root_uri = _root_uri(fs, root)
    if _is_local(fs):  # object stores have no folders (and makedirs there may try to create a bucket)
        for sub in ("images", "gt/panoptic", "gt/semantic"):
            fs.makedirs(f"{root}/{sub}", exist_ok=True)

    images: list[dict] = []
    panoptic_anns: list[dict] = []
    instance_anns: list[dict] = []
    for index in range(n):
        rng = np.random.default_rng([seed, index])  # independent stream per (seed, image)
        height, width = _image_size(rng, min_size, max_size)
        scene = render_scene(rng, height, width)
        name = f"{prefix}{index:06d}"
        ext = _image_format(image_format, index)
        file_name = f"{name}.{ext}"
        uri = f"{root_uri}/images/{file_name}"
        coco_id = index + 1
        fs.pipe_file(f"{root}/images/{file_name}", _encode(f".{ext}", scene.image[:, :, ::-1]))
        fs.pipe_file(f"{root}/gt/panoptic/{name}.png", panoptic_png(scene.segment_map))
        fs.pipe_file(f"{root}/gt/semantic/{name}.png", _encode(".png", scene.semantic_map()))
        images.append({"id": coco_id, "file_name": file_name, "width": width, "height": height,
                       "uri": uri, "u2seg_image_id": image_id_for(uri)})
        panoptic_anns.append({
            "image_id": coco_id,
            "file_name": f"{name}.png",
            "segments_info": [{"id": s.id, "category_id": s.category_id, "area": s.area, "bbox": list(s.bbox),
                               "iscrowd": 0} for s in scene.segments],
        })
        instance_anns.extend(_instance_annotations(scene, coco_id, len(instance_anns) + 1))

    info = {"description": "u2seg synthetic panoptic world", "seed": seed, "n": n,
            "min_size": min_size, "max_size": max_size, "image_format": image_format}
    categories = [c.to_coco() for c in CATEGORIES]
    panoptic = {"info": info, "images": images, "annotations": panoptic_anns, "categories": categories}
    instances = {"info": info, "images": images, "annotations": instance_anns,
                 "categories": [c.to_coco() for c in THINGS]}
    fs.pipe_file(f"{root}/gt/instances.json", json.dumps(instances, sort_keys=True).encode())
    fs.pipe_file(f"{root}/gt/panoptic.json", json.dumps(panoptic, sort_keys=True).encode())
    seconds = time.perf_counter() - start
    n_segments = sum(len(a["segments_info"]) for a in panoptic_anns)
    summary = {"out_uri": root_uri, "n_images": n, "n_instances": len(instance_anns),
               "n_segments": n_segments, "image_format": image_format, "categories": categories,
               "seconds": seconds}
    log.info("synthetic world: %d images, %d instances in %.2fs -> %s",
             n, len(instance_anns), seconds, root_uri)
    return summary


def main(argv: list[str] | None = None) -> dict:
    """``python -m u2seg.data.synthetic --n N --out URI``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, required=True, help="number of images")
    parser.add_argument("--out", required=True, help="output root: local path or fsspec URI (s3://...)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-size", type=int, default=160)
    parser.add_argument("--max-size", type=int, default=320)
    parser.add_argument("--format", choices=IMAGE_FORMATS, default="mixed", dest="image_format")
    parser.add_argument("--storage-options", default="{}", help="JSON dict passed to fsspec (endpoint, keys)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return make_synthetic(args.out, args.n, seed=args.seed, min_size=args.min_size, max_size=args.max_size,
                          storage_options=json.loads(args.storage_options), image_format=args.image_format)


if __name__ == "__main__":
    main()
