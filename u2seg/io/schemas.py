"""Every Parquet schema of the run root, declared once (docs/run-root.md describes the layout)."""

from __future__ import annotations

import pyarrow as pa

MANIFEST_SCHEMA = pa.schema([
    ("image_id", pa.string()),   # stable hash of the URI: reruns overwrite, never duplicate
    ("uri", pa.string()),
    ("bytes", pa.int64()),
    ("width", pa.int32()),       # -1 when not probed at manifest time
    ("height", pa.int32()),
    ("version", pa.string()),    # changes when the file changes (size + mtime, or the S3 ETag); "" if unknown
])

RLE_TYPE = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])

MASKS_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("mask_id", pa.int32()),
    ("rle", RLE_TYPE),                         # COCO RLE at image resolution
    ("bbox", pa.list_(pa.float32(), 4)),       # x, y, w, h
    ("area", pa.int64()),
    ("score", pa.float32()),
    ("descriptor", pa.list_(pa.float32())),    # crop_cls: the object crop's CLS; mask_pool: pooled tokens (unit)
    ("image_width", pa.int32()),
    ("image_height", pa.int32()),
])

PATCHES_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("feature", pa.list_(pa.float32())),       # L2-normalised patch feature (stuff clustering sample)
    ("row", pa.int32()),
    ("col", pa.int32()),
])

# The ledger: one row per processed input (ok or error), written last for its group. Also the image's
# size and what the label stage turns into a stuff map with no second backbone pass: the STEGO head's
# class per patch, or (k-means baseline) the pooled patch-feature grid.
IMAGES_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("uri", pa.string()),
    ("status", pa.string()),                   # "ok" or "error" (details in extract/errors)
    ("version", pa.string()),                  # the manifest version of the image this row was made from
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("n_masks", pa.int32()),
    ("grid_h", pa.int32()),
    ("grid_w", pa.int32()),
    ("stuff_grid", pa.list_(pa.float16())),    # stuff.method=kmeans: grid_h * grid_w * dim, row-major, float16
    ("stuff_dim", pa.int32()),
    ("stuff_classes", pa.list_(pa.uint8())),   # stuff.method=stego: grid_h * grid_w stuff classes, row-major
])

ERRORS_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("uri", pa.string()),
    ("stage", pa.string()),
    ("error_class", pa.string()),
    ("message", pa.string()),
])

ASSIGNMENTS_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("mask_id", pa.int32()),
    ("cluster_id", pa.int32()),
    ("distance", pa.float32()),
])


# A label set's committed unit: one part per group of images (``<set>/parts/<group>.parquet``), written after the
# group's PNGs. One row per image: its COCO image entry, its panoptic segments and its instance annotations.
# Each part's footer (``LABELS_META_*``) names the class counts and the inputs digest, so a reader learns
# them without reading a row (an empty group has no row to carry them).
SEGMENT_TYPE = pa.struct([
    ("id", pa.int32()),                        # the segment's id in the panoptic PNG (R + 256 G + 256^2 B)
    ("category_id", pa.int32()),
    ("area", pa.int64()),
    ("bbox", pa.list_(pa.int32(), 4)),         # x, y, w, h in pixels
    ("iscrowd", pa.int8()),
    ("score", pa.float64()),                   # predictions: the thing's score; null for pseudo-labels / stuff
])

INSTANCE_TYPE = pa.struct([
    ("category_id", pa.int32()),
    ("segmentation", RLE_TYPE),                # COCO RLE (compressed counts) at image resolution
    ("area", pa.int64()),
    ("bbox", pa.list_(pa.float64(), 4)),       # x, y, w, h as pycocotools computes them
    ("score", pa.float64()),                   # null when unscored
])

LABELS_SCHEMA = pa.schema([
    ("image_id", pa.string()),                 # u2seg image id (hash of the URI)
    ("coco_id", pa.int64()),                   # the COCO integer id (u2seg.labels.coco.coco_image_id)
    ("uri", pa.string()),
    ("file_name", pa.string()),                # the source file's name (the COCO image file_name)
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("png", pa.string()),                      # its panoptic PNG, relative to the set: panoptic/<group>/<id>.png
    ("segments", pa.list_(SEGMENT_TYPE)),      # COCO panoptic segments_info
    ("instances", pa.list_(INSTANCE_TYPE)),    # COCO instance annotations (ids and image ids are assigned on export)
    ("inputs", pa.string()),                   # digest of what the group was made from (e.g. the centroids)
])
LABELS_META_K_THINGS = b"u2seg.k_things"
LABELS_META_K_STUFF = b"u2seg.k_stuff"
LABELS_META_INPUTS = b"u2seg.inputs"
LABELS_META_INSTANCES = b"u2seg.instances"   # instance annotations in the part (counts without reading rows)


def error_row(image_id: str, uri: str, stage: str, exc: BaseException) -> dict[str, str]:
    """One errors-table row; the class name is the machine-readable reason."""
    reason = getattr(exc, "reason", None)
    cls = type(exc).__name__ + (f":{reason}" if reason else "")
    return {"image_id": image_id, "uri": uri, "stage": stage, "error_class": cls, "message": str(exc)[:2000]}

# predict's ledger (``<predictions>/ledger``): one row per image it was asked to predict, written last for its
# group (after the group's label fragment), so an image is predicted iff it is here.
PREDICT_LEDGER_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("uri", pa.string()),
    ("status", pa.string()),                   # "ok" or "error"
    ("group", pa.string()),                    # the label group holding its prediction ("" for errors)
    ("error_class", pa.string()),
    ("message", pa.string()),
])
