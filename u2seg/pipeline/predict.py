"""Batch inference of a trained round with a Ray Data actor pool, at extract's standard.

The predict stage writes the final model's predictions to ``predict/``: on the held-out images of
``evaluate.images`` (listed into ``predict/inputs/`` like a manifest) when set, else on the extract ledger's
ok images. Self-training writes each round's predictions on the training images to
``selftrain/round-R/predictions``. Both are label sets (``u2seg/io/labelset.py``).

Exactly once: each actor call predicts one group of ``predict.rows_per_part`` images, writes their PNGs,
commits the group's label part, and writes the group's ledger part (``<out>/ledger/``: one row per
image, ok or error) last. An image is done iff it is in the ledger; a rerun or a resumed kill predicts
exactly the images not in it (filtered in Arrow, no per-image state on the driver), and label parts of
groups whose ledger part was never written are removed first. A failing model call is split down to
single images (``batch_retry``): only an image failing alone with its own error is an error row.

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
import pyarrow as pa
import pyarrow.compute as pc

from u2seg.config import U2SegConfig
from u2seg.io import RunRoot, layout
from u2seg.io.labelset import Fragment, LabelSet
from u2seg.io.schemas import PREDICT_LEDGER_SCHEMA
from u2seg.pipeline.progress import Progress

log = logging.getLogger(__name__)


def write_prediction(labels: LabelSet, group: str, image_id: str, uri: str, p: Any,
                     min_instance_score: float) -> dict[str, Any]:
    """Write one image's prediction (a ``u2seg.model.Prediction``) into ``labels``: its panoptic PNG, the semantic
    head's PNG, and (returned) its row for the group's part, whose instances are the detections scoring at least
    ``min_instance_score`` with their full masks."""
    from u2seg.labels import instance_annotations
    from u2seg.labels.coco import coco_image_id

    scores = {int(s["id"]): float(s["score"]) for s in p.segments_info if "score" in s}
    semantic = np.where(p.semantic >= 0, p.semantic + labels.k_things + 1, 0).astype(np.int32)
    keep = np.flatnonzero(np.asarray(p.scores, np.float64) >= min_instance_score)  # as the JSON floats compare
    instances = instance_annotations(coco_image_id(image_id), list(p.masks[keep]),
                                     np.asarray(p.classes)[keep].tolist(), np.asarray(p.scores)[keep].tolist(),
                                     start_ann_id=1)
    return labels.write_image(group, image_id, uri, p.panoptic, p.segments_info, scores=scores, semantic=semantic,
                              instances=instances)


class PredictActor:
    """Holds one trained model; predicts, writes and commits one group of images per call."""

    def __init__(self, root: RunRoot, model_rel: str, out: str, cfg_dict: dict[str, Any],
                 min_instance_score: float = 0.0):
        import torch

        from u2seg.config import config_from_dict
        from u2seg.model import model_from_bytes

        self.root, self.out, self.min_score = root, out, float(min_instance_score)
        self.cfg = config_from_dict(cfg_dict)
        device = "cuda" if torch.cuda.is_available() and self.cfg.run.device != "cpu" else "cpu"
        self.model, _ = model_from_bytes(root.read_bytes(model_rel), map_location=device)
        self.model.cfg.panoptic_score_thresh = self.cfg.predict.panoptic_score_threshold  # not the checkpoint's
        self.labels = LabelSet(root, out, self.model.cfg.num_thing_classes, self.model.cfg.num_stuff_classes)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from u2seg.io.inputs import InputUnreachableError, read_image
        from u2seg.model import predict
        from u2seg.pipeline.batch_retry import ItemFailure, call_per_item

        storage = self.cfg.run.storage
        ids = [str(x) for x in batch["image_id"]]
        uris = [str(x) for x in batch["uri"]]
        rows: dict[str, dict[str, str]] = {}
        images: dict[str, np.ndarray] = {}
        for image_id, uri in zip(ids, uris, strict=True):
            try:
                images[image_id] = read_image(uri, storage.storage_options(), storage.retry_s)
            except InputUnreachableError:
                raise
            except Exception as exc:  # this image's own fault: an error row
                rows[image_id] = _error_row(image_id, uri, type(exc).__name__ + (
                    f":{exc.reason}" if getattr(exc, "reason", None) else ""), str(exc))

        def model_call(imgs: list[np.ndarray]) -> list[Any]:
            with torch.no_grad():
                return predict(self.model, imgs, batch_size=len(imgs))

        ok_ids = [i for i in ids if i in images]
        step = max(1, self.cfg.predict.batch_size)
        preds: list[Any] = []
        for start in range(0, len(ok_ids), step):  # one model call per batch; a failing one is split
            preds += call_per_item(model_call, [images[i] for i in ok_ids[start:start + step]], what="predict")
        group = layout.group_stem(layout.group_name(ids))
        fragment = Fragment()
        uri_of = dict(zip(ids, uris, strict=True))
        for image_id, p in zip(ok_ids, preds, strict=True):
            if isinstance(p, ItemFailure):
                rows[image_id] = _error_row(image_id, uri_of[image_id], p.error_class, f"model failure: {p.error}")
                continue
            fragment.add(write_prediction(self.labels, group, image_id, uri_of[image_id], p, self.min_score))
            rows[image_id] = {"image_id": image_id, "uri": uri_of[image_id], "status": "ok", "group": group,
                              "error_class": "", "message": ""}
        self.labels.commit(group, fragment)
        ledger = pa.Table.from_pylist([{**rows[i], "group": group} for i in ids], schema=PREDICT_LEDGER_SCHEMA)
        self.root.write_parquet(layout.part(f"{self.out}/ledger", f"{group}.parquet"), ledger)  # last: the commit
        n_errors = sum(r["status"] == "error" for r in rows.values())
        return {"images": np.array([len(ids)]), "errors": np.array([n_errors]),
                "instances": np.array([fragment.n_instances])}


def _error_row(image_id: str, uri: str, error_class: str, message: str) -> dict[str, str]:
    log.warning("predict: %s failed: %s: %s", uri, error_class, message[:300])
    return {"image_id": image_id, "uri": uri, "status": "error", "group": "", "error_class": error_class,
            "message": message[:2000]}


def _ledger_ids(root: RunRoot, out: str) -> pa.Array:
    ids = root.read_parquet(f"{out}/ledger", columns=["image_id"], schema=PREDICT_LEDGER_SCHEMA)
    return ids.column("image_id").combine_chunks() if ids.num_rows else pa.array([], pa.string())


def _remove_uncommitted(root: RunRoot, labels: LabelSet, out: str) -> int:
    """Label groups whose ledger part was never written belong to a killed call: removed before resuming."""
    committed = {n[: -len(".parquet")] for n in root.list(f"{out}/ledger", ".parquet")}
    orphans = sorted(set(labels.groups()) - committed)
    labels.remove_groups(orphans)
    return len(orphans)


def _select_todo(batch: pa.Table, done: pa.Array, ok_only: bool) -> pa.Table:
    if ok_only:
        batch = batch.filter(pc.equal(batch["status"], "ok"))
    if len(done):
        batch = batch.filter(pc.invert(pc.is_in(batch["image_id"], value_set=done)))
    return batch.select(["image_id", "uri"])


def predict_images(cfg: U2SegConfig, root: RunRoot, round_idx: int, out: str, inputs: str,
                   stage: str = "predict", *, min_instance_score: float = 0.0, model_rel: str | None = None,
                   classes: tuple[int, int] | None = None) -> dict[str, Any]:
    """Predict with round ``round_idx``'s model (or the model at ``model_rel``, with ``classes`` = (things,
    stuff) of its label set, default the clustered run's) every image listed in ``inputs`` (a run-root folder
    of manifest-like parts, or the extract ledger, whose ok images are taken) not yet in ``<out>/ledger``; its
    progress goes to ``stage``'s ``_PROGRESS.json`` (self-training predicts inside the train stage); its
    instances are the detections scoring at least ``min_instance_score``, with full masks."""
    import ray

    what = f"round {round_idx}" if model_rel is None else model_rel
    model_rel = model_rel or layout.round_model(round_idx)
    if not root.exists(model_rel):
        raise FileNotFoundError(f"no trained model {root.join(model_rel)}: run `u2seg train` first")
    k_things, k_stuff = classes or layout.class_counts(root)
    labels = LabelSet(root, out, k_things, k_stuff)
    orphans = _remove_uncommitted(root, labels, out)
    done = _ledger_ids(root, out)
    total = layout.count_rows(root, inputs)
    from_ledger = inputs == layout.LEDGER
    pc_cfg = cfg.predict
    gpus = pc_cfg.gpus_per_actor or (1.0 if cfg.run.device != "cpu" and ray.cluster_resources().get("GPU", 0) else 0)
    log.info("predict %s into %s: %d listed, %d already done, %d orphan group(s) removed", what, out,
             total, len(done), orphans)
    sums = {"images": 0, "errors": 0, "instances": 0}
    paths = root.parquet_paths(inputs)
    if paths:
        columns = ["image_id", "uri", "status"] if from_ledger else ["image_id", "uri"]
        ds = ray.data.read_parquet(paths, filesystem=root.pyarrow_fs()).select_columns(columns)
        ds = ds.map_batches(_select_todo, batch_format="pyarrow", fn_kwargs={"done": done, "ok_only": from_ledger})
        ds = ds.repartition(target_num_rows_per_block=pc_cfg.rows_per_part)
        pool = ray.data.ActorPoolStrategy(min_size=min(pc_cfg.min_actors, pc_cfg.num_actors),
                                          max_size=pc_cfg.num_actors)
        ds = ds.map_batches(PredictActor, batch_size=pc_cfg.rows_per_part, compute=pool, num_gpus=gpus,
                            num_cpus=pc_cfg.cpus_per_actor,
                            fn_constructor_kwargs={"root": root, "model_rel": model_rel, "out": out,
                                                   "cfg_dict": cfg.to_dict(),
                                                   "min_instance_score": min_instance_score})
        with Progress(max(0, total - len(done)), f"predict {what}", unit="img", root=root, stage=stage,
                      every_s=cfg.run.progress_every_s) as bar:
            for row in ds.iter_rows():
                for k in sums:
                    sums[k] += int(row[k])
                bar.update(int(row["images"]), errors={"model or decode": int(row["errors"])}
                           if int(row["errors"]) else None)
    counts = labels.finish(f"u2seg predictions of {what}", cfg.label.coco_max_images)
    errors = root.read_parquet(f"{out}/ledger", columns=["status"], schema=PREDICT_LEDGER_SCHEMA)
    n_errors = int(pc.sum(pc.equal(errors.column("status"), "error")).as_py() or 0) if errors.num_rows else 0
    if errors.num_rows and n_errors / errors.num_rows > cfg.run.max_error_fraction:
        raise RuntimeError(f"predict: {n_errors}/{errors.num_rows} images failed, above run.max_error_fraction="
                           f"{cfg.run.max_error_fraction}; see {root.join(out, 'ledger')}")
    return {"round": round_idx, "images": counts["images"], "predicted_now": sums["images"], "errors": n_errors,
            "instances": counts["instances"], "coco_files": counts["coco_files"], "orphans_removed": orphans,
            "out": root.join(out)}


def run_predict(cfg: U2SegConfig, root: RunRoot) -> dict[str, Any]:
    """The predict stage: the latest finished round's predictions into ``predict/``, on the held-out images
    (``evaluate.images``, listed into ``predict/inputs/``) or, when none are set, on the training images."""
    r = layout.latest_round(root)
    if r < 0:
        raise FileNotFoundError(f"no trained model in {root.join(layout.TRAIN)}: run `u2seg train` first")
    inputs = layout.LEDGER
    if cfg.evaluate.images:
        inputs = layout.PREDICT_INPUTS
        list_held_out(cfg, root, layout.PREDICT, inputs)
    stats = predict_images(cfg, root, r, layout.PREDICT, inputs)
    return {**stats, "held_out": bool(cfg.evaluate.images)}


def list_held_out(cfg: U2SegConfig, root: RunRoot, out: str, inputs: str) -> dict[str, Any]:
    """List ``evaluate.images`` into ``inputs`` (manifest-like parts) for predictions into ``out``; when the
    listing changed since ``out``'s last predictions, those are removed so the new images are predicted anew."""
    from u2seg.pipeline.manifest import list_images

    listed = list_images(cfg, root, cfg.evaluate.images, inputs, "evaluate.images")
    seen = layout.marker(out, "inputs.json")
    if root.exists(seen) and root.read_json(seen).get("fingerprint") != listed["output_fingerprint"]:
        log.info("predict: the held-out images changed since the last predictions: predicting them anew")
        LabelSet(root, out).clear()
        root.remove(f"{out}/ledger", recursive=True)
    root.write_json(seen, {"fingerprint": listed["output_fingerprint"], "images": listed["images"]})
    log.info("predict: %d held-out images listed from %s", listed["images"], cfg.evaluate.images)
    return listed
