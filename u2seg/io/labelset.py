"""The label-set format on a run root: what the label stage, predict and self-training write, and what
training, self-training, evaluation and ``u2seg export coco`` read.

A label set lives under one prefix (``labels/``, ``predict/``, ``selftrain/round-R/labels`` ...):

- ``panoptic/<group>/<image_id>.png`` (COCO panoptic PNG) and ``semantic/<group>/<image_id>.png``
  (category id per pixel) for each image, written first, one folder per group so no folder holds
  millions of files and a group leaves with its folders;
- ``parts/<group>.parquet``: one Parquet part per group (``LABELS_SCHEMA`` in ``u2seg/io/schemas.py``: one
  row per image with its COCO image fields, panoptic segments and instance annotations, and the digest
  of the inputs it was made from), written after the group's PNGs: the group's commit. Its footer
  records the class counts, the inputs digest and the instance count, so listing groups, their inputs
  and the set's size reads no row;
- ``panoptic.json`` and ``instances.json``: single COCO files streamed from the parts, written only when
  asked (:meth:`LabelSet.finish` below a size threshold, ``u2seg export coco`` for any set or subset).
  Nothing in u2seg reads them: readers go through the parts.

Categories follow ``u2seg.labels.pseudo_categories``: things 1..k_things, stuff after them.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from u2seg.errors import UserError
from u2seg.io.runroot import RunRoot
from u2seg.io.schemas import (
    LABELS_META_INPUTS,
    LABELS_META_INSTANCES,
    LABELS_META_K_STUFF,
    LABELS_META_K_THINGS,
    LABELS_SCHEMA,
)
from u2seg.labels import (
    decode_panoptic_png,
    instance_annotations,
    mask_area_bbox,
    merge_coco_parts,
    panoptic_png_bytes,
    pseudo_categories,
    segment_stats,
    semantic_from_panoptic,
    semantic_png_bytes,
)
from u2seg.labels.coco import coco_image_id

log = logging.getLogger(__name__)

PARTS = "parts"
LEGACY_PARTS = "_parts"  # the JSON fragments of u2seg before Parquet parts
PANOPTIC = "panoptic"
SEMANTIC = "semantic"
PANOPTIC_JSON = "panoptic.json"
INSTANCES_JSON = "instances.json"
COLUMNS = tuple(LABELS_SCHEMA.names)
GROUP = "group"  # a virtual column of iter_rows: the part the row comes from
FOOTER_THREADS = 16  # concurrent footer reads (object-store latency, not bytes, is the limit)

Row = dict[str, Any]


class LabelSetFormatError(UserError):
    """A label set in a format this u2seg does not read (the JSON fragments of older versions)."""


@dataclass
class Fragment:
    """One group's rows (``LABELS_SCHEMA`` without ``inputs``): the unit a worker commits."""

    rows: list[Row] = field(default_factory=list)

    def add(self, row: Row) -> None:
        self.rows.append(row)

    @property
    def n_images(self) -> int:
        return len(self.rows)

    @property
    def n_instances(self) -> int:
        return sum(len(r["instances"]) for r in self.rows)


@dataclass(frozen=True)
class LabelledImage:
    """One image of a label set, as training and self-training read it."""

    group: str
    image_id: str  # u2seg image id (hash of the source URI)
    uri: str
    png: str  # run-root path of its panoptic PNG
    segments: list[dict[str, Any]]  # COCO panoptic segments_info
    coco_id: int
    width: int = 0
    height: int = 0


