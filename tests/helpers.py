"""Test helpers shared by integration and e2e tests."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

from u2seg.config import U2SegConfig, load_config


def s3_overrides(s3) -> list[str]:
    return [f"run.storage.endpoint_url={s3.endpoint_url}", "run.storage.key=u2seg-test-key",
            "run.storage.secret=u2seg-test-secret", "run.storage.region=us-east-1"]


TINY = [
    "extract.backbone=vit_small_patch8_224.dino", "extract.image_size=64", "extract.n_masks=2",
    "extract.batch_size=4", "extract.rows_per_part=6", "extract.stuff_grid=8", "extract.stuff_dim=16",
    "extract.patches_per_image=16", "extract.amp=none", "stuff.method=kmeans", "extract.descriptor=mask_pool",
    "cluster.things_k=4", "cluster.stuff_k=3", "cluster.niter=5", "cluster.num_shards=2",
    "run.max_error_fraction=0.9",
]


def tiny_config(run_root: str, inputs: list[str], s3=None, *extra: str) -> U2SegConfig:
    """A config whose every stage runs in seconds on 2 CPU cores (64 px, ViT-S/8 random init)."""
    overrides = [f"run.run_root={run_root}", "manifest.inputs=[" + ",".join(inputs) + "]", *TINY]
    if s3 is not None:
        overrides += s3_overrides(s3)
    return load_config(None, [*overrides, *extra])


def upload_dir(fs, local: str, bucket_prefix: str) -> list[str]:
    """Copy every file of a local folder to s3://bucket_prefix/, returning the S3 URIs."""
    uris = []
    for name in sorted(os.listdir(local)):
        path = os.path.join(local, name)
        if os.path.isfile(path):
            with open(path, "rb") as fh:
                fs.pipe_file(f"{bucket_prefix}/{name}", fh.read())
            uris.append(f"s3://{bucket_prefix}/{name}")
    return uris


EXTRACT_TABLES = ("images", "masks", "patches", "errors")


def check_extract_exactly_once(root) -> dict[str, int]:
    """Assert the exactly-once contract (docs/stages.md) on a finished extract; return the counts it saw.

    Every manifest image is in the ledger (extract/images) exactly once; error rows match the ledger's
    error rows; no (image_id, mask_id) twice; every table has the same committed part names (no orphans)
    and each masks/errors part only holds images of its own ledger part; every part parses (no partial
    object) and no temporary file is left anywhere under extract/.
    """
    import posixpath

    import pyarrow.parquet as pq

    manifest = root.read_parquet("manifest", columns=["image_id"]).column("image_id").to_pylist()
    parts = {t: root.list(f"extract/{t}", ".parquet") for t in EXTRACT_TABLES}
    for t in EXTRACT_TABLES[1:]:
        if parts[t] != parts["images"]:
            raise AssertionError(f"extract/{t} parts differ from the ledger's: "
                                 f"{sorted(set(parts[t]) ^ set(parts['images']))}")
    ledger: list[dict] = []
    masks: list[tuple[str, int]] = []
    errors: list[str] = []
    for name in parts["images"]:
        tables = {}
        for t in EXTRACT_TABLES:  # reading the footer of every part proves none is partial
            with root.fs.open(root.path(f"extract/{t}", name), "rb") as fh:
                tables[t] = pq.read_table(fh, columns=["image_id", "mask_id"] if t == "masks" else
                                          ["image_id", "status"] if t == "images" else ["image_id"])
        own = set(tables["images"].column("image_id").to_pylist())
        for t in ("masks", "patches", "errors"):
            stray = set(tables[t].column("image_id").to_pylist()) - own
            if stray:
                raise AssertionError(f"extract/{t}/{name} holds images of another group: {sorted(stray)[:3]}")
        ledger += tables["images"].to_pylist()
        masks += list(zip(tables["masks"].column("image_id").to_pylist(),
                          tables["masks"].column("mask_id").to_pylist(), strict=True))
        errors += tables["errors"].column("image_id").to_pylist()
    ids = [r["image_id"] for r in ledger]
    if len(ids) != len(set(ids)):
        raise AssertionError(f"ledger holds {len(ids) - len(set(ids))} duplicate image ids")
    if sorted(ids) != sorted(manifest):
        raise AssertionError(f"ledger ids != manifest ids: {len(set(manifest) - set(ids))} missing, "
                             f"{len(set(ids) - set(manifest))} unknown")
    if len(masks) != len(set(masks)):
        raise AssertionError(f"{len(masks) - len(set(masks))} duplicate (image_id, mask_id) in extract/masks")
    if len(errors) != len(set(errors)):
        raise AssertionError("an image has two rows in extract/errors")
    ledger_errors = {r["image_id"] for r in ledger if r["status"] == "error"}
    if set(errors) != ledger_errors:
        raise AssertionError(f"extract/errors ids != ledger error ids ({len(errors)} vs "
                             f"{len(ledger_errors)})")
    if ledger_errors & {m[0] for m in masks}:
        raise AssertionError("an image is both an error and has masks")
    temps = [p for p in root.fs.find(root.path("extract")) if posixpath.basename(p).startswith(".tmp-")]
    if temps:
        raise AssertionError(f"temporary files left in the run root: {temps[:3]}")
    if not root.exists("extract/_SUCCESS"):
        raise AssertionError("extract/_SUCCESS is missing")
    return {"images": len(ids), "errors": len(errors), "masks": len(masks), "parts": len(parts["images"])}


