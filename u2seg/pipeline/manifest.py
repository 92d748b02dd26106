"""The manifest stage: every input image as one row (image_id, uri, bytes, width, height, version).

Sources are split into sub-folders/sub-prefixes and listed by a thread pool (listing is I/O bound);
each lister streams rows into its own Parquet parts of at most ``rows_per_part`` rows.
"""

from __future__ import annotations

import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

from u2seg.config import ConfigError, U2SegConfig
from u2seg.errors import InputsError
from u2seg.io import RunRoot, layout
from u2seg.io.images import IMAGE_EXTENSIONS, image_id_for
from u2seg.io.listing import ListStats, canonical_uri, iter_source, split_protocol, split_source
from u2seg.io.schemas import ERRORS_SCHEMA, MANIFEST_SCHEMA

log = logging.getLogger(__name__)


def _probe(uri: str, storage_options: dict[str, Any]) -> tuple[int, int]:
    from u2seg.io.images import ImageDecodeError, probe_size
    from u2seg.io.runroot import filesystem_for

    fs = filesystem_for(uri, storage_options)
    try:
        with fs.open(split_protocol(uri)[1], "rb") as fh:
            head = fh.read(256 * 1024)
            try:
                return probe_size(head, prefix=len(head) == 256 * 1024)
            except ImageDecodeError as exc:  # the header lies beyond the first 256 KiB: read it all
                if exc.reason != "truncated" or len(head) < 256 * 1024:
                    raise
                return probe_size(head + fh.read())
    except (ImageDecodeError, OSError, ValueError):
        return -1, -1


def _list_one(spec: str, cfg: U2SegConfig, root: RunRoot, seen_parts: list[str], exclude: str | None,
              folder: str) -> dict[str, Any]:
    """List one source spec into parts of ``folder`` named after the spec's hash (deterministic, a rerun
    overwrites). Links that cannot be followed go to ``<folder>/errors`` under the same tag; what is
    skipped is counted."""
    storage = cfg.run.storage.storage_options()
    tag = hashlib.sha1(spec.encode()).hexdigest()[:12]
    rows: dict[str, list] = {n: [] for n in MANIFEST_SCHEMA.names}
    errors: list[dict[str, str]] = []
    stats = ListStats()
    n_rows = n_parts = 0

    def flush() -> None:
        nonlocal n_parts
        if not rows["uri"]:
            return
        name = f"part-{tag}-{n_parts:05d}.parquet"
        root.write_parquet(layout.part(folder, name), pa.table(rows, schema=MANIFEST_SCHEMA))
        seen_parts.append(name)
        n_parts += 1
        for v in rows.values():
            v.clear()

    for entry in iter_source(spec, storage, cfg.manifest.recursive, exclude=exclude, stats=stats):
        if entry.error:
            errors.append({"image_id": image_id_for(entry.uri), "uri": entry.uri, "stage": "manifest",
                           "error_class": entry.error, "message": entry.message})
            log.warning("manifest: %s", entry.message)
            continue
        w, h = _probe(entry.uri, storage) if cfg.manifest.probe_sizes else (-1, -1)
        rows["image_id"].append(image_id_for(entry.uri))
        rows["uri"].append(entry.uri)
        rows["bytes"].append(entry.size)
        rows["width"].append(w)
        rows["height"].append(h)
        rows["version"].append(entry.version)
        n_rows += 1
        if len(rows["uri"]) >= cfg.manifest.rows_per_part:
            flush()
    flush()
    errors_rel = layout.part(f"{folder}/errors", f"part-{tag}.parquet")
    if errors:
        root.write_parquet(errors_rel, pa.Table.from_pylist(errors, schema=ERRORS_SCHEMA))
    else:
        root.remove(errors_rel)
    return {"rows": n_rows, "parts": n_parts, "errors": errors, "skips": stats, "errors_part": errors_rel}


def manifest_fingerprint(root: RunRoot, folder: str = layout.MANIFEST) -> str:
    """What a listing holds, whatever its part layout: the row count and an order-free sum of row hashes
    of (image_id, version), so an added, removed or changed image changes it."""
    total, count = 0, 0
    for name in root.list(folder, ".parquet"):
        table = root.read_part(layout.part(folder, name), ["image_id", "version"])
        for image_id, version in zip(table.column("image_id").to_pylist(), table.column("version").to_pylist(),
                                     strict=True):
            total += int.from_bytes(hashlib.sha1(f"{image_id}\t{version}".encode()).digest()[:16], "big")
        count += table.num_rows
    return f"{count}-{total % (1 << 128):032x}"


def _check_inputs(inputs: list[str], key: str = "manifest.inputs") -> None:
    if not inputs:
        raise ConfigError(key, inputs, "at least one folder, s3:// prefix or list file")
    norm = [u.rstrip("/") + "/" for u in inputs]
    for i, a in enumerate(norm):
        for j, b in enumerate(norm):
            if i != j and b.startswith(a):
                raise ConfigError(key, inputs,
                                  f"sources that do not nest ({inputs[j]} is inside {inputs[i]}; "
                                  "nested sources would list images twice)")


