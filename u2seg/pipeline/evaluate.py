"""Evaluate stage: score the pseudo-labels (or the model's predictions) against a labeled set.

Pseudo category ids mean nothing to a benchmark, so the stage works in two streaming passes over the
images both sets share (joined by file-name stem):
1. pixel overlap of pseudo x gt categories, one image at a time, into a sparse accumulator; from it
   the pseudo -> gt mapping (Hungarian one-to-one or majority many-to-one), saved to mapping.json;
2. PQ/SQ/RQ with that mapping (`panoptic_quality` re-reads the PNGs image by image).
Semantic mIoU / pixel accuracy come from the pass-1 confusion, instance AP (when gt instances are
configured) from the COCO instances files. Results go to eval/labels/ (pseudo-labels) or eval/model/
(the trained model's predictions): metrics.json, mapping.json and report.html, written only once all
of them are computed.

Things are matched only to gt thing classes and stuff only to gt stuff classes: a pseudo thing mapped
to a stuff class could not be scored as an instance (COCO AP has no stuff classes), and the things /
stuff split of PQ stays meaningful. No Ray: pass 1 is IO-bound PNG reads, done in threads; pass 2 runs in
`panoptic_quality`'s spawned worker processes (so scripts calling this need an ``if __name__ == "__main__"``
guard, as any spawn-based multiprocessing does).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import cv2
import fsspec
import numpy as np

from u2seg.config import ConfigError, EvaluateConfig, U2SegConfig
from u2seg.evaluate.instance import instance_metrics
from u2seg.evaluate.loading import Join, Pair, PanopticDir, join_by_stem, stem_index
from u2seg.evaluate.matching import (
    OverlapAccumulator,
    compute_mapping,
    mapping_record,
    matched_pixel_fraction,
    panoptic_category_map,
)
from u2seg.evaluate.pq import panoptic_quality
from u2seg.evaluate.report import write_report
from u2seg.evaluate.semantic import semantic_metrics
from u2seg.evaluate.summary import flat_stats, format_table
from u2seg.io import RunRoot, layout, split_protocol
from u2seg.io.inputs import read_image, read_json_input
from u2seg.io.labelset import LabelSet
from u2seg.pipeline.progress import Progress

log = logging.getLogger(__name__)

IO_THREADS = 8  # concurrent PNG reads in pass 1 (object-store latency, not CPU, is the limit)
SAMPLE_WIDTH = 320  # report tiles are downsized to this width when collected (bounds their memory)


def run_evaluate_labels(cfg: U2SegConfig, root: RunRoot) -> dict[str, Any]:
    """The pseudo-labels (``labels/``) scored into ``eval/labels/``."""
    gt_locations(cfg.evaluate, cfg.run.storage.storage_options())  # a config error before anything else
    return evaluate_label_set(cfg, root, _merged_set(root, layout.LABELS, "run `u2seg label` first"),
                              layout.EVAL_LABELS)


def run_evaluate_model(cfg: U2SegConfig, root: RunRoot) -> dict[str, Any]:
    """The trained model's predictions (``predict/``) scored into ``eval/model/``."""
    gt_locations(cfg.evaluate, cfg.run.storage.storage_options())
    return evaluate_label_set(cfg, root, _merged_set(root, layout.PREDICT, "run `u2seg predict` first"),
                              layout.EVAL_MODEL)


def _merged_set(root: RunRoot, prefix: str, hint: str) -> LabelSet:
    labels = LabelSet(root, prefix)  # read only: categories come with its panoptic.json
    if not labels.has_merged():
        raise FileNotFoundError(f"{root.join(labels.rel('panoptic.json'))} is missing: {hint}")
    return labels


