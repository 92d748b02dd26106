"""Committing extract results exactly once: one group's rows in every table, the ledger part last.

Every group is written under a name derived from its image ids (``layout.group_name``); the ledger part
(``extract/images``: one row per input, ok or error) is written last, so an image is done iff it is in
the ledger. Parts of other tables whose ledger part is missing are orphans of a killed writer and are
deleted when the stage starts. A run token in ``extract/_STARTED`` fences late writers of a killed driver.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from u2seg.io import RunRoot, layout
from u2seg.io.schemas import ERRORS_SCHEMA, IMAGES_SCHEMA, MASKS_SCHEMA, PATCHES_SCHEMA

_TABLE_SCHEMAS = ((layout.MASKS, "masks", MASKS_SCHEMA), (layout.PATCHES, "patches", PATCHES_SCHEMA),
                  (layout.ERRORS, "errors", ERRORS_SCHEMA))
STARTED = layout.marker("extract", layout.STARTED)
log = logging.getLogger(__name__)


class StaleWriterError(RuntimeError):
    """A worker of an older run of the stage tried to commit after a newer run had started."""


def ledger_ids(root: RunRoot) -> pa.Array:
    """Image ids already committed (ok or error), as one Arrow array (compact even for millions)."""
    ids = root.read_parquet(layout.LEDGER, columns=["image_id"], schema=IMAGES_SCHEMA)
    return ids.column("image_id").combine_chunks() if ids.num_rows else pa.array([], pa.string())


def remove_orphans(root: RunRoot) -> int:
    """Delete parts of masks/patches/errors whose ledger part was never committed."""
    committed = set(root.list(layout.LEDGER, ".parquet"))
    n = 0
    for folder in layout.EXTRACT_TABLES:
        for name in root.list(folder, ".parquet"):
            if name not in committed:
                root.remove(layout.part(folder, name))
                n += 1
    return n


def row_keys(ids: Sequence[str], versions: Sequence[str]) -> np.ndarray:
    """One 64-bit key per (image_id, version): the identity of an image *as it was listed*."""
    return np.array([int.from_bytes(hashlib.blake2b(f"{i}\t{v}".encode(), digest_size=8).digest(), "big")
                     for i, v in zip(ids, versions, strict=True)], dtype=np.uint64)


@dataclass
class ManifestIndex:
    """The manifest's ids and (id, version) keys, sorted: 24 bytes per image on the driver."""

    ids: np.ndarray  # S16, sorted
    keys: np.ndarray  # uint64, sorted

    @classmethod
    def read(cls, root: RunRoot) -> ManifestIndex:
        ids, keys = [], []
        for name in root.list(layout.MANIFEST, ".parquet"):
            t = root.read_part(layout.part(layout.MANIFEST, name), ["image_id", "version"])
            ids.append(layout.id_array(t.column("image_id")))
            keys.append(row_keys(t.column("image_id").to_pylist(), t.column("version").to_pylist()))
        return cls(np.sort(np.concatenate(ids)) if ids else np.zeros(0, "S16"),
                   np.sort(np.concatenate(keys)) if keys else np.zeros(0, np.uint64))

    def missing(self, done_ids: np.ndarray) -> int:
        """How many manifest images are not among ``done_ids``."""
        return int(len(self.ids) - np.isin(self.ids, done_ids, assume_unique=True).sum())


def reconcile_ledger(root: RunRoot, manifest: ManifestIndex) -> dict[str, int]:
    """Take out of extract every image that left the manifest or changed since it was extracted.

    A ledger group holding such images is rewritten without them under the name of its remaining ids
    (every table's part first, the ledger part last), then the old ledger part is removed; its other parts
    become orphans and go with :func:`remove_orphans`. Crash-safe: rerunning finds the old part again and
    either finds its replacement (and only removes the old part) or writes it.
    """
    departed = rewritten = 0
    for name in root.list(layout.LEDGER, ".parquet"):
        ledger = root.read_part(layout.part(layout.LEDGER, name), ["image_id", "version"])
        ids = ledger.column("image_id").to_pylist()
        keep = np.isin(row_keys(ids, ledger.column("version").to_pylist()), manifest.keys)
        if keep.all():
            continue
        departed += int((~keep).sum())
        remaining = [i for i, k in zip(ids, keep, strict=True) if k]
        if remaining:
            new = layout.group_name(remaining)
            if not root.exists(layout.part(layout.LEDGER, new)):
                for folder in (*layout.EXTRACT_TABLES, layout.LEDGER):
                    table = layout.read_part(root, layout.part(folder, name), image_ids=remaining)
                    root.write_parquet(layout.part(folder, new), table)
            rewritten += 1
        root.remove(layout.part(layout.LEDGER, name))
    if departed:
        log.info("extract: %d image(s) left the manifest or changed; %d group(s) rewritten without them",
                 departed, rewritten)
    return {"departed": departed, "groups_rewritten": rewritten, "orphans_removed": remove_orphans(root)}


