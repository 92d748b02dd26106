"""The label stage: stuff maps, panoptic merge and COCO / COCO-panoptic outputs, on Ray Data.

The unit of work is one extract group (the ledger, masks and assignments parts share its name). A
worker writes each image's PNGs, then the group's Parquet part (its commit; ``u2seg/io/labelset.py``); the
driver then streams the parts into ``labels/panoptic.json`` and ``labels/instances.json`` when the set has at
most ``label.coco_max_images`` images.
Stuff maps come from the pooled, projected patch-feature grid extract stored per image
(``extract/images.stuff_grid``), so labelling needs no second backbone pass.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from u2seg.config import LabelConfig, U2SegConfig
from u2seg.io import RunRoot, layout
from u2seg.io.labelset import Fragment, LabelSet
from u2seg.pipeline.progress import Progress

log = logging.getLogger(__name__)


def label_group(name: str, root: RunRoot, label_cfg: LabelConfig, inputs: str) -> dict[str, Any]:
    """Label every ok image of extract group ``name`` (a ledger part); write its PNGs, then its part
    (recording ``inputs``, the centroids' digest). Returns counts."""
    from u2seg.labels import decode_mask, panoptic_merge

    k_things, k_stuff = layout.class_counts(root)
    labels = LabelSet(root, layout.LABELS, k_things, k_stuff)
    stuff_centroids = layout.load_npy(root, layout.STUFF_CENTROIDS) if root.exists(layout.STUFF_CENTROIDS) else None
    images = layout.read_part(root, layout.part(layout.LEDGER, name))
    masks = layout.read_part(root, layout.part(layout.MASKS, name), ["image_id", "mask_id", "rle", "score"])
    by_image: dict[str, list[dict]] = {}
    if masks is not None:
        assigned = layout.read_part(root, layout.part(layout.ASSIGNMENTS, name),
                                    ["image_id", "mask_id", "cluster_id"])
        if assigned is None:
            raise FileNotFoundError(f"label: {layout.part(layout.ASSIGNMENTS, name)} is missing: rerun "
                                    "`u2seg cluster`")
        classes = {(r["image_id"], r["mask_id"]): r["cluster_id"] for r in assigned.to_pylist()}
        for m in masks.to_pylist():
            m["cluster_id"] = classes[(m["image_id"], m["mask_id"])]
            by_image.setdefault(m["image_id"], []).append(m)
    group = layout.group_stem(name)
    fragment = Fragment()
    n_segments = 0
    for img in images.to_pylist():
        if img["status"] != "ok":
            continue
        image_id = img["image_id"]
        stuff = image_stuff_map(img, stuff_centroids, label_cfg.stuff_smooth)
        ms = sorted(by_image.get(image_id, []), key=lambda m: m["mask_id"])
        result = panoptic_merge([decode_mask(m["rle"]) for m in ms], [int(m["cluster_id"]) for m in ms],
                                [float(m["score"]) for m in ms], stuff, k_things=k_things,
                                k_stuff=labels.k_stuff, min_stuff_area=label_cfg.min_stuff_area,
                                min_thing_area=label_cfg.min_thing_area, thing_order=label_cfg.thing_order,
                                stuff_overlap_drop=label_cfg.stuff_overlap_drop)
        things = [s for s in result.segments_info if s["category_id"] <= k_things]
        fragment.add(labels.write_image(
            group, image_id, img["uri"], result.seg_ids, result.segments_info, semantic=result.semantic,
            thing_scores=[float(ms[result.thing_sources[s["id"]]]["score"]) for s in things],
            write_semantic=label_cfg.write_semantic))
        n_segments += len(result.segments_info)
    labels.commit(group, fragment, inputs)
    return {"images": fragment.n_images, "segments": n_segments, "instances": fragment.n_instances}


def image_stuff_map(img: dict[str, Any], stuff_centroids: np.ndarray | None, smooth: int) -> np.ndarray:
    """One image's stuff class per pixel: the STEGO head's class per patch, nearest-upsampled to the image and
    majority-smoothed; or (k-means baseline) the nearest stuff centroid of its pooled features."""
    from u2seg.labels import mode_filter, stuff_map, upsample_nearest

    h, w, gh, gw = img["height"], img["width"], img["grid_h"], img["grid_w"]
    classes = img.get("stuff_classes")
    if classes is not None and len(classes):
        classes = np.asarray(classes, np.int32).reshape(gh, gw)
        return mode_filter(upsample_nearest(classes, (h, w)), smooth)
    if stuff_centroids is None:
        raise FileNotFoundError(f"label: {img['uri']} has pooled stuff features but cluster/stuff.npy is missing")
    grid = np.asarray(img["stuff_grid"], np.float32).reshape(gh * gw, img["stuff_dim"])
    return stuff_map(grid, (gh, gw), stuff_centroids, (h, w), smooth=smooth)


def run_label(cfg: U2SegConfig, root: RunRoot) -> dict[str, Any]:
    import ray

    parts = root.list(layout.LEDGER, ".parquet")
    if not parts:
        raise FileNotFoundError(f"no extract outputs in {root.uri}: run `u2seg extract` first")
    k_things, k_stuff = layout.class_counts(root)
    labels = LabelSet(root, layout.LABELS, k_things, k_stuff)
    inputs = layout.classes_digest(root)
    if labels.is_legacy():
        log.info("label: %s holds an older u2seg's label format: relabelling every group", root.join(layout.LABELS))
        labels.clear()
    # a group stays labelled while its extract group exists and the centroids are the ones it was made with
    current = {layout.group_stem(p): p for p in parts}
    valid = {g for g, made_from in labels.group_inputs().items() if g in current and made_from == inputs}
    stale = sorted(set(labels.groups()) - valid)
    labels.remove_groups(stale)
    todo = [p for g, p in sorted(current.items()) if g not in valid]
    log.info("label: %d groups, %d still valid, %d to label, %d stale removed", len(parts), len(valid), len(todo),
             len(stale))
    totals = {"segments": 0, "instances": 0}
    if todo:
        label_cfg = cfg.label
        ds = ray.data.from_items([{"name": p} for p in todo]).map_batches(
            lambda b: _label_batch(b, root, label_cfg, inputs), batch_size=1, num_cpus=1)
        with Progress(len(todo), "label", unit="group", root=root, stage="label",
                      every_s=cfg.run.progress_every_s) as bar:
            for r in ds.iter_rows():
                totals["segments"] += int(r["segments"])
                totals["instances"] += int(r["instances"])
                bar.update(1)
    merged = labels.finish("u2seg pseudo-labels", cfg.label.coco_max_images)
    return {**merged, "segments_now": totals["segments"], "groups_labelled": len(todo), "groups_removed": len(stale),
            "k_things": k_things, "k_stuff": k_stuff}


def _label_batch(batch: dict[str, np.ndarray], root: RunRoot, label_cfg: LabelConfig,
                 inputs: str) -> dict[str, np.ndarray]:
    rows = [label_group(str(n), root, label_cfg, inputs) for n in batch["name"]]
    return {k: np.array([r[k] for r in rows]) for k in ("images", "segments", "instances")}
