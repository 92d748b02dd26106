"""Batch inference of a trained round with Ray Data actors, written in the label format.

``predict/round-R/`` gets the same layout as ``labels/`` (panoptic PNGs + JSON, instances JSON,
semantic PNGs, ``_parts`` fragments), so evaluate and self-training read predictions and labels alike.
Each batch is committed under a name derived from its image ids; its fragment is written last.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

import numpy as np

from u2seg.config import U2SegConfig
from u2seg.io import RunRoot
from u2seg.pipeline.progress import Progress

log = logging.getLogger(__name__)


def semantic_from_panoptic(seg_ids: np.ndarray, segments_info: list[dict[str, Any]]) -> np.ndarray:
    """Category id per pixel (0 = void) from a panoptic segment map."""
    lut = np.zeros(int(seg_ids.max()) + 1 if seg_ids.size else 1, np.int32)
    for s in segments_info:
        lut[int(s["id"])] = int(s["category_id"])
    return lut[seg_ids]


def write_image_labels(root: RunRoot, out: str, hex_id: str, uri: str, seg_ids: np.ndarray,
                       segments_info: list[dict[str, Any]], k_things: int, k_stuff: int,
                       scores: dict[int, float]) -> tuple[dict, dict, list[dict]]:
    """PNGs of one image plus its (image entry, panoptic annotation, instance annotations)."""
    from u2seg.labels import instance_annotations, panoptic_annotation, panoptic_png_bytes, semantic_png_bytes
    from u2seg.labels.coco import coco_image_id

    png = f"{hex_id}.png"
    root.write_bytes(f"{out}/panoptic/{png}", panoptic_png_bytes(seg_ids))
    root.write_bytes(f"{out}/semantic/{png}", semantic_png_bytes(semantic_from_panoptic(seg_ids, segments_info),
                                                                 num_categories=k_things + k_stuff))
    cid = coco_image_id(hex_id)
    h, w = seg_ids.shape
    clean = [{k: s[k] for k in ("id", "category_id", "area", "bbox", "iscrowd") if k in s} | (
        {"score": float(scores[int(s["id"])])} if int(s["id"]) in scores else {}) for s in segments_info]
    image = {"id": cid, "file_name": os.path.basename(uri), "width": w, "height": h, "u2seg_image_id": hex_id,
             "uri": uri}
    things = [s for s in clean if s["category_id"] <= k_things]
    inst = instance_annotations(cid, [seg_ids == s["id"] for s in things], [s["category_id"] - 1 for s in things],
                                [s.get("score", 1.0) for s in things], start_ann_id=1)
    return image, panoptic_annotation(cid, png, clean), inst


class PredictActor:
    """Holds one trained model; predicts a batch of images and commits it."""

    def __init__(self, root: RunRoot, model_rel: str, out: str, storage_options: dict[str, Any]):
        import torch

        from u2seg.model import model_from_bytes

        self.root, self.out, self.storage_options = root, out, storage_options
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, _ = model_from_bytes(root.read_bytes(model_rel), map_location=device)
        self.k_things = self.model.cfg.num_thing_classes
        self.k_stuff = self.model.cfg.num_stuff_classes

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from u2seg.io.images import decode_image
        from u2seg.io.runroot import filesystem_for, split_protocol
        from u2seg.model import predict

        ids = [str(x) for x in batch["image_id"]]
        uris = [str(x) for x in batch["uri"]]
        images = [decode_image(filesystem_for(u, self.storage_options).cat_file(split_protocol(u)[1])) for u in uris]
        with torch.no_grad():
            preds = predict(self.model, images, batch_size=len(images))
        part: dict[str, list] = {"images": [], "panoptic": [], "instances": []}
        for hex_id, uri, p in zip(ids, uris, preds, strict=True):
            scores = {int(s["id"]): float(s["score"]) for s in p.segments_info if "score" in s}
            img, pan, inst = write_image_labels(self.root, self.out, hex_id, uri, p.panoptic, p.segments_info,
                                                self.k_things, self.k_stuff, scores)
            part["images"].append(img)
            part["panoptic"].append(pan)
            part["instances"].extend(inst)
        name = hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()[:20]
        self.root.write_json(f"{self.out}/_parts/{name}.json", part, indent=None)
        return {"images": np.array([len(ids)]), "instances": np.array([len(part["instances"])])}


def run_predict(cfg: U2SegConfig, root: RunRoot, round_idx: int | None = None) -> dict[str, Any]:
    """Predict every extracted image with ``train/round-R`` (default: the latest finished round)."""
    import ray

    from u2seg.pipeline.cluster import load_npy
    from u2seg.pipeline.label import merge_label_parts
    from u2seg.pipeline.train import final_model_rel, latest_round

    r = latest_round(root) if round_idx is None else round_idx
    if r < 0 or not root.exists(final_model_rel(r)):
        raise FileNotFoundError(f"no trained model in {root.join('train')}: run `u2seg train` first")
    out = f"predict/round-{r}"
    root.remove(out, recursive=True)  # predictions are recomputed whole: no stale parts
    ledger = root.read_parquet("extract/images", columns=["image_id", "uri", "status"]).to_pylist()
    rows = [{"image_id": x["image_id"], "uri": x["uri"]} for x in ledger if x["status"] == "ok"]
    storage = cfg.run.storage.storage_options()
    ds = ray.data.from_items(rows).map_batches(
        PredictActor, batch_size=max(1, cfg.train.batch_size), compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=1, num_gpus=1 if ray.cluster_resources().get("GPU", 0) else 0,
        fn_constructor_kwargs={"root": root, "model_rel": final_model_rel(r), "out": out,
                               "storage_options": storage})
    n = 0
    with Progress(len(rows), f"predict round {r}", unit="img") as bar:
        for row in ds.iter_rows():
            n += int(row["images"])
            bar.update(int(row["images"]))
    merged = merge_label_parts(root, out, len(load_npy(root, "cluster/things.npy")),
                               len(load_npy(root, "cluster/stuff.npy")), f"u2seg predictions of round {r}")
    return {"round": r, "images": n, "instances": merged["instances"], "out": root.join(out)}
