"""The label-set format on a run root: what the label stage, predict and self-training write, and what
training, self-training and evaluation read.

A label set lives under one prefix (``labels/``, ``predict/``, ``selftrain/round-R/labels`` ...):

- ``panoptic/<group>/<image_id>.png`` (COCO panoptic PNG) and ``semantic/<group>/<image_id>.png``
  (category id per pixel) for each image, written first, one folder per group so no folder holds
  millions of files and a group leaves with its folders;
- ``_parts/<group>.json``: one fragment per group of images (its COCO image entries, panoptic
  annotations and instance annotations, and the digest of the inputs it was made from), written after
  the group's PNGs: the group's commit;
- ``panoptic.json`` and ``instances.json``: the fragments streamed into single COCO files at the end.

Categories follow ``u2seg.labels.pseudo_categories``: things 1..k_things, stuff after them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from u2seg.io.runroot import RunRoot
from u2seg.labels import (
    decode_panoptic_png,
    instance_annotations,
    merge_coco_parts,
    panoptic_annotation,
    panoptic_png_bytes,
    pseudo_categories,
    semantic_from_panoptic,
    semantic_png_bytes,
)
from u2seg.labels.coco import coco_image_id

log = logging.getLogger(__name__)

PARTS = "_parts"
PANOPTIC_JSON = "panoptic.json"
INSTANCES_JSON = "instances.json"
_SEGMENT_KEYS = ("id", "category_id", "area", "bbox", "iscrowd")


@dataclass
class Fragment:
    """One group's entries, in the three COCO lists (the unit a worker commits)."""

    images: list[dict[str, Any]] = field(default_factory=list)
    panoptic: list[dict[str, Any]] = field(default_factory=list)
    instances: list[dict[str, Any]] = field(default_factory=list)

    def add(self, image: dict[str, Any], panoptic: dict[str, Any], instances: list[dict[str, Any]]) -> None:
        self.images.append(image)
        self.panoptic.append(panoptic)
        self.instances.extend(instances)

    def to_dict(self) -> dict[str, list]:
        return {"images": self.images, "panoptic": self.panoptic, "instances": self.instances}


@dataclass(frozen=True)
class LabelledImage:
    """One image of a label set, as training and self-training read it."""

    group: str
    image_id: str  # u2seg image id (hash of the source URI)
    uri: str
    png: str  # run-root path of its panoptic PNG
    segments: list[dict[str, Any]]  # COCO panoptic segments_info
    coco_id: int