class Background:
    """Run a call in a thread, keeping its result or exception for the test thread."""

    def __init__(self, fn: Callable[..., Any], *args: Any):
        self.result: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, *args), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            self.result = fn(*args)
        except BaseException as exc:  # handed to the test thread
            self.error = exc

    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float) -> None:
        """Wait for the call to end (its error, if any, stays in ``self.error``)."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"the background call did not finish within {timeout}s"

    def value(self, timeout: float) -> Any:
        """Wait for the call, re-raise its error, return its result."""
        self.join(timeout)
        if self.error is not None:
            raise self.error
        return self.result


def check_run_root_consistent(root, stages=None) -> dict[str, int]:
    """The exactly-once check extended to the whole run root (after a finished pipeline up to label or beyond).

    Ledger ids == manifest ids (extract's check); every labelled image is an ok ledger image and every ok
    ledger image is labelled once; each image's thing categories come from its masks' cluster assignments;
    the label set's PNG folders are exactly its groups; the markers of ``stages`` (default: every stage with
    one; pass the stages the last run covered, as a later stage's marker may be stale and due to rerun)
    hold their upstream markers' current outputs as what they consumed.
    """
    from u2seg.io import layout
    from u2seg.io.labelset import LabelSet
    from u2seg.pipeline.markers import read_marker
    from u2seg.pipeline.stages import STAGES, stage

    counts = check_extract_exactly_once(root)
    manifest = set(root.read_parquet("manifest", columns=["image_id"]).column("image_id").to_pylist())
    ledger = root.read_parquet("extract/images", columns=["image_id", "status"]).to_pylist()
    ok = {r["image_id"] for r in ledger if r["status"] == "ok"}
    assigned: dict[str, set[int]] = {}
    for r in root.read_parquet("cluster/assignments", columns=["image_id", "cluster_id"]).to_pylist():
        assigned.setdefault(r["image_id"], set()).add(int(r["cluster_id"]) + 1)
    k_things, _ = layout.class_counts(root)
    labels = LabelSet(root, "labels")
    labelled = []
    for im in labels.iter_images():
        labelled.append(im.image_id)
        things = {s["category_id"] for s in im.segments if s["category_id"] <= k_things}
        if not things <= assigned.get(im.image_id, set()):
            raise AssertionError(f"labels of {im.uri} hold thing classes {sorted(things)} not assigned to its "
                                 f"masks {sorted(assigned.get(im.image_id, set()))}")
    if len(labelled) != len(set(labelled)):
        raise AssertionError("an image is labelled twice")
    if set(labelled) - manifest:
        raise AssertionError(f"{len(set(labelled) - manifest)} labelled image(s) are not in the manifest")
    if set(labelled) != ok:
        raise AssertionError(f"labelled images != ok ledger images ({len(labelled)} vs {len(ok)})")
    groups = set(labels.groups())
    for kind in ("panoptic", "semantic"):
        folders = set(layout.subdirs(root, f"labels/{kind}"))
        if folders and folders != groups:
            raise AssertionError(f"labels/{kind} folders {sorted(folders ^ groups)[:3]} are not the label groups")
    markers = 0
    for st in STAGES:
        marker = read_marker(root, st)
        if marker is None or (stages is not None and st.name not in stages):
            continue
        markers += 1
        for up in st.upstream:
            upstream = read_marker(root, stage(up))
            if upstream is None or marker["consumed"].get(up) != upstream["output"]:
                raise AssertionError(f"{st.name}'s marker consumed {up} {marker['consumed'].get(up)} but {up} now "
                                     f"outputs {(upstream or {}).get('output')}")
    return {**counts, "labelled": len(labelled), "markers": markers}
