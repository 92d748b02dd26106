"""Evaluate stage: score the pseudo-labels (or the model's predictions) against a labeled set.

Pseudo category ids mean nothing to a benchmark, so the stage works in two streaming passes over the
images both sets share (joined by file-name stem):
1. pixel overlap of pseudo x gt categories, one image at a time, into a sparse accumulator; from it
   the pseudo -> gt mapping (Hungarian one-to-one or majority many-to-one), saved to eval/mapping.json;
2. PQ/SQ/RQ with that mapping (`panoptic_quality` re-reads the PNGs image by image).
Semantic mIoU / pixel accuracy come from the pass-1 confusion, instance AP (when gt instances are
configured) from the COCO instances files. Results go to eval/metrics.json and eval/report.html
(pseudo-labels) or eval/model/ (the trained model's predictions).

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
from u2seg.evaluate.loading import (
    Join,
    Pair,
    PanopticDir,
    join_by_stem,
    prediction_prefix,
    read_bytes_uri,
    read_json_uri,
    stem_index,
)
from u2seg.evaluate.matching import (
    Confusion,
    OverlapAccumulator,
    hungarian_mapping,
    majority_mapping,
    panoptic_category_map,
)
from u2seg.evaluate.pq import panoptic_quality
from u2seg.evaluate.report import write_report
from u2seg.evaluate.semantic import semantic_metrics
from u2seg.io import RunRoot, split_protocol
from u2seg.io.images import decode_image
from u2seg.pipeline.progress import Progress

log = logging.getLogger(__name__)

IO_THREADS = 8  # concurrent PNG reads in pass 1 (object-store latency, not CPU, is the limit)
SAMPLE_WIDTH = 320  # report tiles are downsized to this width when collected (bounds their memory)
_AP_KEYS = ("AP", "AP50", "AP75", "AR100")


def run_evaluate(cfg: U2SegConfig, root: RunRoot) -> dict[str, Any]:
    """Evaluate ``cfg.evaluate.target`` in ``root`` against the configured labeled set; return flat stats."""
    ev = cfg.evaluate
    so = cfg.run.storage.storage_options()
    gt_json_uri, gt_dir_uri = gt_locations(ev, so)
    prefix = prediction_prefix(root, ev.target)
    out = "eval" if ev.target == "labels" else "eval/model"  # the labels' and the model's scores side by side
    gt = read_json_uri(gt_json_uri, so)
    pred = root.read_json(prefix, "panoptic.json")
    join = join_by_stem(gt, pred)
    counts = join.counts()
    log.info("evaluate: %s vs %s: %d images joined by file-name stem (%d gt without prediction, "
             "%d predictions without gt)", root.join(prefix), gt_json_uri, counts["evaluated"],
             counts["gt_without_prediction"], counts["predictions_without_gt"])
    if not join.pairs:
        raise ValueError(f"no prediction image of {root.join(prefix)} matches a ground-truth image of "
                         f"{gt_json_uri} by file-name stem: is evaluate.gt_panoptic_json the right set?")
    gt_dir = PanopticDir(gt_dir_uri, so)
    pred_dir = PanopticDir(root.join(prefix, "panoptic"), dict(root.storage_options))

    overlap, samples = accumulate_overlap(join.pairs, gt_dir, pred_dir, n_samples=ev.report_images,
                                          image_storage_options=so)
    gt_cats = list(gt["categories"])
    pred_cats = list(pred.get("categories", []))
    conf = overlap.result(pred_ids=[c["id"] for c in pred_cats], gt_ids=[c["id"] for c in gt_cats])
    mapping = compute_mapping(conf, ev.matching, pred_cats, gt_cats)
    root.write_json(f"{out}/mapping.json", mapping_record(conf, mapping, ev.matching, gt_cats))

    panoptic = panoptic_quality(join.gt_subset(gt), join.pred_subset(pred), gt_dir.uri, pred_dir.uri,
                                categories=gt_cats, mapping=mapping,
                                storage_options=_shared_options(gt_dir, pred_dir),
                                workers=min(4, os.cpu_count() or 1))
    semantic = semantic_metrics(conf, mapping)
    instance = evaluate_instances(ev, so, root, prefix, join, mapping)

    matched = int(sum(conf.counts[_row(conf, p), _col(conf, g)] for p, g in mapping.items()))
    total = int(conf.counts.sum() + conf.unassigned.sum())
    metrics: dict[str, Any] = {
        "summary": {"target": ev.target, "predictions": root.join(prefix), "ground_truth": gt_json_uri,
                    "matching": ev.matching, "mapped_categories": len(mapping),
                    "pred_categories": len(pred_cats), "gt_categories": len(gt_cats),
                    "matched_pixel_fraction": matched / total if total else 0.0},
        "images": counts,
        "panoptic": panoptic,
        "semantic": semantic,
    }
    if instance is not None:
        metrics["instance"] = instance
    root.write_json(f"{out}/metrics.json", metrics)
    html = write_report(metrics, samples, None, title=f"u2seg evaluation: {root.join(prefix)}",
                        category_names={int(c["id"]): str(c.get("name", c["id"])) for c in gt_cats},
                        thing_ids=[int(c["id"]) for c in gt_cats if c.get("isthing", 0)], mapping=mapping)
    root.write_bytes(f"{out}/report.html", html.encode("utf-8"))
    stats = flat_stats(metrics, prefix)
    log.info("evaluate:\n%s", format_table(stats))
    return stats


def gt_locations(ev: EvaluateConfig, storage_options: Mapping[str, Any]) -> tuple[str, str]:
    """(panoptic JSON, PNG folder) of the labeled set; the folder defaults to the JSON's name sans .json.

    That default is the COCO layout (panoptic_val2017.json + panoptic_val2017/) and the synthetic one.
    """
    if not ev.gt_panoptic_json:
        raise ConfigError("evaluate.gt_panoptic_json", ev.gt_panoptic_json,
                          "the COCO panoptic JSON (local path or s3:// URI) of the labeled set to evaluate "
                          "against, with evaluate.gt_panoptic_dir for its PNGs")
    if ev.gt_panoptic_dir:
        return ev.gt_panoptic_json, ev.gt_panoptic_dir
    guess = ev.gt_panoptic_json[:-5] if ev.gt_panoptic_json.endswith(".json") else ""
    if guess:
        fs, path = fsspec.core.url_to_fs(guess, **dict(storage_options))
        if fs.isdir(path):
            log.info("evaluate.gt_panoptic_dir not set: using %s", guess)
            return ev.gt_panoptic_json, guess
    raise ConfigError("evaluate.gt_panoptic_dir", ev.gt_panoptic_dir,
                      "the folder (local path or s3:// URI) of the ground-truth panoptic PNGs named in "
                      "evaluate.gt_panoptic_json")


def accumulate_overlap(pairs: Sequence[Pair], gt_dir: PanopticDir, pred_dir: PanopticDir, *,
                       n_samples: int = 0, image_storage_options: Mapping[str, Any] | None = None
                       ) -> tuple[OverlapAccumulator, list[dict]]:
    """Pass 1: pred x gt category pixel overlap over all pairs, plus report samples of a few images.

    One image per task and only per-image accumulators come back, so memory stays bounded by the
    number of threads; accumulators are merged in image order (deterministic result).
    """
    want = set(sample_indices(len(pairs), n_samples))
    total = OverlapAccumulator()
    samples: list[dict] = []

    def one(i: int) -> tuple[OverlapAccumulator, dict | None]:
        return _image_overlap(pairs[i], gt_dir, pred_dir, i in want, image_storage_options)

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
                   image_storage_options: Mapping[str, Any] | None) -> tuple[OverlapAccumulator, dict | None]:
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
    image = _source_image(pair, gt_cat.shape, image_storage_options)
    return acc, _downsized_sample(pair.stem, image, gt_cat, pred_cat)


def _source_image(pair: Pair, shape: tuple[int, ...],
                  storage_options: Mapping[str, Any] | None) -> np.ndarray:
    """The source picture for a report tile; grey (with a warning) when it cannot be read."""
    uri = pair.pred_image.get("uri") or pair.pred_image.get("u2seg_uri")
    h, w = shape[:2]
    if uri:
        try:
            image = decode_image(read_bytes_uri(uri, storage_options))
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


def compute_mapping(conf: Confusion, method: str, pred_cats: Sequence[Mapping],
                    gt_cats: Sequence[Mapping]) -> dict[int, int]:
    """pseudo -> gt category mapping, things to things and stuff to stuff (see module doc).

    Without ``isthing`` flags on both sides the whole confusion is matched at once.
    """
    if method not in ("hungarian", "majority"):
        raise ConfigError("evaluate.matching", method, "'hungarian' or 'majority'")
    solve = hungarian_mapping if method == "hungarian" else majority_mapping
    if not pred_cats or not all("isthing" in c for c in [*pred_cats, *gt_cats]):
        log.warning("evaluate: categories lack 'isthing'; matching things and stuff together")
        return solve(conf)
    mapping: dict[int, int] = {}
    for flag in (1, 0):
        p = [int(c["id"]) for c in pred_cats if int(c["isthing"]) == flag]
        g = [int(c["id"]) for c in gt_cats if int(c["isthing"]) == flag]
        mapping.update(solve(conf.subset(p, g)))
    return mapping


def mapping_record(conf: Confusion, mapping: Mapping[int, int], method: str,
                   gt_cats: Sequence[Mapping]) -> dict[str, Any]:
    """eval/mapping.json: the mapping, gt names, and the confusion it came from (to re-derive offline)."""
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in gt_cats}
    return {"matching": method, "partition": "things->things, stuff->stuff",
            "mapping": {str(p): int(g) for p, g in sorted(mapping.items())},
            "mapped_names": {str(p): names.get(int(g), str(g)) for p, g in sorted(mapping.items())},
            "confusion": conf.to_dict()}


def _row(conf: Confusion, pred_id: int) -> int:
    return int(np.flatnonzero(conf.pred_ids == pred_id)[0])


def _col(conf: Confusion, gt_id: int) -> int:
    return int(np.flatnonzero(conf.gt_ids == gt_id)[0])


def _shared_options(gt_dir: PanopticDir, pred_dir: PanopticDir) -> dict[str, Any]:
    """`panoptic_quality` takes one set of storage options: the remote side's (local reads ignore them)."""
    if gt_dir.storage_options == pred_dir.storage_options or split_protocol(pred_dir.uri)[0] == "file":
        return gt_dir.storage_options
    if split_protocol(gt_dir.uri)[0] == "file":
        return pred_dir.storage_options
    raise ValueError("ground truth and run root are on object stores with different storage options; put "
                     "both behind run.storage or copy the ground truth next to the run")


