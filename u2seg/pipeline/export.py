"""`u2seg export coco`: one label set (or a subset) as single COCO files, for tools that want them.

A label set's committed form is its Parquet parts (``u2seg/io/labelset.py``); the single-file
``panoptic.json`` / ``instances.json`` are written by the stages only for small sets
(``label.coco_max_images``). This writes them for any set, to a local folder or an ``s3://`` prefix:

- ``instances.json``: COCO instances (RLE masks, scores of predictions), loadable by pycocotools;
- ``panoptic.json``: COCO panoptic; its annotations' ``file_name`` is ``<group>/<image_id>.png`` under
  the set's ``panoptic/`` folder (named in ``info.u2seg_png_dir``), or, with ``copy_pngs``,
  ``<image_id>.png`` under ``panoptic/`` next to the JSON (the COCO layout: the folder is the JSON's
  name without .json, which is what ``evaluate.gt_panoptic_dir`` defaults to).

Streaming: the parts are read one at a time (twice: images, then annotations), so memory is one part
plus the selection (the ``--images`` list, or a counter for ``--limit``). PNGs are copied before the
JSON files are published, and each JSON is published only when complete.
"""

from __future__ import annotations

import logging
import posixpath
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from u2seg.errors import InputsError, UserError
from u2seg.io import RunRoot, layout
from u2seg.io.inputs import read_input
from u2seg.io.labelset import INSTANCES_JSON, PANOPTIC, PANOPTIC_JSON, LabelSet, Row, write_coco

log = logging.getLogger(__name__)

SET_NAMES = "labels, predict, selftrain/round-R/labels or selftrain/round-R/predictions"
_SET = re.compile(r"^(labels|predict|selftrain/round-\d+/(labels|predictions))$")
COPY_THREADS = 8  # concurrent PNG copies (object-store latency is the limit)


def label_set_prefix(name: str) -> str:
    """The run-root prefix of a label set named on the command line (``labels``, ``predict``, ...)."""
    name = name.strip().strip("/")
    if not _SET.match(name):
        raise UserError(f"--set {name!r}: not a label set; one of {SET_NAMES}")
    return name


def read_image_list(uri: str, storage_options: dict[str, Any] | None = None, retry_s: float = 0.0) -> set[str]:
    """The keys of an image list file: one URI or u2seg image id a line (blank lines and ``#`` comments
    ignored)."""
    try:
        text = read_input(uri, storage_options, retry_s).decode("utf-8")
    except FileNotFoundError as exc:
        raise InputsError(f"--images {uri}: no such file") from exc
    keys = {line.strip() for line in text.splitlines()}
    keys = {k for k in keys if k and not k.startswith("#")}
    if not keys:
        raise InputsError(f"--images {uri}: lists no image")
    return keys


class _Selection:
    """Which rows an export keeps: those named in ``keys`` (image id or URI), at most ``limit`` of them.

    ``keep()`` gives a fresh selector for one pass (the limit counts from 0 again); ``found`` collects the
    keys matched, to report the ones that are not in the set.
    """

    def __init__(self, keys: set[str] | None, limit: int | None):
        self.keys, self.limit, self.found = keys, limit, set()

    def keep(self) -> Callable[[Row], bool] | None:
        if self.keys is None and self.limit is None:
            return None
        kept = 0

        def one(row: Row) -> bool:
            nonlocal kept
            if self.keys is not None:
                hit = {row["image_id"], row["uri"]} & self.keys
                if not hit:
                    return False
                self.found |= hit
            if self.limit is not None and kept >= self.limit:
                return False
            kept += 1
            return True
        return one


def _groups_for_limit(labels: LabelSet, limit: int) -> list[str]:
    """The first groups (in order) holding at least ``limit`` images, from the footers only."""
    out, n = [], 0
    groups = labels.groups()
    footers = labels.footers(groups)
    for g in groups:
        if n >= limit:
            break
        out.append(g)
        n += int(footers[g][b"rows"])
    return out


def export_coco(root: RunRoot, set_name: str, out: str, storage_options: dict[str, Any] | None = None, *,
                retry_s: float = 0.0, images: set[str] | None = None, limit: int | None = None,
                copy_pngs: bool = False) -> dict[str, Any]:
    """Write label set ``set_name`` of ``root`` (the images named in ``images``, at most ``limit`` of them;
    all by default) as ``instances.json`` and ``panoptic.json`` under ``out`` (a folder or ``s3://``
    prefix), with its panoptic PNGs copied to ``out/panoptic/<image_id>.png`` when ``copy_pngs``. Returns
    counts."""
    if limit is not None and limit <= 0:
        raise UserError(f"--limit {limit}: must be a positive number of images")
    prefix = label_set_prefix(set_name)
    labels = LabelSet(root, prefix)
    groups = labels.groups()
    if not groups:
        stage = {layout.LABELS: "label", layout.PREDICT: "predict"}.get(prefix, "selftrain")
        raise InputsError(f"{root.join(prefix)} holds no committed label part: run `u2seg {stage}` first")
    if limit is not None and images is None:
        groups = _groups_for_limit(labels, limit)
    selection = _Selection(images, limit)
    dest = RunRoot(out, storage_options, retry_s=retry_s)
    pngs = 0
    if copy_pngs:
        pngs = _copy_pngs(labels, dest, groups, selection)
    file_name = (lambda r: f"{r['image_id']}.png") if copy_pngs else None
    counts = write_coco(labels, dest, "", f"u2seg export of {root.join(prefix)}", keep_factory=selection.keep,
                        file_name=file_name, groups=groups,
                        info={"u2seg_png_dir": dest.join(PANOPTIC) if copy_pngs else root.join(prefix, PANOPTIC)})
    missing = sorted(images - selection.found) if images is not None else []
    if missing:
        log.warning("export: %d of the %d listed images are not in %s (e.g. %s)", len(missing), len(images),
                    root.join(prefix), ", ".join(missing[:3]))
    log.info("export: %d images, %d instances of %s -> %s", counts["images"], counts["instances"],
             root.join(prefix), dest.uri)
    return {"set": root.join(prefix), "out": dest.uri, "images": counts["images"], "instances": counts["instances"],
            "parts_read": counts["parts"], "pngs_copied": pngs, "not_found": len(missing),
            "panoptic_json": dest.join(PANOPTIC_JSON), "instances_json": dest.join(INSTANCES_JSON)}


def _copy_pngs(labels: LabelSet, dest: RunRoot, groups: Sequence[str], selection: _Selection) -> int:
    """Copy the selected images' panoptic PNGs into ``dest/panoptic/<image_id>.png``, a part at a time."""
    keep = selection.keep()
    n = 0
    with ThreadPoolExecutor(max_workers=COPY_THREADS) as pool:
        for group in groups:
            rows = [r for r in labels.read_group(group, ["image_id", "uri", "png"]) if keep is None or keep(r)]

            def copy(row: Row) -> None:
                dest.write_bytes(posixpath.join(PANOPTIC, f"{row['image_id']}.png"),
                                 labels.root.read_bytes(labels.rel(row["png"])))
            for _ in pool.map(copy, rows):
                n += 1
    return n