class LabelSet:
    """A label set under ``prefix`` of ``root`` with ``k_things`` thing and ``k_stuff`` stuff classes.

    The class counts are needed to write (category ranges, PNG depth, COCO categories); a label set
    opened only to be read (evaluation) may leave them out.
    """

    def __init__(self, root: RunRoot, prefix: str, k_things: int | None = None, k_stuff: int | None = None):
        self.root, self.prefix = root, prefix.rstrip("/")
        self._k = None if k_things is None or k_stuff is None else (int(k_things), int(k_stuff))

    @property
    def k_things(self) -> int:
        return self._counts()[0]

    @property
    def k_stuff(self) -> int:
        return self._counts()[1]

    def _counts(self) -> tuple[int, int]:
        if self._k is None:
            raise ValueError(f"label set {self.prefix} was opened without class counts: it can only be read")
        return self._k

    def rel(self, *parts: str) -> str:
        return "/".join([self.prefix, *parts])

    # ------------------------------------------------------------------ writing

    def write_image(self, group: str, image_id: str, uri: str, seg_ids: np.ndarray,
                    segments_info: Sequence[Mapping[str, Any]], *, semantic: np.ndarray | None = None,
                    scores: Mapping[int, float] | None = None, thing_scores: Sequence[float] | None = None,
                    write_semantic: bool = True) -> tuple[dict, dict, list[dict]]:
        """Write one image's PNGs into its group's folders; return its (COCO image entry, panoptic annotation,
        instance annotations). The annotation's ``file_name`` is ``<group>/<image_id>.png``.

        ``scores`` (segment id -> score) is kept in the segments (predictions); instance annotations get
        ``thing_scores`` (one per thing segment, in segments order) or those scores, else 1.0.
        ``semantic`` defaults to the category map of ``seg_ids``.
        """
        png = f"{group}/{image_id}.png"
        self.root.write_bytes(self.rel("panoptic", png), panoptic_png_bytes(seg_ids))
        if write_semantic:
            sem = semantic_from_panoptic(seg_ids, segments_info) if semantic is None else semantic
            self.root.write_bytes(self.rel("semantic", png),
                                  semantic_png_bytes(sem, num_categories=self.k_things + self.k_stuff))
        scores = scores or {}
        clean = [{k: s[k] for k in _SEGMENT_KEYS if k in s}
                 | ({"score": float(scores[int(s["id"])])} if int(s["id"]) in scores else {})
                 for s in segments_info]
        cid = coco_image_id(image_id)
        h, w = seg_ids.shape
        image = {"id": cid, "file_name": os.path.basename(uri), "width": int(w), "height": int(h),
                 "u2seg_image_id": image_id, "uri": uri}
        things = [s for s in clean if s["category_id"] <= self.k_things]
        if thing_scores is None:
            thing_scores = [s.get("score", 1.0) for s in things]
        inst = instance_annotations(cid, [seg_ids == s["id"] for s in things],
                                    [s["category_id"] - 1 for s in things], list(thing_scores), start_ann_id=1)
        return image, panoptic_annotation(cid, png, clean), inst

    def commit(self, group: str, fragment: Fragment, inputs: str = "") -> None:
        """Publish one group's fragment (after its PNGs): the group is then part of the label set.

        ``inputs`` is a digest of what the group was made from (e.g. the centroids): a later run keeps the
        group only while it still matches.
        """
        self.root.write_json(self.rel(PARTS, f"{group}.json"), {**fragment.to_dict(), "inputs": inputs},
                             indent=None)

    def remove_groups(self, groups: Sequence[str]) -> None:
        """Take groups out: the fragment first (the group leaves the set), then its PNG folders."""
        for g in groups:
            self.root.remove(self.rel(PARTS, f"{g}.json"))
            for kind in ("panoptic", "semantic"):
                self.root.remove(self.rel(kind, g), recursive=True)

    def clear(self) -> None:
        """Remove every file of the label set (not other files under its prefix, e.g. stage markers)."""
        for rel in ("panoptic", "semantic", PARTS):
            self.root.remove(self.rel(rel), recursive=True)
        for rel in (PANOPTIC_JSON, INSTANCES_JSON):
            self.root.remove(self.rel(rel))

    def merge(self, description: str) -> dict[str, int]:
        """Stream every fragment into ``panoptic.json`` and ``instances.json`` (never all images in memory)."""
        names = self._fragment_names()
        header = {"info": {"description": description, "date_created": time.strftime("%Y-%m-%d")},
                  "licenses": [], "categories": pseudo_categories(self.k_things, self.k_stuff)}

        def parts(kind: str):
            def gen():
                for name in names:
                    fragment = self.root.read_json(self.rel(PARTS, name))
                    yield {"images": fragment["images"], "annotations": fragment[kind]}
            return gen

        with self.root.open_atomic(self.rel(PANOPTIC_JSON)) as fh:
            pan = merge_coco_parts(parts("panoptic"), header, fh, renumber_annotations=False)
        with self.root.open_atomic(self.rel(INSTANCES_JSON)) as fh:
            inst = merge_coco_parts(parts("instances"), header, fh)
        return {"images": pan["images"], "instances": inst["annotations"], "parts": len(names)}

    # ------------------------------------------------------------------ reading

    def groups(self) -> list[str]:
        """Committed groups, sorted."""
        return [n[: -len(".json")] for n in self._fragment_names()]

    def _fragment_names(self) -> list[str]:
        return self.root.list(self.rel(PARTS), ".json")

    def fragment(self, group: str) -> dict[str, Any]:
        return self.root.read_json(self.rel(PARTS, f"{group}.json"))

    def group_inputs(self) -> dict[str, str]:
        """group -> the inputs digest it was committed with (reads every fragment: one small file each)."""
        return {g: str(f.get("inputs", "")) for g, f in self.iter_fragments()}

    def iter_fragments(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for g in self.groups():
            yield g, self.fragment(g)

    def iter_images(self) -> Iterator[LabelledImage]:
        """Every labelled image, a fragment at a time."""
        for group, fragment in self.iter_fragments():
            anns = {a["image_id"]: a for a in fragment["panoptic"]}
            for img in fragment["images"]:
                ann = anns[img["id"]]
                yield LabelledImage(group=group, image_id=img["u2seg_image_id"], uri=img["uri"],
                                    png=self.rel("panoptic", ann["file_name"]), segments=ann["segments_info"],
                                    coco_id=int(img["id"]))

    def read_panoptic(self, png: str) -> np.ndarray:
        """Segment ids of a PNG named by :class:`LabelledImage`.png (a run-root path)."""
        return decode_panoptic_png(self.root.read_bytes(png))

    def has_merged(self) -> bool:
        return self.root.exists(self.rel(PANOPTIC_JSON))

    def read_merged(self, kind: str = PANOPTIC_JSON) -> dict[str, Any]:
        return json.loads(self.root.read_bytes(self.rel(kind)))