def evaluate_label_set(cfg: U2SegConfig, root: RunRoot, labels: LabelSet, out: str) -> dict[str, Any]:
    """Score ``labels`` against the configured labeled set; write metrics, mapping and report to ``out``.

    Nothing is written until every number is computed, so a failed evaluation leaves the previous
    results of ``out`` as they were.
    """
    evaluate_cfg = cfg.evaluate
    storage = cfg.run.storage.storage_options()
    retry_s = cfg.run.storage.retry_s
    gt_json_uri, gt_dir_uri = gt_locations(evaluate_cfg, storage)
    gt = read_json_input(gt_json_uri, storage, retry_s)
    pred = labels.read_merged()
    predictions_uri = root.join(labels.prefix)
    join = join_by_stem(gt, pred)
    counts = join.counts()
    log.info("evaluate: %s vs %s: %d images joined by file-name stem (%d gt without prediction, "
             "%d predictions without gt)", predictions_uri, gt_json_uri, counts["evaluated"],
             counts["gt_without_prediction"], counts["predictions_without_gt"])
    if not join.pairs:
        raise ValueError(f"no image of {predictions_uri} ({counts['predictions']} images) matches a ground-truth "
                         f"image of {gt_json_uri} ({counts['gt']} images) by file-name stem: is "
                         "evaluate.gt_panoptic_json the right set?")
    gt_dir = PanopticDir(gt_dir_uri, storage, retry_s)
    pred_dir = PanopticDir(root.join(labels.prefix, "panoptic"), dict(root.storage_options), retry_s)

    overlap, samples = accumulate_overlap(join.pairs, gt_dir, pred_dir, n_samples=evaluate_cfg.report_images,
                                          image_storage_options=storage, retry_s=retry_s)
    gt_cats = list(gt["categories"])
    pred_cats = list(pred.get("categories", []))
    conf = overlap.result(pred_ids=[c["id"] for c in pred_cats], gt_ids=[c["id"] for c in gt_cats])
    mapping = compute_mapping(conf, evaluate_cfg.matching, pred_cats, gt_cats)
    panoptic = panoptic_quality(join.gt_subset(gt), join.pred_subset(pred), gt_dir.uri, pred_dir.uri,
                                categories=gt_cats, mapping=mapping,
                                storage_options=_shared_options(gt_dir, pred_dir),
                                workers=min(4, os.cpu_count() or 1))
    semantic = semantic_metrics(conf, mapping)
    instance = evaluate_instances(evaluate_cfg, storage, retry_s, labels, join, mapping)
    metrics: dict[str, Any] = {
        "summary": {"predictions": predictions_uri, "ground_truth": gt_json_uri,
                    "matching": evaluate_cfg.matching, "mapped_categories": len(mapping),
                    "pred_categories": len(pred_cats), "gt_categories": len(gt_cats),
                    "matched_pixel_fraction": matched_pixel_fraction(conf, mapping)},
        "images": counts,
        "panoptic": panoptic,
        "semantic": semantic,
    }
    if instance is not None:
        metrics["instance"] = instance
    html = write_report(metrics, samples, None, title=f"u2seg evaluation: {predictions_uri}",
                        category_names={int(c["id"]): str(c.get("name", c["id"])) for c in gt_cats},
                        thing_ids=[int(c["id"]) for c in gt_cats if c.get("isthing", 0)], mapping=mapping)
    root.write_json(f"{out}/mapping.json", mapping_record(conf, mapping, evaluate_cfg.matching, gt_cats))
    root.write_json(f"{out}/metrics.json", metrics)
    root.write_bytes(f"{out}/report.html", html.encode("utf-8"))
    stats = flat_stats(metrics, labels.prefix)
    log.info("evaluate:\n%s", format_table(stats))
    return stats