def run_token(root: RunRoot) -> str | None:
    """The token of the run that owns ``extract/`` now (written by the runner when the stage starts)."""
    try:
        return root.read_json(STARTED).get("run_token")
    except FileNotFoundError:
        return None


def _check_owner(root: RunRoot, token: str | None) -> None:
    if token is None:
        return
    current = root.retrying(lambda: run_token(root), f"read {STARTED}")  # rides out an outage like writes
    if current != token:
        raise StaleWriterError(f"extract: a newer run ({current}) owns {root.uri}; this writer of run {token} "
                               "commits nothing")


def write_group(batch: dict[str, np.ndarray], root: RunRoot, token: str | None = None) -> dict[str, np.ndarray]:
    """Commit one group: masks, patches, errors, then the ledger part (same name) last.

    ``token`` fences a killed driver's late workers: the owner is checked before the first write and
    again before the ledger write, so a stale worker commits nothing (its other parts are orphans,
    removed when the stage next starts).
    """
    ids = [str(x) for x in batch["image_id"]]
    name = layout.group_name(ids)
    t0 = time.perf_counter()
    rows = rows_for_tables(batch)
    _check_owner(root, token)
    for folder, key, schema in _TABLE_SCHEMAS:
        root.write_parquet(layout.part(folder, name), pa.Table.from_pylist(rows[key], schema=schema))
    _check_owner(root, token)
    root.write_parquet(layout.part(layout.LEDGER, name), pa.Table.from_pylist(rows["images"], schema=IMAGES_SCHEMA))
    return {
        "part": np.array([name]),
        "images": np.array([len(ids)]),
        "errors": np.array([len(rows["errors"])]),
        # error rows by reason (their error_class), so the driver's progress counts them by reason
        "error_classes": np.array([json.dumps(dict(Counter(e["error_class"] for e in rows["errors"])))]),
        "masks": np.array([len(rows["masks"])]),
        "write_s": np.array([time.perf_counter() - t0]),
        "timings": np.array([pickle.dumps(rows["timings"])], dtype=object),
    }


def rows_for_tables(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """Rows of the masks, patches, errors and images (ledger) tables for one group of results."""
    masks, patches, errors, images = [], [], [], []
    timings: dict[str, float] = {}
    for i in range(len(batch["image_id"])):
        image_id, uri, version = str(batch["image_id"][i]), str(batch["uri"][i]), str(batch["version"][i])
        blob = batch["result"][i]
        if not batch["ok"][i] or not blob:
            errors.append({"image_id": image_id, "uri": uri, "stage": "extract",
                           "error_class": str(batch["error_class"][i]) or "Error", "message": str(batch["message"][i])})
            images.append({"image_id": image_id, "uri": uri, "status": "error", "version": version, "width": -1,
                           "height": -1, "n_masks": 0, "grid_h": 0, "grid_w": 0, "stuff_grid": [], "stuff_dim": 0,
                           "stuff_classes": []})
            continue
        r = pickle.loads(blob)
        for m in r["masks"]:
            masks.append({"image_id": image_id, "mask_id": m["mask_id"], "rle": m["rle"], "bbox": m["bbox"],
                          "area": int(m["area"]), "score": float(m["score"]), "descriptor": m["descriptor"],
                          "image_width": r["width"], "image_height": r["height"]})
        row = {"image_id": image_id, "uri": uri, "status": "ok", "version": version, "width": r["width"],
               "height": r["height"], "n_masks": len(r["masks"])}
        if "stuff_classes" in r:  # STEGO: a stuff class per patch
            classes = r["stuff_classes"]
            row.update(grid_h=classes.shape[0], grid_w=classes.shape[1], stuff_grid=[], stuff_dim=0,
                       stuff_classes=classes.reshape(-1))
        else:  # the k-means baseline: pooled features, and a sample of patch features to cluster
            feats, rows, cols = r["patches"]
            for f, rr, cc in zip(feats, rows, cols, strict=True):
                patches.append({"image_id": image_id, "feature": f, "row": int(rr), "col": int(cc)})
            grid = r["stuff_grid"]
            row.update(grid_h=grid.shape[0], grid_w=grid.shape[1], stuff_grid=grid.reshape(-1), stuff_dim=grid.shape[2],
                       stuff_classes=[])
        images.append(row)
        for k, v in r["timings"].items():
            timings[k] = timings.get(k, 0.0) + v
    return {"masks": masks, "patches": patches, "errors": errors, "images": images, "timings": timings}
