"""The extract stage on Ray Data: decode on CPU tasks, backbone + MaskCut in an actor pool, commit parts.

Exactly-once: every group of results is written under a name derived from its image ids; the
`extract/images` part (the ledger: one row per input, ok or error) is written last, so an image is
done iff it is in the ledger. Parts of other tables whose ledger part is missing are orphans of a killed
writer and are deleted; a rerun skips ledger images and recomputes the rest.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from u2seg.config import U2SegConfig, resolve_device
from u2seg.io import RunRoot
from u2seg.io.schemas import ERRORS_SCHEMA, IMAGES_SCHEMA, MASKS_SCHEMA, PATCHES_SCHEMA
from u2seg.pipeline.progress import Progress

log = logging.getLogger(__name__)

TABLES = ("masks", "patches", "errors")
LEDGER = "images"


def ledger_ids(root: RunRoot) -> pa.Array:
    """Image ids already committed (ok or error), as one Arrow array (compact even for millions)."""
    ids = root.read_parquet(f"extract/{LEDGER}", columns=["image_id"], schema=IMAGES_SCHEMA)
    return ids.column("image_id").combine_chunks() if ids.num_rows else pa.array([], pa.string())


def remove_orphans(root: RunRoot) -> int:
    """Delete parts of masks/patches/errors whose ledger part was never committed."""
    committed = set(root.list(f"extract/{LEDGER}", ".parquet"))
    n = 0
    for table in TABLES:
        for name in root.list(f"extract/{table}", ".parquet"):
            if name not in committed:
                root.remove(f"extract/{table}/{name}")
                n += 1
    return n


def _filter_done(batch: pa.Table, done: pa.Array) -> pa.Table:
    if len(done) == 0:
        return batch
    return batch.filter(pc.invert(pc.is_in(batch["image_id"], value_set=done)))


class InputUnreachableError(RuntimeError):
    """An input image stayed unreadable through a transient error for the whole retry budget."""


def fetch_image_bytes(uri: str, storage_options: dict[str, Any], retry_s: float) -> bytes:
    """The bytes of one input image; transient errors are retried for ``retry_s`` seconds, then raise
    :class:`InputUnreachableError` (the task fails: an outage must not be recorded as a bad image)."""
    from u2seg.io.retry import is_transient, retry_transient
    from u2seg.io.runroot import filesystem_for, split_protocol

    fs = filesystem_for(uri, storage_options)
    path = split_protocol(uri)[1]
    try:
        return retry_transient(lambda: fs.cat_file(path), retry_s, f"read {uri}")
    except Exception as exc:
        if is_transient(exc):
            raise InputUnreachableError(f"extract: could not read {uri} within run.storage.retry_s={retry_s}s: "
                                        f"{type(exc).__name__}: {exc}") from exc
        raise


def _decode_batch(batch: dict[str, np.ndarray], storage_options: dict[str, Any],
                  retry_s: float = 0.0) -> dict[str, np.ndarray]:
    """Fetch and decode on CPU tasks; a bad image becomes a row with ok=False and the reason."""
    from u2seg.io.images import decode_image

    n = len(batch["uri"])
    out: dict[str, list] = {k: [] for k in ("image_id", "uri", "ok", "error_class", "message", "image")}
    for i in range(n):
        uri = str(batch["uri"][i])
        out["image_id"].append(str(batch["image_id"][i]))
        out["uri"].append(uri)
        try:
            data = fetch_image_bytes(uri, storage_options, retry_s)
            out["image"].append(decode_image(data))
            out["ok"].append(True)
            out["error_class"].append("")
            out["message"].append("")
        except InputUnreachableError:
            raise
        except Exception as exc:  # any other failure of one image must not stop the job
            reason = getattr(exc, "reason", None)
            out["ok"].append(False)
            out["error_class"].append(type(exc).__name__ + (f":{reason}" if reason else ""))
            out["message"].append(str(exc)[:2000])
            out["image"].append(np.zeros((1, 1, 3), np.uint8))
            log.warning("extract: %s failed to load: %s", uri, exc)
    images = np.empty(n, dtype=object)
    images[:] = out.pop("image")
    return {**{k: np.array(v) for k, v in out.items()}, "image": images}


class MaskCutActor:
    """Holds the backbone on its device; turns a batch of decoded images into per-image results."""

    def __init__(self, cfg_dict: dict[str, Any]):
        import torch

        from u2seg.config import config_from_dict
        from u2seg.features.backbone import build_backbone

        self.cfg = config_from_dict(cfg_dict)
        ex = self.cfg.extract
        self.device = torch.device(resolve_device(self.cfg.run.device))
        torch.manual_seed(self.cfg.run.seed)
        self.model = build_backbone(ex.backbone, ex.weights, image_size=ex.image_size, seed=self.cfg.run.seed,
                                    storage_options=self.cfg.run.storage.storage_options()).to(self.device).eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from u2seg.pipeline.extract_batch import run_model_batch

        return run_model_batch(self.model, batch, self.cfg, self.device)


class StaleWriterError(RuntimeError):
    """A worker of an older run of the stage tried to commit after a newer run had started."""


def run_token(root: RunRoot) -> str | None:
    """The token of the run that owns ``extract/`` now (written by the runner when the stage starts)."""
    try:
        return root.read_json("extract/_STARTED").get("run_token")
    except FileNotFoundError:
        return None


def _check_owner(root: RunRoot, token: str | None) -> None:
    if token is None:
        return
    current = root.retrying(lambda: run_token(root), "read extract/_STARTED")  # rides out an outage like writes
    if current != token:
        raise StaleWriterError(f"extract: a newer run ({current}) owns {root.uri}; this writer of run {token} "
                               "commits nothing")


def _group_name(image_ids: list[str]) -> str:
    return "part-" + hashlib.sha1("\n".join(sorted(image_ids)).encode()).hexdigest()[:20] + ".parquet"


def _write_group(batch: dict[str, np.ndarray], root: RunRoot, token: str | None = None) -> dict[str, np.ndarray]:
    """Commit one group: masks, patches, errors, then the ledger part (same name) last.

    ``token`` fences a killed driver's late workers: the owner is checked before the first write and
    again before the ledger write, so a stale worker commits nothing (its other parts are orphans,
    removed when the stage next starts).
    """
    from u2seg.pipeline.extract_batch import rows_for_tables

    ids = [str(x) for x in batch["image_id"]]
    name = _group_name(ids)
    t0 = time.perf_counter()
    rows = rows_for_tables(batch)
    _check_owner(root, token)
    root.write_parquet(f"extract/masks/{name}", pa.Table.from_pylist(rows["masks"], schema=MASKS_SCHEMA))
    root.write_parquet(f"extract/patches/{name}", pa.Table.from_pylist(rows["patches"], schema=PATCHES_SCHEMA))
    root.write_parquet(f"extract/errors/{name}", pa.Table.from_pylist(rows["errors"], schema=ERRORS_SCHEMA))
    _check_owner(root, token)
    root.write_parquet(f"extract/{LEDGER}/{name}", pa.Table.from_pylist(rows["images"], schema=IMAGES_SCHEMA))
    write_s = time.perf_counter() - t0
    return {
        "part": np.array([name]),
        "images": np.array([len(ids)]),
        "errors": np.array([len(rows["errors"])]),
        "masks": np.array([len(rows["masks"])]),
        "write_s": np.array([write_s]),
        "timings": np.array([pickle.dumps(rows["timings"])], dtype=object),
    }


def run_extract(cfg: U2SegConfig, root: RunRoot) -> dict[str, Any]:
    """Extract masks, descriptors and stuff features for every manifest image not yet in the ledger."""
    import ray

    ex = cfg.extract
    manifest = root.parquet_paths("manifest")
    if not manifest:
        raise FileNotFoundError(f"no manifest in {root.uri}: run `u2seg manifest` first")
    orphans = remove_orphans(root)
    done = ledger_ids(root)
    total = sum(_num_rows(root, f) for f in manifest)
    todo = total - len(done)
    log.info("extract: %d images in the manifest, %d already done, %d orphan parts removed",
             total, len(done), orphans)
    t0 = time.time()
    sums: dict[str, float] = {"images": 0, "errors": 0, "masks": 0, "write_s": 0.0}
    timings: dict[str, float] = {}
    if todo > 0:
        ds = ray.data.read_parquet(manifest, filesystem=root.pyarrow_fs(), columns=["image_id", "uri"])
        if len(done):
            ds = ds.map_batches(_filter_done, batch_format="pyarrow", fn_kwargs={"done": done})
        # Small manifest rows make one read block of a whole manifest; split it so an actor task (the unit
        # of parallelism and of retry after a lost actor or node) carries rows_per_part images, not all.
        ds = ds.repartition(target_num_rows_per_block=ex.rows_per_part)
        gpus = ex.gpus_per_actor
        if gpus == 0 and resolve_device(cfg.run.device) == "cuda" and ray.cluster_resources().get("GPU", 0):
            gpus = 1.0
        ds = ds.map_batches(_decode_batch, batch_size=ex.batch_size, num_cpus=1,
                            fn_kwargs={"storage_options": cfg.run.storage.storage_options(),
                                       "retry_s": cfg.run.storage.retry_s})
        ds = ds.map_batches(MaskCutActor, batch_size=ex.batch_size, compute=ray.data.ActorPoolStrategy(
            size=ex.num_actors), num_gpus=gpus, num_cpus=ex.cpus_per_actor,
            fn_constructor_kwargs={"cfg_dict": cfg.to_dict()})
        ds = ds.map_batches(_write_group, batch_size=ex.rows_per_part, num_cpus=0.5,
                            fn_kwargs={"root": root, "token": run_token(root)})
        with Progress(todo, "extract", unit="img") as bar:
            for row in ds.iter_rows():
                for k in sums:
                    sums[k] += row[k]
                for k, v in pickle.loads(row["timings"]).items():
                    timings[k] = timings.get(k, 0.0) + v
                bar.update(int(row["images"]))
    n_ledger = len(ledger_ids(root))
    errors = root.read_parquet("extract/errors", columns=["image_id"], schema=ERRORS_SCHEMA).num_rows
    wall = time.time() - t0
    stats = {"manifest_images": total, "processed_now": int(sums["images"]), "ledger_images": n_ledger,
             "errors": errors, "masks_now": int(sums["masks"]), "orphans_removed": orphans,
             "images_per_s": round(sums["images"] / wall, 3) if wall > 0 else None,
             "phase_seconds": {**{k: round(v, 3) for k, v in timings.items()},
                               "write": round(sums["write_s"], 3)}}
    if n_ledger != total:
        raise RuntimeError(f"extract: ledger holds {n_ledger} images but the manifest has {total}")
    if total and errors / total > cfg.run.max_error_fraction:
        raise RuntimeError(f"extract: {errors}/{total} images failed, above run.max_error_fraction="
                           f"{cfg.run.max_error_fraction}; see extract/errors in {root.uri}")
    return stats


def _num_rows(root: RunRoot, path: str) -> int:
    import pyarrow.parquet as pq

    with root.fs.open(path, "rb") as fh:
        return pq.ParquetFile(fh).metadata.num_rows