class LabelSet:
    """A label set under ``prefix`` of ``root`` with ``k_things`` thing and ``k_stuff`` stuff classes.

    The class counts are needed to write (category ranges, PNG depth); a label set opened only to be
    read (evaluation, export) may leave them out and learns them from its parts' footers.
    """

    def __init__(self, root: RunRoot, prefix: str, k_things: int | None = None, k_stuff: int | None = None):
        self.root, self.prefix = root, prefix.rstrip("/")
        self._k = None if k_things is None or k_stuff is None else (int(k_things), int(k_stuff))
        self._writable = self._k is not None

    @property
    def k_things(self) -> int:
        return self._counts()[0]

    @property
    def k_stuff(self) -> int:
        return self._counts()[1]

    def _counts(self) -> tuple[int, int]:
        if self._k is None:
            groups = self.groups()
            if not groups:
                raise ValueError(f"label set {self.root.join(self.prefix)} has no committed part to learn its "
                                 "class counts from")
            meta = self.footer(groups[0])
            self._k = (int(meta[LABELS_META_K_THINGS]), int(meta[LABELS_META_K_STUFF]))
        return self._k

    def categories(self) -> list[dict[str, Any]]:
        """The set's COCO categories (pseudo classes); [] for a read-only set with no part yet."""
        if self._k is None and not self.groups():
            return []
        return pseudo_categories(self.k_things, self.k_stuff)

    def rel(self, *parts: str) -> str:
        return "/".join([self.prefix, *parts])

    def part_rel(self, group: str) -> str:
        """Run-root path of one group's committed part."""
        return self.rel(PARTS, f"{group}.parquet")

    # ------------------------------------------------------------------ writing

    def _check_writable(self) -> None:
        if not self._writable:
            raise ValueError(f"label set {self.prefix} was opened without class counts: it can only be read")

    def write_image(self, group: str, image_id: str, uri: str, seg_ids: np.ndarray,
                    segments_info: Sequence[Mapping[str, Any]], *, semantic: np.ndarray | None = None,
                    scores: Mapping[int, float] | None = None, thing_scores: Sequence[float] | None = None,
                    instances: Sequence[Mapping[str, Any]] | None = None, write_semantic: bool = True) -> Row:
        """Write one image's PNGs into its group's folders; return its row for :meth:`commit`.

        Segments keep id, category_id, area, bbox and iscrowd (area and bbox computed from ``seg_ids``
        when missing, iscrowd 0), plus ``scores[id]`` as ``score`` (predictions). Instance annotations are
        the thing segments' masks with ``thing_scores`` (one per thing segment, in segments order) or those
        scores, else 1.0; ``instances`` (dicts with category_id, segmentation RLE and optionally area, bbox,
        score) replaces them. ``semantic`` defaults to the category map of ``seg_ids``.
        """
        self._check_writable()
        seg_ids = np.asarray(seg_ids)
        png = f"{PANOPTIC}/{group}/{image_id}.png"
        self.root.write_bytes(self.rel(png), panoptic_png_bytes(seg_ids))
        if write_semantic:
            sem = semantic_from_panoptic(seg_ids, segments_info) if semantic is None else semantic
            self.root.write_bytes(self.rel(SEMANTIC, group, f"{image_id}.png"),
                                  semantic_png_bytes(sem, num_categories=self.k_things + self.k_stuff))
        segments = _segments(seg_ids, segments_info, scores or {})
        cid = coco_image_id(image_id)
        if instances is None:
            things = [s for s in segments if s["category_id"] <= self.k_things]
            if thing_scores is None:
                thing_scores = [s.get("score", 1.0) for s in things]
            instances = instance_annotations(cid, [seg_ids == s["id"] for s in things],
                                             [s["category_id"] - 1 for s in things], list(thing_scores),
                                             start_ann_id=1)
        h, w = seg_ids.shape
        return {"image_id": image_id, "coco_id": cid, "uri": uri, "file_name": os.path.basename(uri),
                "width": int(w), "height": int(h), "png": png, "segments": segments,
                "instances": [_instance(a) for a in instances]}

    def commit(self, group: str, fragment: Fragment, inputs: str = "") -> None:
        """Publish one group's part (after its PNGs): the group is then part of the label set.

        ``inputs`` is a digest of what the group was made from (e.g. the centroids): a later run keeps the
        group only while it still matches.
        """
        self._check_writable()
        table = pa.Table.from_pylist([{**r, "inputs": inputs} for r in fragment.rows], schema=LABELS_SCHEMA)
        meta = {LABELS_META_K_THINGS: str(self.k_things), LABELS_META_K_STUFF: str(self.k_stuff),
                LABELS_META_INPUTS: inputs, LABELS_META_INSTANCES: str(fragment.n_instances)}
        self.root.write_parquet(self.part_rel(group), table.replace_schema_metadata(meta))

    def remove_groups(self, groups: Sequence[str]) -> None:
        """Take groups out: the part first (the group leaves the set), then its PNG folders."""
        for g in groups:
            self.root.remove(self.part_rel(g))
            for kind in (PANOPTIC, SEMANTIC):
                self.root.remove(self.rel(kind, g), recursive=True)

    def clear(self) -> None:
        """Remove every file of the label set (not other files under its prefix, e.g. stage markers)."""
        for rel in (PARTS, LEGACY_PARTS, PANOPTIC, SEMANTIC):
            self.root.remove(self.rel(rel), recursive=True)
        self.remove_merged()

    def remove_merged(self) -> None:
        for rel in (PANOPTIC_JSON, INSTANCES_JSON):
            self.root.remove(self.rel(rel))

    def is_legacy(self) -> bool:
        """True for a set of older u2seg (JSON fragments, no Parquet part): it must be rewritten."""
        return not self.root.list(self.rel(PARTS), ".parquet") and bool(self.root.list(self.rel(LEGACY_PARTS),
                                                                                       ".json"))

    def merge(self, description: str) -> dict[str, int]:
        """Stream every part into ``panoptic.json`` and ``instances.json`` (one part in memory at a time)."""
        counts = write_coco(self, self.root, self.prefix, description)
        return {"images": counts["images"], "instances": counts["instances"], "parts": counts["parts"]}

    def finish(self, description: str, max_images: int) -> dict[str, Any]:
        """The writer's last step: the merged COCO files when the set has at most ``max_images`` images,
        else none (a stale pair from a smaller run is removed; ``u2seg export coco`` writes them on demand).
        Returns counts and ``coco_files`` (whether they were written)."""
        size = self.size()
        if size["images"] <= max_images:
            return {**self.merge(description), "coco_files": True}
        self.remove_merged()
        log.info("%s: %d images > label.coco_max_images=%d: merged panoptic.json / instances.json skipped "
                 "(`u2seg export coco` writes them)", self.root.join(self.prefix), size["images"], max_images)
        return {**size, "coco_files": False}

    # ------------------------------------------------------------------ reading

    def groups(self) -> list[str]:
        """Committed groups, sorted."""
        names = self.root.list(self.rel(PARTS), ".parquet")
        if not names and self.root.list(self.rel(LEGACY_PARTS), ".json"):
            raise LabelSetFormatError(f"{self.root.join(self.prefix)} is a label set of an older u2seg (JSON "
                                      f"fragments in {LEGACY_PARTS}/): rerun the stage that wrote it with --force")
        return [n[: -len(".parquet")] for n in names]

    def footer(self, group: str) -> dict[bytes, str]:
        """One part's footer: its key-value metadata (``LABELS_META_*``) plus ``b"rows"``; no row is read."""
        with self.root.fs.open(self.root.path(self.part_rel(group)), "rb") as fh:
            meta = pq.read_metadata(fh)
        kv = {k: v.decode() for k, v in (meta.metadata or {}).items() if k != b"ARROW:schema"}
        return {**kv, b"rows": str(meta.num_rows)}

    def footers(self, groups: Sequence[str] | None = None) -> dict[str, dict[bytes, str]]:
        """:meth:`footer` of many groups, read concurrently."""
        groups = self.groups() if groups is None else list(groups)
        with ThreadPoolExecutor(max_workers=FOOTER_THREADS) as pool:
            return dict(zip(groups, pool.map(self.footer, groups), strict=True))

    def group_inputs(self) -> dict[str, str]:
        """group -> the inputs digest it was committed with (footers only)."""
        return {g: m.get(LABELS_META_INPUTS, "") for g, m in self.footers().items()}

    def size(self) -> dict[str, int]:
        """images, instances and parts of the set, from the footers."""
        footers = self.footers()
        return {"images": sum(int(m[b"rows"]) for m in footers.values()),
                "instances": sum(int(m.get(LABELS_META_INSTANCES, 0)) for m in footers.values()),
                "parts": len(footers)}

    def read_group(self, group: str, columns: Sequence[str] | None = None) -> list[Row]:
        """One group's rows (only ``columns`` when given; ``"group"`` names the group itself)."""
        cols = _check_columns(columns)
        table = self.root.read_part(self.part_rel(group), [c for c in cols if c != GROUP])
        rows = table.to_pylist()
        for r in rows:
            _drop_null_scores(r)
            if GROUP in cols:
                r[GROUP] = group
        return rows

    def iter_rows(self, columns: Sequence[str] | None = None, groups: Iterable[str] | None = None) -> Iterator[Row]:
        """Every row (``LABELS_SCHEMA``; only ``columns``, read projected, when given), a part at a time in
        group order; ``"group"`` is a virtual column naming the row's group. Unscored segments and
        instances have no ``score`` key (as written)."""
        _check_columns(columns)
        for g in self.groups() if groups is None else groups:
            yield from self.read_group(g, columns)

    def iter_images(self) -> Iterator[LabelledImage]:
        """Every labelled image, a part at a time."""
        for r in self.iter_rows(["group", "image_id", "uri", "png", "segments", "coco_id", "width", "height"]):
            yield LabelledImage(group=r["group"], image_id=r["image_id"], uri=r["uri"], png=self.rel(r["png"]),
                                segments=r["segments"], coco_id=int(r["coco_id"]), width=int(r["width"]),
                                height=int(r["height"]))

    def read_panoptic(self, png: str) -> np.ndarray:
        """Segment ids of a PNG named by :class:`LabelledImage`.png (a run-root path)."""
        return decode_panoptic_png(self.root.read_bytes(png))

    # ------------------------------------------------------------------ COCO views

    def coco_parts(self, kind: str, *, keep: Callable[[Row], bool] | None = None,
                   file_name: Callable[[Row], str] | None = None, groups: Sequence[str] | None = None,
                   images_only: bool = False) -> Callable[[], Iterator[dict[str, list]]]:
        """A source for ``merge_coco_parts``: a callable giving a fresh pass of one COCO part per group
        (``{"images": [...], "annotations": [...]}``, ``kind`` "panoptic" or "instances"), a part in memory
        at a time, over ``groups`` (default all). ``keep(row)`` selects images; ``file_name(row)`` renames a
        panoptic annotation's PNG (default: ``<group>/<image_id>.png``, relative to the set's ``panoptic/``);
        ``images_only`` reads only the image columns and gives no annotation (the merge's first pass)."""
        if kind not in (PANOPTIC, "instances"):
            raise ValueError(f"kind must be 'panoptic' or 'instances', got {kind!r}")
        skip = ("inputs", "segments", "instances") if images_only else \
            ("inputs", "instances" if kind == PANOPTIC else "segments")
        columns = [c for c in COLUMNS if c not in skip]

        def gen() -> Iterator[dict[str, list]]:
            for group in self.groups() if groups is None else groups:
                rows = [r for r in self.read_group(group, columns) if keep is None or keep(r)]
                images = [coco_image(r) for r in rows]
                if images_only:
                    anns = []
                elif kind == PANOPTIC:
                    anns = [panoptic_entry(r, file_name(r) if file_name else None) for r in rows]
                else:
                    anns = [a for r in rows for a in instance_entries(r)]
                yield {"images": images, "annotations": anns}
        return gen

    def panoptic_dict(self) -> dict[str, Any]:
        """The whole set as one COCO panoptic dict, built from the parts (for evaluation-sized sets)."""
        images, anns = [], []
        for part in self.coco_parts(PANOPTIC)():
            images += part["images"]
            anns += part["annotations"]
        return {"images": images, "annotations": anns, "categories": self.categories()}

    def instances_dict(self) -> dict[str, Any]:
        """The whole set as one COCO instances dict (ids 1..N), built from the parts (evaluation-sized)."""
        images, anns = [], []
        for part in self.coco_parts("instances")():
            images += part["images"]
            anns += part["annotations"]
        for i, a in enumerate(anns):
            a["id"] = i + 1
        return {"images": images, "annotations": anns, "categories": self.categories()}

    def has_merged(self) -> bool:
        """Whether the merged ``panoptic.json`` exists (only below label.coco_max_images or exported)."""
        return self.root.exists(self.rel(PANOPTIC_JSON))

    def read_merged(self, kind: str = PANOPTIC_JSON) -> dict[str, Any]:
        """A merged COCO file, whole (small sets only; readers of any size use the parts)."""
        return json.loads(self.root.read_bytes(self.rel(kind)))


