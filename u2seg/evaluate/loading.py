"""Read COCO panoptic sets (ground truth or predictions) and join them image by image.

A prediction set and a labeled benchmark number their images independently (predictions use a hash
of the source URI, COCO its own ids), so the only shared key is the image's file name. Both are joined
by the file-name stem, which works for COCO (``000000000139.jpg``) and the synthetic world alike.
PNGs are read one at a time on demand so that no caller has to hold a whole set in memory.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from u2seg.io.inputs import read_input
from u2seg.labels.coco import decode_panoptic_png

log = logging.getLogger(__name__)


def join_uri(folder: str, name: str) -> str:
    """``folder``/``name`` for local paths and URIs alike."""
    return posixpath.join(folder.rstrip("/"), name)


def file_stem(name: str) -> str:
    """Basename without its last extension: the key shared by predictions and ground truth."""
    base = posixpath.basename(str(name).replace("\\", "/"))
    stem, dot, _ = base.rpartition(".")
    return stem if dot and stem else base


@dataclass
class PanopticDir:
    """A folder of COCO panoptic PNGs at a path or URI."""

    uri: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    retry_s: float = 0.0  # transient storage errors are retried this long (u2seg.io.inputs)

    def read_ids(self, file_name: str) -> np.ndarray:
        """Segment-id map (int32 [H, W]) of one PNG."""
        uri = join_uri(self.uri, file_name)
        try:
            return decode_panoptic_png(read_input(uri, self.storage_options, self.retry_s))
        except ValueError as exc:
            raise ValueError(f"{uri}: {exc}") from exc


@dataclass
class Pair:
    """One image present in both sets."""

    stem: str
    gt_image: dict
    gt_ann: dict
    pred_image: dict
    pred_ann: dict


@dataclass
class Join:
    """Images of a prediction set matched to a labeled set by file-name stem, sorted by stem."""

    pairs: list[Pair]
    gt_images: int  # gt images with a panoptic annotation
    pred_images: int  # prediction images with a panoptic annotation
    gt_without_prediction: int
    predictions_without_gt: int
    duplicate_gt_stems: int
    duplicate_prediction_stems: int

    def counts(self) -> dict[str, int]:
        return {"evaluated": len(self.pairs), "gt": self.gt_images, "predictions": self.pred_images,
                "gt_without_prediction": self.gt_without_prediction,
                "predictions_without_gt": self.predictions_without_gt,
                "duplicate_gt_stems": self.duplicate_gt_stems,
                "duplicate_prediction_stems": self.duplicate_prediction_stems}

    def gt_subset(self, gt: Mapping) -> dict:
        """The gt panoptic dict restricted to the joined images."""
        return {"images": [p.gt_image for p in self.pairs], "annotations": [p.gt_ann for p in self.pairs],
                "categories": list(gt["categories"])}

    def pred_subset(self, pred: Mapping) -> dict:
        """The prediction panoptic dict restricted to the joined images, renumbered to gt image ids."""
        return {"images": [{**p.pred_image, "id": p.gt_image["id"]} for p in self.pairs],
                "annotations": [{**p.pred_ann, "image_id": p.gt_image["id"]} for p in self.pairs],
                "categories": list(pred.get("categories", []))}


def _by_stem(coco: Mapping, what: str) -> tuple[dict[str, tuple[dict, dict]], int]:
    """stem -> (image, annotation) for images with an annotation; first wins on duplicate stems."""
    anns = {a["image_id"]: a for a in coco.get("annotations", [])}
    out: dict[str, tuple[dict, dict]] = {}
    dup = 0
    for im in coco.get("images", []):
        ann = anns.get(im["id"])
        if ann is None:
            continue
        stem = file_stem(im.get("file_name") or ann["file_name"])
        if stem in out:
            dup += 1
            continue
        out[stem] = (im, ann)
    if dup:
        log.warning("%d %s images share a file-name stem with an earlier one; only the first is evaluated",
                    dup, what)
    return out, dup


def join_by_stem(gt: Mapping, pred: Mapping) -> Join:
    """Match prediction images to gt images by file-name stem (see module doc)."""
    g, gdup = _by_stem(gt, "ground-truth")
    p, pdup = _by_stem(pred, "prediction")
    common = sorted(set(g) & set(p))
    pairs = [Pair(s, g[s][0], g[s][1], p[s][0], p[s][1]) for s in common]
    return Join(pairs, len(g), len(p), len(g) - len(common), len(p) - len(common), gdup, pdup)


def stem_index(coco: Mapping) -> dict[str, Any]:
    """stem -> image id of a COCO dict (e.g. gt instances, whose ids may differ from panoptic's)."""
    out: dict[str, Any] = {}
    for im in coco.get("images", []):
        out.setdefault(file_stem(im["file_name"]), im["id"])
    return out
