"""Batch inference of a trained round with Ray Data actors, written in the label-set format.

The predict stage writes the final model's predictions to ``predict/``; self-training writes each
round's predictions on the training images to ``selftrain/round-R/predictions``. Both are label sets
(``u2seg/io/labelset.py``), so evaluation and self-training read predictions and labels alike. Each
batch is committed as one group (its fragment written after its PNGs).

What a prediction label set holds beyond the panoptic PNG (the merged, visible segments):

- ``instances``: the model's detections with their *full* masks (overlapping, as the mask head predicts them)
  and scores, each detection scoring at least ``min_instance_score`` -- what COCO's instance AP scores and
  what CutLER's self-training reads (it replaces pseudo masks by predicted ones). The predict stage keeps
  every detection (``ModelConfig.box_score_thresh`` and ``detections_per_img`` bound them); self-training's
  predictions keep those at ``train.score_threshold`` and above, the only ones it uses.
- the semantic PNG: the semantic head's own argmax (stuff category ids, 0 where the head says "thing"),
  not the panoptic's category map, so self-training can take its stuff from the model
  (``train.selftrain_stuff=model``).
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


def write_prediction(labels: LabelSet, group: str, image_id: str, uri: str, p: Any, min_instance_score: float
                     ) -> tuple[dict, dict, list[dict]]:
    """Write one image's prediction (a ``u2seg.model.Prediction``) into ``labels``: its panoptic PNG, the semantic
    head's PNG, and (returned) its COCO image, panoptic annotation and the instances scoring at least
    ``min_instance_score`` with their full masks, for the group's fragment."""
    from u2seg.labels import instance_annotations

    scores = {int(s["id"]): float(s["score"]) for s in p.segments_info if "score" in s}
    semantic = np.where(p.semantic >= 0, p.semantic + labels.k_things + 1, 0).astype(np.int32)
    image, panoptic, _ = labels.write_image(group, image_id, uri, p.panoptic, p.segments_info, scores=scores,
                                            semantic=semantic)
    keep = np.flatnonzero(np.asarray(p.scores, np.float64) >= min_instance_score)  # as the JSON floats compare
    instances = instance_annotations(image["id"], list(p.masks[keep]), np.asarray(p.classes)[keep].tolist(),
                                     np.asarray(p.scores)[keep].tolist(), start_ann_id=1)
    return image, panoptic, instances


class PredictActor:
    """Holds one trained model; predicts a batch of images and commits it as one group."""

    def __init__(self, root: RunRoot, model_rel: str, out: str, storage_options: dict[str, Any], retry_s: float,
                 min_instance_score: float = 0.0):
        import torch

        from u2seg.model import model_from_bytes

        self.storage_options, self.retry_s, self.min_score = storage_options, retry_s, float(min_instance_score)
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
            fragment.add(*write_prediction(self.labels, group, image_id, uri, p, self.min_score))
        self.labels.commit(group, fragment)
        return {"images": np.array([len(ids)]), "instances": np.array([len(fragment.instances)])}


def predict_images(cfg: U2SegConfig, root: RunRoot, round_idx: int, out: str, *,
                   min_instance_score: float = 0.0) -> dict[str, Any]:
    """Predict every ok image of the extract ledger with round ``round_idx``'s model into label set ``out``;
    its instances are the detections scoring at least ``min_instance_score``, with full masks."""
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
                               "retry_s": cfg.run.storage.retry_s, "min_instance_score": min_instance_score})
    n = 0
    with Progress(len(rows), f"predict round {round_idx}", unit="img") as bar:
        for row in ds.iter_rows():
            n += int(row["images"])
            bar.update(int(row["images"]))
    merged = labels.merge(f"u2seg predictions of round {round_idx}")
    return {"round": round_idx, "images": n, "instances": merged["instances"], "out": root.join(out)}


def run_predict(cfg: U2SegConfig, root: RunRoot) -> dict[str, Any]:
    """The predict stage: the latest finished round's predictions into ``predict/``."""
    r = layout.latest_round(root)
    if r < 0:
        raise FileNotFoundError(f"no trained model in {root.join(layout.TRAIN)}: run `u2seg train` first")
    return predict_images(cfg, root, r, layout.PREDICT)
