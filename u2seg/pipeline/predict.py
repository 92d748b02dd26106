"""Batch inference of a trained round with Ray Data actors, written in the label-set format.

The predict stage writes the final model's predictions to ``predict/``; self-training writes each
round's predictions on the training images to ``selftrain/round-R/predictions``. Both are label sets
(``u2seg/io/labelset.py``), so evaluation and self-training read predictions and labels alike. Each
batch is committed as one group (its Parquet part written after its PNGs).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from u2seg.config import U2SegConfig
from u2seg.io import RunRoot, layout
from u2seg.io.labelset import Fragment, LabelSet
from u2seg.pipeline.progress import Progress

log = logging.getLogger(__name__)


class PredictActor:
    """Holds one trained model; predicts a batch of images and commits it as one group."""

    def __init__(self, root: RunRoot, model_rel: str, out: str, storage_options: dict[str, Any], retry_s: float):
        import torch

        from u2seg.model import model_from_bytes

        self.storage_options, self.retry_s = storage_options, retry_s
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, _ = model_from_bytes(root.read_bytes(model_rel), map_location=device)
        self.labels = LabelSet(root, out, self.model.cfg.num_thing_classes, self.model.cfg.num_stuff_classes)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from u2seg.io.inputs import read_image
        from u2seg.model import predict

        ids = [str(x) for x in batch["image_id"]]
        uris = [str(x) for x in batch["uri"]]
        images = [read_image(u, self.storage_options, self.retry_s) for u in uris]
        with torch.no_grad():
            preds = predict(self.model, images, batch_size=len(images))
        group = layout.group_stem(layout.group_name(ids))
        fragment = Fragment()
        for image_id, uri, p in zip(ids, uris, preds, strict=True):
            scores = {int(s["id"]): float(s["score"]) for s in p.segments_info if "score" in s}
            fragment.add(self.labels.write_image(group, image_id, uri, p.panoptic, p.segments_info, scores=scores))
        self.labels.commit(group, fragment)
        return {"images": np.array([len(ids)]), "instances": np.array([fragment.n_instances])}


def predict_images(cfg: U2SegConfig, root: RunRoot, round_idx: int, out: str) -> dict[str, Any]:
    """Predict every ok image of the extract ledger with round ``round_idx``'s model into label set ``out``."""
    import ray

    model_rel = layout.round_model(round_idx)
    if not root.exists(model_rel):
        raise FileNotFoundError(f"no trained model {root.join(model_rel)}: run `u2seg train` first")
    k_things, k_stuff = layout.class_counts(root)
    labels = LabelSet(root, out, k_things, k_stuff)
    labels.clear()  # predictions are recomputed whole: no stale groups
    ledger = root.read_parquet(layout.LEDGER, columns=["image_id", "uri", "status"]).to_pylist()
    rows = [{"image_id": x["image_id"], "uri": x["uri"]} for x in ledger if x["status"] == "ok"]
    ds = ray.data.from_items(rows).map_batches(
        PredictActor, batch_size=max(1, cfg.train.batch_size), compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=1, num_gpus=1 if ray.cluster_resources().get("GPU", 0) else 0,
        fn_constructor_kwargs={"root": root, "model_rel": model_rel, "out": out,
                               "storage_options": cfg.run.storage.storage_options(),
                               "retry_s": cfg.run.storage.retry_s})
    n = 0
    with Progress(len(rows), f"predict round {round_idx}", unit="img") as bar:
        for row in ds.iter_rows():
            n += int(row["images"])
            bar.update(int(row["images"]))
    merged = labels.finish(f"u2seg predictions of round {round_idx}", cfg.label.coco_max_images)
    return {"round": round_idx, "images": n, "instances": merged["instances"], "coco_files": merged["coco_files"],
            "out": root.join(out)}


def run_predict(cfg: U2SegConfig, root: RunRoot) -> dict[str, Any]:
    """The predict stage: the latest finished round's predictions into ``predict/``."""
    r = layout.latest_round(root)
    if r < 0:
        raise FileNotFoundError(f"no trained model in {root.join(layout.TRAIN)}: run `u2seg train` first")
    return predict_images(cfg, root, r, layout.PREDICT)