# ---------------------------------------------------------------------------------------------- rows <-> COCO


def coco_image(row: Row) -> dict[str, Any]:
    """A row's COCO image entry (with u2seg's image id and the source URI)."""
    return {"id": int(row["coco_id"]), "file_name": row["file_name"], "width": int(row["width"]),
            "height": int(row["height"]), "u2seg_image_id": row["image_id"], "uri": row["uri"]}


def panoptic_entry(row: Row, file_name: str | None = None) -> dict[str, Any]:
    """A row's COCO panoptic annotation; its ``file_name`` defaults to the PNG's path under ``panoptic/``."""
    png = row["png"]
    default = png[len(PANOPTIC) + 1:] if png.startswith(PANOPTIC + "/") else png
    return {"image_id": int(row["coco_id"]), "file_name": file_name or default,
            "segments_info": [dict(s) for s in row["segments"]]}


def instance_entries(row: Row) -> list[dict[str, Any]]:
    """A row's COCO instance annotations, numbered 1.. within the image (merging renumbers them)."""
    out = []
    for i, a in enumerate(row["instances"]):
        ann = {"id": i + 1, "image_id": int(row["coco_id"]), "category_id": int(a["category_id"]),
               "segmentation": {"size": list(a["segmentation"]["size"]), "counts": a["segmentation"]["counts"]},
               "area": int(a["area"]), "bbox": [float(v) for v in a["bbox"]], "iscrowd": 0}
        if a.get("score") is not None:
            ann["score"] = float(a["score"])
        out.append(ann)
    return out


