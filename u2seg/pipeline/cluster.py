"""The cluster stage: distributed k-means of mask descriptors (things) and patch features (stuff),
then an assignment pass writing every mask's pseudo class.

The assignment pass runs one Ray Data actor pool, each actor holding a faiss index of the thing
centroids; each masks part is assigned as a unit and written under the same part name, so a retried
or rerun assignment overwrites instead of duplicating.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa

from u2seg.config import U2SegConfig
from u2seg.io import RunRoot, layout
from u2seg.io.schemas import ASSIGNMENTS_SCHEMA
from u2seg.pipeline.markers import fingerprint
from u2seg.pipeline.progress import Progress

log = logging.getLogger(__name__)


def size_histogram(sizes: np.ndarray) -> dict[str, int]:
    """Cluster sizes bucketed by powers of two (0, 1, 2-3, 4-7, ...): shows dead and giant clusters."""
    hist: dict[str, int] = {}
    for s in sizes.tolist():
        if s == 0:
            key = "0"
        else:
            lo = 1 << (int(s).bit_length() - 1)
            key = f"{lo}-{2 * lo - 1}" if lo > 1 else "1"
        hist[key] = hist.get(key, 0) + 1
    return hist


def _cluster_one(cfg: U2SegConfig, root: RunRoot, table: str, column: str, k_wanted: int, name: str,
                 centroids_rel: str) -> dict[str, Any]:
    from u2seg.cluster.distributed import distributed_kmeans

    paths = root.parquet_paths(table)
    n = layout.count_rows(root, table)
    if n == 0:
        raise ValueError(f"cluster: {table} in {root.uri} has no rows to cluster; "
                         "did extract find no masks (see extract/errors)?")
    k = min(k_wanted, n)
    if k < k_wanted:
        log.warning("cluster: only %d %s vectors, clustering into k=%d instead of %d", n, name, k, k_wanted)
    cluster_cfg = cfg.cluster
    result = distributed_kmeans(
        paths, k, column=column, num_shards=min(cluster_cfg.num_shards, max(1, len(paths))),
        niter=cluster_cfg.niter, seed=cfg.run.seed, spherical=cluster_cfg.spherical, tol=cluster_cfg.tol,
        filesystem=root.fs, checkpoint_uri=root.join(layout.kmeans_checkpoint(name)),
        storage_options=root.storage_options, max_points_per_centroid=cluster_cfg.max_points_per_centroid)
    layout.save_npy(root, centroids_rel, result.centroids.astype(np.float32))
    stats = result.stats()
    stats["k_requested"] = k_wanted
    stats["size_histogram"] = size_histogram(result.sizes)
    stats.pop("sizes")
    return {"stats": stats, "sizes": result.sizes.tolist()}


class AssignActor:
    """One faiss index of the thing centroids per actor; assigns and writes one masks part per call."""

    def __init__(self, root: RunRoot, spherical: bool):
        from u2seg.cluster.kmeans import build_index

        self.root = root
        self.spherical = spherical
        self.index = build_index(layout.load_npy(root, layout.THINGS_CENTROIDS), spherical)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from u2seg.cluster.arrow import list_column_to_numpy
        from u2seg.cluster.kmeans import assign, normalize_rows

        counts = []
        for name in batch["name"]:
            t = self.root.read_part(layout.part(layout.MASKS, str(name)), ["image_id", "mask_id", "descriptor"])
            x = list_column_to_numpy(t.column("descriptor")) if t.num_rows else np.zeros((0, 1), np.float32)
            if self.spherical and len(x):
                x = normalize_rows(x)
            labels, scores = assign(self.index, x)
            out = pa.table({"image_id": t.column("image_id"), "mask_id": t.column("mask_id"),
                            "cluster_id": pa.array(labels.astype(np.int32)),
                            "distance": pa.array(scores.astype(np.float32))}, schema=ASSIGNMENTS_SCHEMA)
            self.root.write_parquet(layout.part(layout.ASSIGNMENTS, str(name)), out)
            counts.append(t.num_rows)
        return {"name": batch["name"], "masks": np.array(counts)}


def run_cluster(cfg: U2SegConfig, root: RunRoot) -> dict[str, Any]:
    import ray

    t0 = time.time()
    fitted = root.exists(layout.CLUSTER_FIT) and root.exists(layout.THINGS_CENTROIDS)
    refit = cfg.cluster.refit == "always" or not fitted
    names = root.list(layout.MASKS, ".parquet")
    if refit:
        things = _cluster_one(cfg, root, layout.MASKS, "descriptor", cfg.cluster.things_k, "things",
                              layout.THINGS_CENTROIDS)
        t1 = time.time()
        if cfg.stuff.method == "kmeans":
            stuff = _cluster_one(cfg, root, layout.PATCHES, "feature", cfg.cluster.stuff_k, "stuff",
                                 layout.STUFF_CENTROIDS)
            stuff_source, k_stuff = layout.STUFF_CENTROIDS, stuff["stats"]["k"]
        else:  # the stuff classes are the STEGO cluster probe's centres (stuff stage)
            from u2seg.pipeline.stuff import head_classes

            stuff_source, k_stuff = layout.STUFF_HEAD, head_classes(root)
            stuff = {"stats": {"method": "stego", "k": k_stuff}, "sizes": []}
        t2 = time.time()
        root.write_json(layout.CLUSTER_SIZES, {"things": things["sizes"], "stuff": stuff["sizes"]})
        root.write_json(layout.CLUSTER_FIT, {
            "k_things": things["stats"]["k"], "k_stuff": k_stuff,
            "classes": layout.file_digest(root, layout.THINGS_CENTROIDS, stuff_source),
            "masks_parts": len(names), "things": things["stats"], "stuff": stuff["stats"]})
        todo = names
    else:  # assign_new: the centroids stay, so existing pseudo-class ids never change under users
        fit = root.read_json(layout.CLUSTER_FIT)
        things, stuff = {"stats": fit["things"]}, {"stats": fit["stuff"]}
        t1 = t2 = time.time()
        done = set(root.list(layout.ASSIGNMENTS, ".parquet"))
        todo = [n for n in names if n not in done]
        log.info("cluster: keeping the centroids (cluster.refit=assign_new); %d of %d masks parts to assign",
                 len(todo), len(names))
    for stale in set(root.list(layout.ASSIGNMENTS, ".parquet")) - set(names):
        root.remove(layout.part(layout.ASSIGNMENTS, stale))
    assigned = 0
    if todo:
        ds = ray.data.from_items([{"name": n} for n in todo]).map_batches(
            AssignActor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=max(1, min(cfg.cluster.num_shards,
                                                                                         len(todo)))),
            num_cpus=1, fn_constructor_kwargs={"root": root, "spherical": cfg.cluster.spherical})
        with Progress(len(todo), "cluster: assign", unit="part", root=root, stage="cluster",
                      every_s=cfg.run.progress_every_s) as bar:
            for r in ds.iter_rows():
                assigned += int(r["masks"])
                bar.update(1)
    t3 = time.time()
    log.info("cluster: things k=%d, stuff k=%d; %d masks assigned now", things["stats"]["k"], stuff["stats"]["k"],
             assigned)
    digest = layout.classes_digest(root)
    return {"things": things["stats"], "stuff": stuff["stats"], "refit": refit, "masks_assigned": assigned,
            "parts_assigned": len(todo),
            "phase_seconds": {"things": round(t1 - t0, 3), "stuff": round(t2 - t1, 3), "assign": round(t3 - t2, 3)},
            "output_fingerprint": fingerprint(digest, names)}
