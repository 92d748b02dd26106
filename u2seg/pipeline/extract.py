"""The extract stage on Ray Data: decode on CPU tasks, backbone + MaskCut in an actor pool, commit groups.

The graph: manifest rows not yet in the ledger -> ``decode_batch`` (CPU tasks) -> ``MaskCutActor``
(``extract_actor.py``; one actor per GPU, or CPU actors) -> ``write_group`` (``extract_commit.py``:
every table's part, the ledger part last). A killed worker or a rerun never loses or duplicates an image.
"""

from __future__ import annotations

import json
import logging
import pickle
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from u2seg.config import U2SegConfig, resolve_device
from u2seg.io import RunRoot, layout
from u2seg.io.schemas import ERRORS_SCHEMA
from u2seg.pipeline.extract_actor import MaskCutActor, decode_batch
from u2seg.pipeline.extract_commit import (
    ManifestIndex,
    ledger_ids,
    reconcile_ledger,
    remove_orphans,
    run_token,
    write_group,
)
from u2seg.pipeline.progress import Progress

log = logging.getLogger(__name__)


def _filter_done(batch: pa.Table, done: pa.Array) -> pa.Table:
    if len(done) == 0:
        return batch
    return batch.filter(pc.invert(pc.is_in(batch["image_id"], value_set=done)))


def run_extract(cfg: U2SegConfig, root: RunRoot) -> dict[str, Any]:
    """Extract masks, descriptors and stuff features for every manifest image not yet in the ledger."""
    import ray

    extract_cfg = cfg.extract
    manifest = root.parquet_paths(layout.MANIFEST)
    if not manifest:
        raise FileNotFoundError(f"no manifest in {root.uri}: run `u2seg manifest` first")
    orphans = remove_orphans(root)
    index = ManifestIndex.read(root)
    reconciled = reconcile_ledger(root, index)
    done = ledger_ids(root)
    total = len(index.ids)
    todo = index.missing(layout.id_array(done))
    log.info("extract: %d images in the manifest, %d already done, %d to do; %d departed or changed, %d orphan "
             "parts removed", total, total - todo, todo, reconciled["departed"],
             orphans + reconciled["orphans_removed"])
    t0 = time.time()
    sums: dict[str, float] = {"images": 0, "errors": 0, "masks": 0, "write_s": 0.0}
    timings: dict[str, float] = {}
    stuff_head = root.read_bytes(layout.STUFF_HEAD) if cfg.stuff.method == "stego" else None
    if todo > 0:
        ds = ray.data.read_parquet(manifest, filesystem=root.pyarrow_fs(), columns=["image_id", "uri", "version"])
        if len(done):
            ds = ds.map_batches(_filter_done, batch_format="pyarrow", fn_kwargs={"done": done})
        # Small manifest rows make one read block of a whole manifest; split it so an actor task (the unit
        # of parallelism and of retry after a lost actor or node) carries rows_per_part images, not all.
        ds = ds.repartition(target_num_rows_per_block=extract_cfg.rows_per_part)
        gpus = extract_cfg.gpus_per_actor
        if gpus == 0 and resolve_device(cfg.run.device) == "cuda" and ray.cluster_resources().get("GPU", 0):
            gpus = 1.0
        ds = ds.map_batches(decode_batch, batch_size=extract_cfg.batch_size, num_cpus=1,
                            fn_kwargs={"storage_options": cfg.run.storage.storage_options(),
                                       "retry_s": cfg.run.storage.retry_s, "max_side": extract_cfg.max_side})
        pool = ray.data.ActorPoolStrategy(min_size=min(extract_cfg.min_actors, extract_cfg.num_actors),
                                          max_size=extract_cfg.num_actors)
        ds = ds.map_batches(MaskCutActor, batch_size=extract_cfg.batch_size, compute=pool, num_gpus=gpus,
                            num_cpus=extract_cfg.cpus_per_actor,
            fn_constructor_kwargs={"cfg_dict": cfg.to_dict(), "stuff_head": stuff_head})
        ds = ds.map_batches(write_group, batch_size=extract_cfg.rows_per_part, num_cpus=0.5,
                            fn_kwargs={"root": root, "token": run_token(root)})
        with Progress(todo, "extract", unit="img", root=root, stage="extract",
                      every_s=cfg.run.progress_every_s) as bar:
            for row in ds.iter_rows():
                for k in sums:
                    sums[k] += row[k]
                for k, v in pickle.loads(row["timings"]).items():
                    timings[k] = timings.get(k, 0.0) + v
                bar.update(int(row["images"]), errors=json.loads(row["error_classes"]))
    ledger = layout.id_array(ledger_ids(root))
    n_ledger = len(ledger)
    errors = root.read_parquet(layout.ERRORS, columns=["image_id"], schema=ERRORS_SCHEMA).num_rows
    wall = time.time() - t0
    stats = {"manifest_images": total, "processed_now": int(sums["images"]), "ledger_images": n_ledger,
             "errors": errors, "masks_now": int(sums["masks"]),
             "orphans_removed": orphans + reconciled["orphans_removed"], "departed": reconciled["departed"],
             "groups_rewritten": reconciled["groups_rewritten"],
             "images_per_s": round(sums["images"] / wall, 3) if wall > 0 else None,
             "phase_seconds": {**{k: round(v, 3) for k, v in timings.items()},
                               "write": round(sums["write_s"], 3)}}
    if n_ledger != total or not np.array_equal(np.sort(ledger), index.ids):
        extra = int((~np.isin(ledger, index.ids)).sum())
        raise RuntimeError(f"extract: the ledger ({n_ledger} images) does not equal the manifest ({total}): "
                           f"{extra} ledger image(s) not in the manifest, {index.missing(ledger)} manifest image(s) "
                           "not in the ledger")
    if total and errors / total > cfg.run.max_error_fraction:
        raise RuntimeError(f"extract: {errors}/{total} images failed, above run.max_error_fraction="
                           f"{cfg.run.max_error_fraction}; see extract/errors in {root.uri}")
    return stats