def evaluate_instances(ev: EvaluateConfig, so: Mapping[str, Any], root: RunRoot, prefix: str, join: Join,
                       mapping: Mapping[int, int]) -> dict[str, Any] | None:
    """Mask and box AP/AR, class-aware after mapping and class-agnostic, on the joined images.

    Prediction image ids are renumbered to the gt instances file's ids (joined by stem as well: its ids
    need not be the panoptic file's). None when no gt instances are configured.
    """
    if not ev.gt_instances_json:
        return None
    if not root.exists(prefix, "instances.json"):
        log.warning("evaluate: %s is missing; instance AP skipped", root.join(prefix, "instances.json"))
        return {"skipped": f"{prefix}/instances.json is missing"}
    gt = read_json_uri(ev.gt_instances_json, so)
    pred = root.read_json(prefix, "instances.json")
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


def flat_stats(metrics: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Flat numbers for the pipeline summary table (fractions in [0, 1]; absent metrics left out)."""
    im, pan, sem = metrics["images"], metrics["panoptic"], metrics["semantic"]
    stats: dict[str, Any] = {"predictions": prefix, "images": im["evaluated"], "gt_images": im["gt"],
                             "gt_without_prediction": im["gt_without_prediction"],
                             "predictions_without_gt": im["predictions_without_gt"],
                             "mapped_categories": metrics["summary"]["mapped_categories"]}
    for part, suffix in (("All", ""), ("Things", "_things"), ("Stuff", "_stuff")):
        for k in ("pq", "sq", "rq"):
            stats[k + suffix] = pan[part][k]
    stats["miou"] = sem["miou"]
    stats["pixel_accuracy"] = sem["pixel_accuracy"]
    inst = metrics.get("instance") or {}
    for mode, infix in (("class_aware", ""), ("class_agnostic", "_agnostic")):
        for iou in ("segm", "bbox"):
            res = (inst.get(mode) or {}).get(iou) or {}
            for key in _AP_KEYS:
                if res.get(key) is not None:
                    stats[f"{key.lower()}{infix}_{iou}"] = res[key]
    return stats


def format_table(stats: Mapping[str, Any]) -> str:
    """A compact, log-friendly table of the headline numbers (percentages)."""

    def pct(key: str) -> str:
        v = stats.get(key)
        return f"{100 * v:6.1f}" if isinstance(v, (int, float)) else "     -"

    lines = [f"  {stats['predictions']}: {stats['images']} images ({stats['gt_without_prediction']} gt "
             f"without prediction, {stats['predictions_without_gt']} predictions without gt), "
             f"{stats['mapped_categories']} categories mapped",
             "            PQ     SQ     RQ"]
    for name, suffix in (("all", ""), ("things", "_things"), ("stuff", "_stuff")):
        lines.append(f"  {name:<7} {pct('pq' + suffix)} {pct('sq' + suffix)} {pct('rq' + suffix)}")
    lines.append(f"  mIoU {pct('miou')}   pixel acc {pct('pixel_accuracy')}")
    if any(k.startswith("ap") for k in stats):
        lines.append("            AP   AP50   AP75  AR100")
        for name, infix in (("segm", ""), ("bbox", ""), ("segm", "_agnostic"), ("bbox", "_agnostic")):
            label = name + (" ag." if infix else "")
            cells = " ".join(pct(f"{k.lower()}{infix}_{name}") for k in _AP_KEYS)
            lines.append(f"  {label:<9}{cells}")
    return "\n".join(lines)