def write_coco(labels: LabelSet, dest: RunRoot, prefix: str, description: str, *,
               keep_factory: Callable[[], Callable[[Row], bool]] | None = None,
               file_name: Callable[[Row], str] | None = None, groups: Sequence[str] | None = None,
               info: Mapping[str, Any] | None = None) -> dict[str, int]:
    """Stream ``labels`` (its ``groups``, default all; the images a fresh ``keep_factory()`` keeps, a new
    selector per pass so a stateful one restarts) into ``<prefix>/panoptic.json`` and
    ``<prefix>/instances.json`` of ``dest``, each published only when complete. Returns images, instances
    and parts (groups read). ``info`` adds keys to the files' ``info``."""
    header = {"info": {"description": description, "date_created": time.strftime("%Y-%m-%d"), **(info or {})},
              "licenses": [], "categories": labels.categories()}
    groups = labels.groups() if groups is None else list(groups)

    def source(kind: str) -> Callable[[], Iterator[dict[str, list]]]:
        passes = 0

        def gen() -> Iterator[dict[str, list]]:
            # merge_coco_parts makes two passes, images then annotations: the first reads no segment or mask
            nonlocal passes
            passes += 1
            keep = keep_factory() if keep_factory else None
            yield from labels.coco_parts(kind, keep=keep, file_name=file_name, groups=groups,
                                         images_only=passes == 1)()
        return gen

    with dest.open_atomic(posixpath.join(prefix, PANOPTIC_JSON)) as fh:
        pan = merge_coco_parts(source(PANOPTIC), header, fh, renumber_annotations=False)
    with dest.open_atomic(posixpath.join(prefix, INSTANCES_JSON)) as fh:
        inst = merge_coco_parts(source("instances"), header, fh)
    return {"images": pan["images"], "instances": inst["annotations"], "parts": pan["parts"]}