def gt_locations(evaluate_cfg: EvaluateConfig, storage_options: Mapping[str, Any]) -> tuple[str, str]:
    """(panoptic JSON, PNG folder) of the labeled set; the folder defaults to the JSON's name sans .json.

    That default is the COCO layout (panoptic_val2017.json + panoptic_val2017/) and the synthetic one.
    """
    if not evaluate_cfg.gt_panoptic_json:
        raise ConfigError("evaluate.gt_panoptic_json", evaluate_cfg.gt_panoptic_json,
                          "the COCO panoptic JSON (local path or s3:// URI) of the labeled set to evaluate "
                          "against, with evaluate.gt_panoptic_dir for its PNGs")
    if evaluate_cfg.gt_panoptic_dir:
        return evaluate_cfg.gt_panoptic_json, evaluate_cfg.gt_panoptic_dir
    guess = evaluate_cfg.gt_panoptic_json[:-5] if evaluate_cfg.gt_panoptic_json.endswith(".json") else ""
    if guess:
        fs, path = fsspec.core.url_to_fs(guess, **dict(storage_options))
        if fs.isdir(path):
            log.info("evaluate.gt_panoptic_dir not set: using %s", guess)
            return evaluate_cfg.gt_panoptic_json, guess
    raise ConfigError("evaluate.gt_panoptic_dir", evaluate_cfg.gt_panoptic_dir,
                      "the folder (local path or s3:// URI) of the ground-truth panoptic PNGs named in "
                      "evaluate.gt_panoptic_json")


def accumulate_overlap(pairs: Sequence[Pair], gt_dir: PanopticDir, pred_dir: PanopticDir, *,
                       n_samples: int = 0, image_storage_options: Mapping[str, Any] | None = None,
                       retry_s: float = 0.0) -> tuple[OverlapAccumulator, list[dict]]:
    """Pass 1: pred x gt category pixel overlap over all pairs, plus report samples of a few images.

    One image per task and only per-image accumulators come back, so memory stays bounded by the
    number of threads; accumulators are merged in image order (deterministic result).
    """
    want = set(sample_indices(len(pairs), n_samples))
    total = OverlapAccumulator()
    samples: list[dict] = []

    def one(i: int) -> tuple[OverlapAccumulator, dict | None]:
        return _image_overlap(pairs[i], gt_dir, pred_dir, i in want, image_storage_options, retry_s)

    with ThreadPoolExecutor(max_workers=IO_THREADS) as pool, \
            Progress(len(pairs), "evaluate: overlap", "img") as bar:
        for acc, sample in pool.map(one, range(len(pairs))):
            total.merge(acc)
            if sample is not None:
                samples.append(sample)
            bar.update(1)
    return total, samples


