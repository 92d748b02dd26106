"""COCO / COCO-panoptic encodings of pseudo-labels: PNGs, annotation dicts, pseudo categories.

The panoptic PNG follows panopticapi's convention (id = R + 256 G + 256^2 B, void = 0), written
with cv2 so the library does not depend on panopticapi. Category ids match ``panoptic_merge``:
thing cluster c -> c + 1, stuff cluster s -> k_things + 1 + s.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from u2seg.labels.masks import MaskLike, decode_mask, encode_rle, mask_area_bbox
from u2seg.labels.panoptic import MAX_SEGMENT_ID


def _png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise ValueError(f"PNG encoding failed for array {image.dtype} {image.shape}")
    return buf.tobytes()


def _decode_png(data: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError("not a decodable PNG")
    return image


def panoptic_png_bytes(seg_ids: np.ndarray) -> bytes:
    """Encode a segment-id map (0 = void) as an RGB PNG with id = R + 256 G + 256^2 B (panopticapi)."""
    ids = np.asarray(seg_ids)
    if ids.ndim != 2:
        raise ValueError(f"seg_ids must be 2-D, got shape {ids.shape}")
    ids = ids.astype(np.int64)
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) > MAX_SEGMENT_ID):
        raise ValueError(f"segment ids must lie in 0..{MAX_SEGMENT_ID}")
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
    return _png(np.ascontiguousarray(rgb[..., ::-1]))  # cv2 writes BGR


def decode_panoptic_png(data: bytes) -> np.ndarray:
    """Segment ids (int32 [H, W]) from a COCO panoptic PNG (RGB, or RGBA with alpha ignored)."""
    image = _decode_png(data)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"a panoptic PNG must be 8-bit RGB, got {image.dtype} {image.shape}")
    bgr = image[..., :3].astype(np.int32)
    return bgr[..., 2] + 256 * bgr[..., 1] + 65536 * bgr[..., 0]


def semantic_png_bytes(semantic: np.ndarray, *, num_categories: int | None = None) -> bytes:
    """Grayscale PNG of category ids (0 = void): 8-bit when they fit, else 16-bit.

    Pass ``num_categories`` to pick the depth from the category count rather than this image's
    maximum, so every file of a dataset has the same dtype.
    """
    sem = np.asarray(semantic)
    if sem.ndim != 2:
        raise ValueError(f"semantic map must be 2-D, got shape {sem.shape}")
    lo, hi = (int(sem.min()), int(sem.max())) if sem.size else (0, 0)
    if lo < 0 or hi > 65535:
        raise ValueError("semantic category ids must lie in 0..65535")
    top = hi if num_categories is None else int(num_categories)
    if top > 65535:
        raise ValueError(f"{top} categories do not fit a 16-bit PNG")
    if hi > top:
        raise ValueError(f"category id {hi} exceeds num_categories={top}")
    return _png(sem.astype(np.uint8 if top <= 255 else np.uint16))


def decode_semantic_png(data: bytes) -> np.ndarray:
    """Category ids (int32 [H, W]) from an 8- or 16-bit grayscale semantic PNG."""
    image = _decode_png(data)
    if image.ndim != 2:
        raise ValueError(f"a semantic PNG must be single-channel, got shape {image.shape}")
    return image.astype(np.int32)


def panoptic_annotation(
    image_id: int | str, file_name: str, segments_info: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """One entry of panoptic.json's "annotations" (file_name is the PNG's name)."""
    return {"image_id": image_id, "file_name": file_name, "segments_info": [dict(s) for s in segments_info]}


def _color(index: int, isthing: bool) -> list[int]:
    """Deterministic, well-spread colours: golden-ratio hue steps; stuff darker than things."""
    hue = (index * 0.618033988749895) % 1.0
    sat = 0.65 + 0.35 * ((index * 7) % 3) / 2
    val = 0.95 if isthing else 0.6
    return [round(255 * c) for c in colorsys.hsv_to_rgb(hue, sat, val)]


def pseudo_categories(k_things: int, k_stuff: int) -> list[dict[str, Any]]:
    """COCO categories for the pseudo classes: things 1..k_things, stuff k_things+1..k_things+k_stuff."""
    if k_things < 0 or k_stuff < 0:
        raise ValueError("k_things and k_stuff must be >= 0")
    things = [{"id": i + 1, "name": f"thing_{i}", "supercategory": "thing", "isthing": 1,
               "color": _color(i, True)} for i in range(k_things)]
    stuff = [{"id": k_things + 1 + j, "name": f"stuff_{j}", "supercategory": "stuff", "isthing": 0,
              "color": _color(j, False)} for j in range(k_stuff)]
    return things + stuff


def instance_annotations(
    image_id: int | str,
    masks: Sequence[MaskLike],
    classes: Sequence[int],
    scores: Sequence[float] | None,
    start_ann_id: int,
) -> list[dict[str, Any]]:
    """COCO instance annotations (RLE with str counts) for one image's thing masks.

    ``classes`` are 0-based thing cluster ids (category = class + 1). Empty masks are skipped, so
    ids run from ``start_ann_id`` over the kept masks only: the next free id is
    ``start_ann_id + len(result)``.
    """
    if len(classes) != len(masks) or (scores is not None and len(scores) != len(masks)):
        raise ValueError("masks, classes and scores must have the same length")
    anns: list[dict[str, Any]] = []
    for i, mask in enumerate(masks):
        if int(classes[i]) < 0:
            raise ValueError(f"thing class {classes[i]} is negative")
        rle = dict(mask) if isinstance(mask, dict) and isinstance(mask.get("counts"), str) \
            else encode_rle(decode_mask(mask))
        area, bbox = mask_area_bbox(rle)
        if area == 0:
            continue
        ann = {"id": start_ann_id + len(anns), "image_id": image_id, "category_id": int(classes[i]) + 1,
               "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"]},
               "area": area, "bbox": bbox, "iscrowd": 0}
        if scores is not None:
            ann["score"] = float(scores[i])
        anns.append(ann)
    return anns


def coco_image_id(image_id: str) -> int:
    """The COCO integer id of a u2seg image id (hex hash of the URI): 52 bits, exact in JSON and JavaScript."""
    return int(image_id[:13], 16)