# ---------------------------------------------------------------------------------------------- helpers


def _segments(seg_ids: np.ndarray, segments_info: Sequence[Mapping[str, Any]],
              scores: Mapping[int, float]) -> list[dict[str, Any]]:
    """The stored segments: the COCO panoptic keys (area / bbox from the pixels when missing), plus score."""
    stats: dict[int, tuple[int, list[int]]] | None = None
    out = []
    for s in segments_info:
        sid = int(s["id"])
        area, bbox = s.get("area"), s.get("bbox")
        if area is None or bbox is None:
            if stats is None:
                stats = segment_stats(seg_ids)
            area, bbox = stats.get(sid, (0, [0, 0, 0, 0]))
        seg = {"id": sid, "category_id": int(s["category_id"]), "area": int(area),
               "bbox": [int(v) for v in bbox], "iscrowd": int(s.get("iscrowd", 0))}
        if sid in scores:
            seg["score"] = float(scores[sid])
        out.append(seg)
    return out


def _instance(a: Mapping[str, Any]) -> dict[str, Any]:
    """The stored instance: category, RLE, area, bbox (from the RLE when missing), score when scored."""
    rle = {"size": [int(v) for v in a["segmentation"]["size"]], "counts": a["segmentation"]["counts"]}
    if isinstance(rle["counts"], bytes):
        rle["counts"] = rle["counts"].decode("ascii")
    if not isinstance(rle["counts"], str):
        raise ValueError("instance segmentation must be a compressed COCO RLE (string counts)")
    area, bbox = a.get("area"), a.get("bbox")
    if area is None or bbox is None:
        area, bbox = mask_area_bbox(rle)
    out = {"category_id": int(a["category_id"]), "segmentation": rle, "area": int(area),
           "bbox": [float(v) for v in bbox]}
    if a.get("score") is not None:
        out["score"] = float(a["score"])
    return out


def _check_columns(columns: Sequence[str] | None) -> list[str]:
    if columns is None:
        return [*COLUMNS, GROUP]
    unknown = [c for c in columns if c not in COLUMNS and c != GROUP]
    if unknown:
        raise ValueError(f"unknown label-set columns {unknown}; columns: {', '.join((*COLUMNS, GROUP))}")
    return list(columns)


def _drop_null_scores(row: Row) -> None:
    for key in ("segments", "instances"):
        for item in row.get(key) or ():
            if item.get("score", 0) is None:
                del item["score"]