def sample_indices(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (deterministic report samples)."""
    if n <= 0 or k <= 0:
        return []
    return sorted({round(x) for x in np.linspace(0, n - 1, min(k, n))})


def _image_overlap(pair: Pair, gt_dir: PanopticDir, pred_dir: PanopticDir, sample: bool,
                   image_storage_options: Mapping[str, Any] | None, retry_s: float
                   ) -> tuple[OverlapAccumulator, dict | None]:
    gt_ids = gt_dir.read_ids(pair.gt_ann["file_name"])
    pred_ids = pred_dir.read_ids(pair.pred_ann["file_name"])
    if gt_ids.shape != pred_ids.shape:
        raise ValueError(f"image {pair.stem}: prediction {pred_ids.shape} and ground truth {gt_ids.shape} "
                         "panoptic PNGs differ in size")
    gt_cat = panoptic_category_map(gt_ids, pair.gt_ann["segments_info"])
    pred_cat = panoptic_category_map(pred_ids, pair.pred_ann["segments_info"])
    acc = OverlapAccumulator()
    acc.add(pred_cat, gt_cat)
    if not sample:
        return acc, None
    image = _source_image(pair, gt_cat.shape, image_storage_options, retry_s)
    return acc, _downsized_sample(pair.stem, image, gt_cat, pred_cat)


def _source_image(pair: Pair, shape: tuple[int, ...], storage_options: Mapping[str, Any] | None,
                  retry_s: float) -> np.ndarray:
    """The source picture for a report tile; grey (with a warning) when it cannot be read."""
    uri = pair.pred_image.get("uri")
    h, w = shape[:2]
    if uri:
        try:
            image = read_image(uri, storage_options, retry_s)
            if image.shape[:2] != (h, w):
                log.warning("report: image %s is %s but its label maps are %s; resized", uri, image.shape[:2],
                            (h, w))
                image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
            return image
        except (OSError, ValueError) as exc:
            log.warning("report: cannot read source image %s (%s: %s); shown grey", uri,
                        type(exc).__name__, exc)
    else:
        log.warning("report: prediction image %s has no 'uri'; shown grey", pair.stem)
    return np.full((h, w, 3), 128, np.uint8)


def _downsized_sample(name: str, image: np.ndarray, gt: np.ndarray, pred: np.ndarray) -> dict:
    h, w = gt.shape
    if w > SAMPLE_WIDTH:
        nh = max(1, round(h * SAMPLE_WIDTH / w))
        image = cv2.resize(image, (SAMPLE_WIDTH, nh), interpolation=cv2.INTER_AREA)
        ys = (np.arange(nh) * h // nh)[:, None]
        xs = (np.arange(SAMPLE_WIDTH) * w // SAMPLE_WIDTH)[None, :]
        gt, pred = gt[ys, xs], pred[ys, xs]
    return {"name": name, "image": image, "gt": gt.astype(np.int32), "pred": pred.astype(np.int32)}


def _shared_options(gt_dir: PanopticDir, pred_dir: PanopticDir) -> dict[str, Any]:
    """`panoptic_quality` takes one set of storage options: the remote side's (local reads ignore them)."""
    if gt_dir.storage_options == pred_dir.storage_options or split_protocol(pred_dir.uri)[0] == "file":
        return gt_dir.storage_options
    if split_protocol(gt_dir.uri)[0] == "file":
        return pred_dir.storage_options
    raise ValueError("ground truth and run root are on object stores with different storage options; put "
                     "both behind run.storage or copy the ground truth next to the run")


def evaluate_instances(evaluate_cfg: EvaluateConfig, storage_options: Mapping[str, Any], retry_s: float,
                       labels: LabelSet, join: Join, mapping: Mapping[int, int]) -> dict[str, Any] | None:
    """Mask and box AP/AR, class-aware after mapping and class-agnostic, on the joined images.

    Prediction image ids are renumbered to the gt instances file's ids (joined by stem as well: its ids
    need not be the panoptic file's). None when no gt instances are configured.
    """
    if not evaluate_cfg.gt_instances_json:
        return None
    instances = labels.rel("instances.json")
    if not labels.root.exists(instances):
        log.warning("evaluate: %s is missing; instance AP skipped", labels.root.join(instances))
        return {"skipped": f"{instances} is missing"}
    gt = read_json_input(evaluate_cfg.gt_instances_json, storage_options, retry_s)
    pred = labels.read_merged("instances.json")
    gt_by_stem = stem_index(gt)
    pred_to_gt = {p.pred_image["id"]: gt_by_stem[p.stem] for p in join.pairs if p.stem in gt_by_stem}
    keep = set(pred_to_gt.values())
    gt_sub = {"images": [im for im in gt["images"] if im["id"] in keep],
              "annotations": [a for a in gt.get("annotations", []) if a["image_id"] in keep],
              "categories": gt["categories"]}
    if not gt_sub["annotations"]:
        log.warning("evaluate: no gt instance on the evaluated images; instance AP skipped")
        return {"skipped": "no ground-truth instance on the evaluated images"}
    preds = [{**a, "image_id": pred_to_gt[a["image_id"]], "score": float(a.get("score", 1.0))}
             for a in pred.get("annotations", []) if a["image_id"] in pred_to_gt]
    inst_cats = {int(c["id"]) for c in gt["categories"]}
    inst_mapping = {p: g for p, g in mapping.items() if g in inst_cats}
    aware = instance_metrics(gt_sub, preds, mapping=inst_mapping)
    agnostic = instance_metrics(gt_sub, preds, class_agnostic=True)
    return {"images": len(keep), "predictions": len(preds), "class_aware": aware, "class_agnostic": agnostic}