def first_occurrences(ids: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Boolean mask over ``ids`` (16-character image ids): True where an id appears for the first time.

    Ids are compared as 16-byte fixed-width values in one numpy array (16 bytes per image, no Python
    objects), so ten million rows cost ~160 MB on the driver.
    """
    if len(ids) == 0:
        return np.zeros(0, dtype=bool)
    values = layout.id_array(ids)
    _, first = np.unique(values, return_index=True)
    keep = np.zeros(len(values), dtype=bool)
    keep[first] = True
    return keep


def drop_duplicate_images(root: RunRoot, parts: list[str], folder: str = layout.MANIFEST) -> int:
    """Keep the first row of every image_id (parts in name order, rows in order); rewrite parts that held
    later copies (an image in two list files, a list file and a folder, or a symlink beside its target).
    Returns how many rows were dropped."""
    parts = sorted(parts)
    columns = [root.read_part(layout.part(folder, name), ["image_id"]).column("image_id") for name in parts]
    keep = first_occurrences(pa.chunked_array([c for col in columns for c in col.chunks], pa.string()))
    dropped, start = 0, 0
    for name, col in zip(parts, columns, strict=True):
        mask = keep[start: start + len(col)]
        start += len(col)
        if mask.all():
            continue
        table = root.read_part(layout.part(folder, name))
        dupes = table.filter(pa.array(~mask)).column("uri").to_pylist()
        dropped += len(dupes)
        log.warning("manifest: %s lists %d image(s) already listed before, dropped (e.g. %s)",
                    name, len(dupes), dupes[:3])
        if mask.any():
            root.write_parquet(layout.part(folder, name), table.filter(pa.array(mask)))
        else:
            root.remove(layout.part(folder, name))
    return dropped


def _run_root_to_exclude(root: RunRoot) -> str:
    """The run root as listings see paths: a canonical local path, or ``bucket/prefix``."""
    return canonical_uri(root.uri) if root.is_local else root.path()


def list_images(cfg: U2SegConfig, root: RunRoot, inputs: list[str], folder: str, key: str) -> dict[str, Any]:
    """List ``inputs`` (folders, prefixes, list files) into ``<folder>/part-*.parquet`` (MANIFEST_SCHEMA), the
    links that cannot be followed into ``<folder>/errors``; stale parts of an earlier listing are removed and an
    image reachable twice is kept once. ``key`` names the inputs' knob in errors. Returns counts, the
    listing's fingerprint under ``output_fingerprint``."""
    _check_inputs(inputs, key)
    t0 = time.time()
    storage = cfg.run.storage.storage_options()
    exclude = _run_root_to_exclude(root)
    specs: list[str] = []
    for uri in inputs:
        specs.extend(split_source(uri, storage, cfg.manifest.recursive, exclude))
    log.info("%s: listing %d source(s) as %d stream(s)", folder, len(inputs), len(specs))
    written: list[str] = []
    with ThreadPoolExecutor(max_workers=cfg.manifest.list_concurrency) as pool:
        results = list(pool.map(lambda s: _list_one(s, cfg, root, written, exclude, folder), specs))
    for stale in set(root.list(folder, ".parquet")) - set(written):
        root.remove(layout.part(folder, stale))
    kept_errors = {r["errors_part"].rsplit("/", 1)[1] for r in results if r["errors"]}
    for stale in set(root.list(f"{folder}/errors", ".parquet")) - kept_errors:
        root.remove(layout.part(f"{folder}/errors", stale))
    # an image reachable twice (listed twice, or a symlink beside its target) is kept once
    dropped = drop_duplicate_images(root, written, folder)
    written = root.list(folder, ".parquet")
    n = sum(r["rows"] for r in results) - dropped
    skips = ListStats()
    for r in results:
        skips.merge(r["skips"])
    link_errors: dict[str, int] = {}
    for r in results:
        for e in r["errors"]:
            link_errors[e["error_class"]] = link_errors.get(e["error_class"], 0) + 1
    if n == 0:
        raise InputsError(f"{folder}: no images found under {inputs} (accepted suffixes: "
                          f"{', '.join(IMAGE_EXTENSIONS)}; skipped: {skips.to_dict()})")
    stats = {"images": n, "parts": len(written), "streams": len(specs), "duplicates_dropped": dropped,
             "link_errors": link_errors, **skips.to_dict(), "seconds": round(time.time() - t0, 3),
             "output_fingerprint": manifest_fingerprint(root, folder)}
    log.info("%s: %d images in %d parts (%.1fs); skipped %s", folder, n, len(written), stats["seconds"],
             skips.to_dict())
    return stats


def run_manifest(cfg: U2SegConfig, root: RunRoot) -> dict[str, Any]:
    """List every source into ``manifest/*.parquet``; stale parts of an earlier run are removed."""
    return list_images(cfg, root, cfg.manifest.inputs, layout.MANIFEST, "manifest.inputs")
