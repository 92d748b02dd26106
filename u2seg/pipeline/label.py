"""The label stage: stuff maps, panoptic merge and COCO / COCO-panoptic outputs, on Ray Data.

The unit of work is one extract group (the ledger, masks and assignments parts share its name). A
worker writes each image's PNGs, then one JSON fragment for the group (its commit marker); the driver
streams the fragments into ``labels/panoptic.json`` and ``labels/instances.json`` without holding
all images' segments at once. Stuff maps come from the pooled, projected patch-feature grid extract
stored per image (``extract/images.stuff_grid``), so labelling needs no second backbone pass.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from u2seg.config import U2SegConfig
from u2seg.io import RunRoot
from u2seg.pipeline.cluster import load_npy
from u2seg.pipeline.progress import Progress

log = logging.getLogger(__name__)


def _read(root: RunRoot, rel: str, columns: list[str] | None = None):
    if not root.exists(rel):
        return None
    with root.fs.open(root.path(rel), "rb") as fh:
        return pq.read_table(fh, columns=columns)


def label_group(name: str, root: RunRoot, cfg_dict: dict[str, Any], out: str = "labels",
                masks_dir: str = "extract/masks", assign_dir: str | None = "cluster/assignments"
                ) -> dict[str, Any]:
    """Label every ok image of one group; returns counts. Writes PNGs, then ``<out>/_parts/<name>.json``."""
    from u2seg.config import config_from_dict
    from u2seg.labels import (
        decode_mask,
        instance_annotations,
        panoptic_annotation,
        panoptic_merge,
        panoptic_png_bytes,
        semantic_png_bytes,
        stuff_map,
    )
    from u2seg.labels.coco import coco_image_id

    cfg = config_from_dict(cfg_dict)
    lc = cfg.label
    things_c = load_npy(root, "cluster/things.npy")
    stuff_c = load_npy(root, "cluster/stuff.npy")
    k_things, k_stuff = len(things_c), len(stuff_c)
    images = _read(root, f"extract/images/{name}")
    masks = _read(root, f"{masks_dir}/{name}", ["image_id", "mask_id", "rle", "score"])
    by_image: dict[str, list[dict]] = {}
    if masks is not None:
        classes: dict[tuple[str, int], int] = {}
        if assign_dir is not None:
            assigned = _read(root, f"{assign_dir}/{name}", ["image_id", "mask_id", "cluster_id"])
            if assigned is None:
                raise FileNotFoundError(f"label: {assign_dir}/{name} is missing: rerun `u2seg cluster`")
            for r in assigned.to_pylist():
                classes[(r["image_id"], r["mask_id"])] = r["cluster_id"]
        for m in masks.to_pylist():
            m["cluster_id"] = classes.get((m["image_id"], m["mask_id"]), m.get("cluster_id"))
            by_image.setdefault(m["image_id"], []).append(m)
    part_images, pan_anns, inst_anns = [], [], []
    n_segments = 0
    for img in images.to_pylist():
        if img.get("status", "ok") != "ok":
            continue
        hex_id, h, w = img["image_id"], img["height"], img["width"]
        gh, gw, dim = img["grid_h"], img["grid_w"], img["stuff_dim"]
        grid = np.asarray(img["stuff_grid"], np.float32).reshape(gh * gw, dim)
        stuff = stuff_map(grid, (gh, gw), stuff_c, (h, w), smooth=lc.stuff_smooth)
        ms = sorted(by_image.get(hex_id, []), key=lambda m: m["mask_id"])
        thing_masks = [decode_mask(m["rle"]) for m in ms]
        result = panoptic_merge(thing_masks, [int(m["cluster_id"]) for m in ms], [float(m["score"]) for m in ms],
                                stuff, k_things=k_things, k_stuff=k_stuff, min_stuff_area=lc.min_stuff_area,
                                min_thing_area=lc.min_thing_area)
        png = f"{hex_id}.png"
        root.write_bytes(f"{out}/panoptic/{png}", panoptic_png_bytes(result.seg_ids))
        if lc.write_semantic:
            root.write_bytes(f"{out}/semantic/{png}",
                             semantic_png_bytes(result.semantic, num_categories=k_things + k_stuff))
        cid = coco_image_id(hex_id)
        part_images.append({"id": cid, "file_name": os.path.basename(img["uri"]), "width": w, "height": h,
                            "u2seg_image_id": hex_id, "uri": img["uri"]})
        pan_anns.append(panoptic_annotation(cid, png, result.segments_info))
        n_segments += len(result.segments_info)
        things = [s for s in result.segments_info if s["category_id"] <= k_things]
        visible = [result.seg_ids == s["id"] for s in things]
        src = [ms[result.thing_sources[s["id"]]] for s in things]
        inst_anns.extend(instance_annotations(cid, visible, [int(m["cluster_id"]) for m in src],
                                              [float(m["score"]) for m in src], start_ann_id=1))
    root.write_json(f"{out}/_parts/{name}.json",
                    {"images": part_images, "panoptic": pan_anns, "instances": inst_anns}, indent=None)
    return {"images": len(part_images), "segments": n_segments, "instances": len(inst_anns)}


def merge_label_parts(root: RunRoot, out: str, k_things: int, k_stuff: int, description: str) -> dict[str, int]:
    """Stream the group fragments into ``<out>/panoptic.json`` and ``<out>/instances.json``."""
    from u2seg.labels import merge_coco_parts, pseudo_categories

    names = root.list(f"{out}/_parts", ".json")
    cats = pseudo_categories(k_things, k_stuff)
    header = {"info": {"description": description, "date_created": time.strftime("%Y-%m-%d")},
              "licenses": [], "categories": cats}

    def parts(kind: str):
        def gen():
            for n in names:
                p = json.loads(root.read_bytes(f"{out}/_parts/{n}"))
                yield {"images": p["images"], "annotations": p[kind]}
        return gen

    with root.open_atomic(f"{out}/panoptic.json") as fh:
        pan = merge_coco_parts(parts("panoptic"), header, fh, renumber_annotations=False)
    with root.open_atomic(f"{out}/instances.json") as fh:
        inst = merge_coco_parts(parts("instances"), header, fh)
    return {"images": pan["images"], "instances": inst["annotations"], "parts": len(names)}


def run_label(cfg: U2SegConfig, root: RunRoot) -> dict[str, Any]:
    import ray

    groups = root.list("extract/images", ".parquet")
    if not groups:
        raise FileNotFoundError(f"no extract outputs in {root.uri}: run `u2seg extract` first")
    if not root.exists("cluster/things.npy"):
        raise FileNotFoundError(f"no cluster centroids in {root.uri}: run `u2seg cluster` first")
    done = {n[: -len(".json")] for n in root.list("labels/_parts", ".json")}
    todo = [g for g in groups if g not in done]
    for stale in done - set(groups):
        root.remove(f"labels/_parts/{stale}.json")
    log.info("label: %d groups, %d already labelled", len(groups), len(groups) - len(todo))
    totals = {"segments": 0, "instances": 0}
    if todo:
        cfg_dict = cfg.to_dict()
        ds = ray.data.from_items([{"name": g} for g in todo]).map_batches(
            lambda b: _label_batch(b, root, cfg_dict), batch_size=1, num_cpus=1)
        with Progress(len(todo), "label", unit="group") as bar:
            for r in ds.iter_rows():
                totals["segments"] += int(r["segments"])
                totals["instances"] += int(r["instances"])
                bar.update(1)
    k_things = len(load_npy(root, "cluster/things.npy"))
    k_stuff = len(load_npy(root, "cluster/stuff.npy"))
    merged = merge_label_parts(root, "labels", k_things, k_stuff, "u2seg pseudo-labels")
    return {**merged, "segments_now": totals["segments"], "k_things": k_things, "k_stuff": k_stuff}


def _label_batch(batch: dict[str, np.ndarray], root: RunRoot, cfg_dict: dict[str, Any]) -> dict[str, np.ndarray]:
    rows = [label_group(str(n), root, cfg_dict) for n in batch["name"]]
    return {k: np.array([r[k] for r in rows]) for k in ("images", "segments", "instances")}
