"""Evaluate stage: score the pseudo-labels (or the model's predictions) against a labeled set.

Pseudo category ids mean nothing to a benchmark, so every evaluation protocol first maps pseudo
categories to gt categories, then scores. The stage runs each protocol of `evaluate.protocols` over
the same streamed evidence, in two passes over the images both sets share (joined by file-name stem):
1. one image at a time, the pseudo x gt category pixel overlap into a sparse accumulator (and, for
   the u2seg protocol, each image's stuff IoU votes); from it each protocol's mapping;
2. PQ/SQ/RQ per protocol (`panoptic_quality` re-reads the PNGs image by image).
Semantic numbers come from the pass-1 confusion, instance AP (when gt instances are configured) from
the gt COCO instances file and the label set's instance annotations. The label set is read from its
Parquet parts (``u2seg/io/labelset.py``), never from merged COCO files, which large sets do not have.
Results go to eval/labels/ (pseudo-labels) or eval/model/ (the trained model's predictions):
metrics.json (one block per protocol), mapping.json (each protocol's mapping and its evidence) and
report.html (the protocols side by side), written only once all of them are computed.

Protocols:
- ``hungarian`` (strict, one-to-one) and ``majority`` (many-to-one) map by pixel overlap, things only to
  gt thing classes and stuff only to gt stuff classes (a pseudo thing mapped to a stuff class could not
  be scored as an instance, and the things / stuff split of PQ stays meaningful). PQ merges the stuff
  segments one class receives per image, unmapped pixels are misses in mIoU (averaged over classes
  seen in gt or prediction), AP is mask and box, class-aware and class-agnostic.
- ``u2seg`` is U2Seg's own evaluation code (`u2seg.evaluate.u2seg_protocol`), with the ground truth as
  configured (`u2seg gt-supercategory` makes U2Seg's COCO stuff-supercategory set). Things map by
  votes of the scored instance predictions (score >= 0.6, box IoU > 0.7 with a gt box of the image;
  gt boxes from `evaluate.gt_instances_json`, else from the gt panoptic thing segments), stuff by
  per-image IoU > 0.15 votes of the panoptic category maps; many-to-one, ties to the lowest gt id,
  clusters without a vote unmapped. PQ keeps mapped stuff segments apart (`merge_stuff=False`). The
  semantic numbers are over U2Seg's classes: one "things" class (id 0, every thing category of each
  side collapsed into it, mapped to itself) plus the gt stuff classes, unmapped pixels ignored, mIoU
  over classes with gt pixels. ``semantic`` applies the voted mapping as a look-up (what the mapping
  means, and what U2Seg's PQ and AP use); ``semantic_inplace`` applies it as U2Seg's semantic evaluator
  does, relabeling in place key after key, so a cluster relabeled to a value that is a later cluster
  key is relabeled again. Both are reported because the in-place numbers are U2Seg's published ones
  but depend on the arbitrary order of the k-means cluster ids, not on the segmentation; ``semantic``
  is the headline (flat ``miou``), ``semantic_inplace`` is ``miou_inplace``. AP: class-aware box AP
  only, unmapped detections dropped (U2Seg's evaluator skips masks and reports no class-agnostic AP).

No Ray: pass 1 is IO-bound PNG reads, done in threads; pass 2 runs in `panoptic_quality`'s spawned
worker processes (so scripts calling this need an ``if __name__ == "__main__"`` guard, as any
spawn-based multiprocessing does).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import cv2
import fsspec
import numpy as np

from u2seg.config import ConfigError, EvaluateConfig, U2SegConfig
from u2seg.evaluate.instance import instance_metrics
from u2seg.evaluate.loading import Join, Pair, PanopticDir, join_by_stem, stem_index
from u2seg.evaluate.matching import (
    Confusion,
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
from u2seg.evaluate.u2seg_protocol import (
    STUFF_IOU_THRESHOLD,
    THING_IOU_THRESHOLD,
    THING_SCORE_THRESHOLD,
    THINGS_ID,
    collapse_confusion,
    combine_mappings,
    inplace_semantic_mapping,
    stuff_votes,
    thing_votes_coco,
    vote_mapping,
)
from u2seg.io import RunRoot, layout, split_protocol
from u2seg.io.inputs import read_image, read_json_input
from u2seg.io.labelset import PARTS, LabelSet
from u2seg.pipeline.progress import Progress

log = logging.getLogger(__name__)

IO_THREADS = 8  # concurrent PNG reads in pass 1 (object-store latency, not CPU, is the limit)
SAMPLE_WIDTH = 320  # report tiles are downsized to this width when collected (bounds their memory)
PROTOCOL_NOTES = {
    "hungarian": "one-to-one pixel-overlap mapping (things to things, stuff to stuff); PQ with stuff merged "
                 "per class; unmapped pixels are misses; mask and box AP",
    "majority": "many-to-one pixel-overlap mapping (each pseudo class -> the gt class it overlaps most); "
                "otherwise as hungarian",
    "u2seg": "U2Seg's evaluation code: box-IoU votes map things, per-image IoU votes map stuff (many-to-one); "
             "PQ with stuff segments apart; mIoU over 'things' + gt stuff classes with unmapped pixels "
             "ignored (semantic_inplace: U2Seg's in-place relabel); box AP only",
    "identity": "the model's classes are the ground truth's own (fine-tuned on labels): a fixed id map, no "
                "matching; PQ with stuff merged per class; mask and box AP",
}


def run_evaluate_labels(cfg: U2SegConfig, root: RunRoot) -> dict[str, Any]:
    """The pseudo-labels (``labels/``) scored into ``eval/labels/``."""
    gt_locations(cfg.evaluate, cfg.run.storage.storage_options())  # a config error before anything else
    return evaluate_label_set(cfg, root, _label_set(root, layout.LABELS, "run `u2seg label` first"),
                              layout.EVAL_LABELS)


def run_evaluate_model(cfg: U2SegConfig, root: RunRoot) -> dict[str, Any]:
    """The trained model's predictions (``predict/``) scored into ``eval/model/``."""
    gt_locations(cfg.evaluate, cfg.run.storage.storage_options())
    return evaluate_label_set(cfg, root, _label_set(root, layout.PREDICT, "run `u2seg predict` first"),
                              layout.EVAL_MODEL)


def _label_set(root: RunRoot, prefix: str, hint: str) -> LabelSet:
    labels = LabelSet(root, prefix)  # read only: class counts come with its parts
    if not labels.groups():
        raise FileNotFoundError(f"{root.join(labels.rel(PARTS))} holds no committed label part: {hint}")
    return labels


@dataclass
class _Evidence:
    """What every protocol scores from: the joined sets, their categories and the pass-1 overlap."""

    gt: dict
    pred: dict
    join: Join
    gt_dir: PanopticDir
    pred_dir: PanopticDir
    gt_cats: list[dict]
    pred_cats: list[dict]
    conf: Confusion
    stuff_votes: OverlapAccumulator | None  # per-image stuff IoU votes (u2seg only)
    instances: _Instances | None  # None: no gt instances configured

    def ids(self, side: str, isthing: int) -> list[int]:
        cats = self.gt_cats if side == "gt" else self.pred_cats
        return sorted(int(c["id"]) for c in cats if int(c.get("isthing", 0)) == isthing)

    def panoptic(self, mapping: Mapping[int, int], *, merge_stuff: bool) -> dict[str, Any]:
        return panoptic_quality(self.join.gt_subset(self.gt), self.join.pred_subset(self.pred), self.gt_dir.uri,
                                self.pred_dir.uri, categories=self.gt_cats, mapping=mapping,
                                storage_options=_shared_options(self.gt_dir, self.pred_dir),
                                workers=min(4, os.cpu_count() or 1), merge_stuff=merge_stuff)


@dataclass
class _Instances:
    """Instance evidence: gt instances of the joined images and the predictions renumbered to their ids."""

    gt: dict | None  # None when AP is skipped (see `skipped`)
    preds: list[dict]
    skipped: str | None = None


def evaluate_label_set(cfg: U2SegConfig, root: RunRoot, labels: LabelSet, out: str, *,
                       identity: Mapping[int, int] | None = None) -> dict[str, Any]:
    """Score ``labels`` against the configured labeled set under every configured protocol; write metrics,
    mappings and report to ``out``. With ``identity`` (label-set id -> gt id: a model trained on the gt's own
    categories) the one protocol is ``identity``: that fixed map, no matching.

    Nothing is written until every number is computed, so a failed evaluation leaves the previous
    results of ``out`` as they were.
    """
    evaluate_cfg = cfg.evaluate
    protocols = ["identity"] if identity is not None else list(evaluate_cfg.protocols)
    storage = cfg.run.storage.storage_options()
    retry_s = cfg.run.storage.retry_s
    gt_json_uri, gt_dir_uri = gt_locations(evaluate_cfg, storage)
    gt = read_json_input(gt_json_uri, storage, retry_s)
    pred = labels.panoptic_dict()  # evaluation-sized: held whole, as the ground truth is
    predictions_uri = root.join(labels.prefix)
    join = join_by_stem(gt, pred)
    counts = join.counts()
    log.info("evaluate: %s vs %s: %d images joined by file-name stem (%d gt without prediction, "
             "%d predictions without gt); protocols %s", predictions_uri, gt_json_uri, counts["evaluated"],
             counts["gt_without_prediction"], counts["predictions_without_gt"], ", ".join(protocols))
    if not join.pairs:
        if out == layout.EVAL_LABELS and evaluate_cfg.images:
            note = (f"no pseudo-labelled image of {predictions_uri} is in the held-out set {gt_json_uri}: the "
                    "pseudo-labels are scored only where their images overlap the ground truth; the model is "
                    "scored on evaluate.images")
            log.info("evaluate: %s", note)
            root.write_json(layout.eval_metrics(out), {"images": counts, "note": note, "protocols": {}})
            return {"images": 0, "note": note}
        raise ValueError(f"no image of {predictions_uri} ({counts['predictions']} images) matches a ground-truth "
                         f"image of {gt_json_uri} ({counts['gt']} images) by file-name stem: is "
                         "evaluate.gt_panoptic_json the right set"
                         + (" for evaluate.images?" if evaluate_cfg.images else "?"))
    gt_cats = list(gt["categories"])
    pred_cats = list(pred.get("categories", []))
    vote_ignore = _stuff_vote_ignore(gt_cats, pred_cats) if "u2seg" in protocols else None
    gt_dir = PanopticDir(gt_dir_uri, storage, retry_s)
    pred_dir = PanopticDir(root.join(labels.prefix, "panoptic"), dict(root.storage_options), retry_s)

    overlap, votes, samples = accumulate_overlap(join.pairs, gt_dir, pred_dir, n_samples=evaluate_cfg.report_images,
                                                 image_storage_options=storage, retry_s=retry_s,
                                                 stuff_vote_ignore=vote_ignore)
    conf = overlap.result(pred_ids=[c["id"] for c in pred_cats], gt_ids=[c["id"] for c in gt_cats])
    ev = _Evidence(gt, pred, join, gt_dir, pred_dir, gt_cats, pred_cats, conf, votes,
                   _instance_evidence(evaluate_cfg, storage, retry_s, labels, join))
    blocks: dict[str, dict[str, Any]] = {}
    records: dict[str, dict[str, Any]] = {}
    tile_mappings: dict[str, dict[int, int]] = {}
    for name in protocols:
        if name == "identity":
            blocks[name], records[name], tile_mappings[name] = score_identity(ev, identity or {})
            continue
        score = score_u2seg if name == "u2seg" else score_overlap
        blocks[name], records[name], tile_mappings[name] = score(ev, name, labels)
    metrics: dict[str, Any] = {
        "summary": {"predictions": predictions_uri, "ground_truth": gt_json_uri, "protocols": protocols,
                    "pred_categories": len(pred_cats), "gt_categories": len(gt_cats)},
        "images": counts,
        "protocols": blocks,
    }
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in gt_cats}
    html = write_report(metrics, samples, None, title=f"u2seg evaluation: {predictions_uri}",
                        category_names={THINGS_ID: "things", **names},
                        thing_ids=[int(c["id"]) for c in gt_cats if c.get("isthing", 0)], mappings=tile_mappings,
                        protocol_notes={p: PROTOCOL_NOTES[p] for p in protocols})
    root.write_json(layout.eval_mapping(out), {"protocols": records})
    root.write_json(layout.eval_metrics(out), metrics)
    root.write_bytes(layout.eval_report(out), html.encode("utf-8"))
    stats = flat_stats(metrics, labels.prefix)
    log.info("evaluate:\n%s", format_table(stats))
    return stats


def score_overlap(ev: _Evidence, name: str, labels: LabelSet) -> tuple[dict, dict, dict[int, int]]:
    """The hungarian or majority protocol: (metrics block, mapping.json record, panoptic mapping)."""
    return _score_mapped(ev, compute_mapping(ev.conf, name, ev.pred_cats, ev.gt_cats), name)


def score_identity(ev: _Evidence, identity: Mapping[int, int]) -> tuple[dict, dict, dict[int, int]]:
    """A model of the gt's own categories: (metrics block, mapping.json record, panoptic mapping) with the
    fixed id map ``identity``, scored as the overlap protocols score (PQ, semantic, mask and box AP)."""
    gt_ids = {int(c["id"]) for c in ev.gt_cats}
    unknown = sorted(g for g in identity.values() if int(g) not in gt_ids)
    if unknown:
        raise ValueError(f"the fixed category map names ids the ground truth does not have: {unknown[:10]}; is "
                         "evaluate.gt_panoptic_json a set of the same categories as the training labels?")
    return _score_mapped(ev, {int(p): int(g) for p, g in identity.items()}, "identity")


def _score_mapped(ev: _Evidence, mapping: dict[int, int], name: str) -> tuple[dict, dict, dict[int, int]]:
    """PQ, semantic, mask and box AP under one prediction -> ground-truth category map."""
    block: dict[str, Any] = {
        "summary": {"mapping": name, "mapped_categories": len(mapping),
                    "matched_pixel_fraction": matched_pixel_fraction(ev.conf, mapping)},
        "panoptic": ev.panoptic(mapping, merge_stuff=True),
        "semantic": semantic_metrics(ev.conf, mapping),
    }
    instance = _instance_block(ev, mapping, iou_types=("segm", "bbox"), agnostic=True)
    if instance is not None:
        block["instance"] = instance
    return block, mapping_record(ev.conf, mapping, name, ev.gt_cats), mapping


def score_u2seg(ev: _Evidence, name: str, labels: LabelSet) -> tuple[dict, dict, dict[int, int]]:
    """U2Seg's protocol (module doc): (metrics block, mapping.json record, panoptic mapping)."""
    pred_things, pred_stuff = ev.ids("pred", 1), ev.ids("pred", 0)
    gt_things, gt_stuff = ev.ids("gt", 1), ev.ids("gt", 0)
    thing_acc, evidence = _thing_votes(ev, labels, set(pred_things), set(gt_things))
    things = vote_mapping(thing_acc, pseudo_ids=pred_things)
    stuff = vote_mapping(ev.stuff_votes or OverlapAccumulator(), pseudo_ids=pred_stuff)
    mapping = combine_mappings(things.mapping, stuff.mapping)
    sem_conf = collapse_confusion(ev.conf, pred_things, gt_things)
    fiat = {THINGS_ID: THINGS_ID} if pred_things and gt_things else {}
    intended = {**stuff.mapping, **fiat}
    inplace = inplace_semantic_mapping(stuff.mapping, pred_stuff_ids=pred_stuff, gt_stuff_ids=gt_stuff)
    if not fiat:
        inplace.pop(THINGS_ID, None)
    block: dict[str, Any] = {
        "summary": {"mapping": name, "mapped_categories": len(mapping), "mapped_things": len(things.mapping),
                    "mapped_stuff": len(stuff.mapping), "unmatched_things": len(things.unmatched),
                    "unmatched_stuff": len(stuff.unmatched), "thing_evidence": evidence,
                    "matched_pixel_fraction": matched_pixel_fraction(ev.conf, mapping),
                    "inplace_relabel_changes_mapping": inplace != intended},
        "panoptic": ev.panoptic(mapping, merge_stuff=False),
        "semantic": semantic_metrics(sem_conf, intended, unmapped="ignore", average="gt"),
        "semantic_inplace": semantic_metrics(sem_conf, inplace, unmapped="ignore", average="gt"),
    }
    instance = _instance_block(ev, things.mapping, iou_types=("bbox",), agnostic=False)
    if instance is not None:
        block["instance"] = instance
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in ev.gt_cats}
    record = {"matching": name, "partition": "things->things by box-IoU votes, stuff->stuff by per-image IoU "
              "votes; many-to-one", "thing_evidence": evidence,
              "thresholds": {"thing_score": THING_SCORE_THRESHOLD, "thing_box_iou": THING_IOU_THRESHOLD,
                             "stuff_iou": STUFF_IOU_THRESHOLD},
              "mapping": {str(p): int(g) for p, g in sorted(mapping.items())},
              "mapped_names": {str(p): names.get(int(g), str(g)) for p, g in sorted(mapping.items())},
              "things": things.to_dict(), "stuff": stuff.to_dict(),
              "semantic_mapping": {str(p): int(g) for p, g in sorted(intended.items())},
              "semantic_inplace_mapping": {str(p): int(g) for p, g in sorted(inplace.items())},
              "semantic_things_id": THINGS_ID}
    return block, record, mapping


def _stuff_vote_ignore(gt_cats: Sequence[Mapping], pred_cats: Sequence[Mapping]) -> tuple[set[int], set[int]]:
    """(pred ids, gt ids) that cast / receive no stuff vote: void and every thing category."""
    for side, cats in (("ground-truth", gt_cats), ("prediction", pred_cats)):
        lacking = [c.get("id") for c in cats if "isthing" not in c]
        if lacking or not cats:
            raise ValueError(f"the u2seg protocol needs 'isthing' on every {side} category (lacking: "
                             f"{lacking[:5] or 'no categories'}); evaluate with evaluate.protocols=[hungarian]")
    return ({0, *(int(c["id"]) for c in pred_cats if int(c["isthing"]))},
            {0, *(int(c["id"]) for c in gt_cats if int(c["isthing"]))})


def _thing_votes(ev: _Evidence, labels: LabelSet, pred_things: set[int], gt_things: set[int]
                 ) -> tuple[OverlapAccumulator, str]:
    """U2Seg's thing votes and where their gt boxes came from ("gt instances" or "gt panoptic segments").

    Gt boxes are the configured gt instances (U2Seg's source) when they cover the evaluated images, else
    the gt panoptic thing segments (crowd ones included, as U2Seg counts crowd boxes); the predictions
    are the label set's scored instances.
    """
    inst = ev.instances
    if inst is not None and inst.gt is not None:
        gt_boxes, preds, evidence = inst.gt, inst.preds, "gt instances"
    else:
        pred_inst = labels.instances_dict()
        to_gt = {p.pred_image["id"]: p.gt_image["id"] for p in ev.join.pairs}
        preds = [{**a, "image_id": to_gt[a["image_id"]], "score": float(a.get("score", 1.0))}
                 for a in pred_inst.get("annotations", []) if a["image_id"] in to_gt]
        gt_boxes = {"annotations": _panoptic_thing_boxes(ev.join, gt_things)}
        evidence = "gt panoptic segments"
    acc = thing_votes_coco(gt_boxes, preds)
    kept = Counter({k: v for k, v in acc.pairs.items() if k[0] in pred_things and k[1] in gt_things})
    if sum(kept.values()) != sum(acc.pairs.values()):
        log.warning("evaluate: u2seg: %d thing votes name a category that is not a thing of the panoptic sets; "
                    "dropped", sum(acc.pairs.values()) - sum(kept.values()))
    acc.pairs = kept
    return acc, evidence


def _panoptic_thing_boxes(join: Join, gt_things: set[int]) -> list[dict]:
    out = []
    for p in join.pairs:
        for s in p.gt_ann.get("segments_info", []):
            if int(s["category_id"]) not in gt_things:
                continue
            if "bbox" not in s:
                raise ValueError(f"ground-truth panoptic segment {s.get('id')} of image {p.stem} has no 'bbox': "
                                 "U2Seg's thing mapping votes with gt boxes; set evaluate.gt_instances_json")
            out.append({"image_id": p.gt_image["id"], "bbox": s["bbox"], "category_id": int(s["category_id"])})
    return out


def gt_locations(evaluate_cfg: EvaluateConfig, storage_options: Mapping[str, Any]) -> tuple[str, str]:
    """(panoptic JSON, PNG folder) of the labeled set; the folder defaults to the JSON's name sans .json.

    That default is the COCO layout (panoptic_val2017.json + panoptic_val2017/) and the synthetic one.
    """
    return panoptic_locations(evaluate_cfg.gt_panoptic_json, evaluate_cfg.gt_panoptic_dir, storage_options,
                              "evaluate", "evaluate against")


def panoptic_locations(json_uri: str | None, dir_uri: str | None, storage_options: Mapping[str, Any],
                       section: str, purpose: str) -> tuple[str, str]:
    """(panoptic JSON, PNG folder) of a COCO panoptic set named by ``<section>.gt_panoptic_json`` and
    ``<section>.gt_panoptic_dir``; the folder defaults to the JSON's name without .json (COCO's layout)."""
    if not json_uri:
        raise ConfigError(f"{section}.gt_panoptic_json", json_uri,
                          f"the COCO panoptic JSON (local path or s3:// URI) of the labeled set to {purpose}, "
                          f"with {section}.gt_panoptic_dir for its PNGs")
    if dir_uri:
        return json_uri, dir_uri
    guess = json_uri[:-5] if json_uri.endswith(".json") else ""
    if guess:
        fs, path = fsspec.core.url_to_fs(guess, **dict(storage_options))
        if fs.isdir(path):
            log.info("%s.gt_panoptic_dir not set: using %s", section, guess)
            return json_uri, guess
    raise ConfigError(f"{section}.gt_panoptic_dir", dir_uri,
                      "the folder (local path or s3:// URI) of the ground-truth panoptic PNGs named in "
                      f"{section}.gt_panoptic_json")


def accumulate_overlap(pairs: Sequence[Pair], gt_dir: PanopticDir, pred_dir: PanopticDir, *,
                       n_samples: int = 0, image_storage_options: Mapping[str, Any] | None = None,
                       retry_s: float = 0.0, stuff_vote_ignore: tuple[set[int], set[int]] | None = None
                       ) -> tuple[OverlapAccumulator, OverlapAccumulator | None, list[dict]]:
    """Pass 1: pred x gt category pixel overlap over all pairs, U2Seg's per-image stuff votes (when
    ``stuff_vote_ignore`` = (pred ids, gt ids) casting / receiving no vote is given, else None), and
    report samples of a few images.

    One image per task and only per-image accumulators come back, so memory stays bounded by the
    number of threads; accumulators are merged in image order (deterministic result).
    """
    want = set(sample_indices(len(pairs), n_samples))
    total = OverlapAccumulator()
    votes = OverlapAccumulator() if stuff_vote_ignore is not None else None
    samples: list[dict] = []

    def one(i: int) -> tuple[OverlapAccumulator, Counter | None, dict | None]:
        return _image_overlap(pairs[i], gt_dir, pred_dir, i in want, image_storage_options, retry_s,
                              stuff_vote_ignore)

    with ThreadPoolExecutor(max_workers=IO_THREADS) as pool, \
            Progress(len(pairs), "evaluate: overlap", "img") as bar:
        for acc, image_votes, sample in pool.map(one, range(len(pairs))):
            total.merge(acc)
            if votes is not None and image_votes:
                votes.add_pairs(image_votes)
            if sample is not None:
                samples.append(sample)
            bar.update(1)
    return total, votes, samples


def sample_indices(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (deterministic report samples)."""
    if n <= 0 or k <= 0:
        return []
    return sorted({round(x) for x in np.linspace(0, n - 1, min(k, n))})


def _image_overlap(pair: Pair, gt_dir: PanopticDir, pred_dir: PanopticDir, sample: bool,
                   image_storage_options: Mapping[str, Any] | None, retry_s: float,
                   stuff_vote_ignore: tuple[set[int], set[int]] | None = None
                   ) -> tuple[OverlapAccumulator, Counter | None, dict | None]:
    gt_ids = gt_dir.read_ids(pair.gt_ann["file_name"])
    pred_ids = pred_dir.read_ids(pair.pred_ann["file_name"])
    if gt_ids.shape != pred_ids.shape:
        raise ValueError(f"image {pair.stem}: prediction {pred_ids.shape} and ground truth {gt_ids.shape} "
                         "panoptic PNGs differ in size")
    gt_cat = panoptic_category_map(gt_ids, pair.gt_ann["segments_info"])
    pred_cat = panoptic_category_map(pred_ids, pair.pred_ann["segments_info"])
    acc = OverlapAccumulator()
    acc.add(pred_cat, gt_cat)
    votes = None
    if stuff_vote_ignore is not None:
        votes = stuff_votes(pred_cat, gt_cat, pred_ignore=stuff_vote_ignore[0], gt_ignore=stuff_vote_ignore[1])
    if not sample:
        return acc, votes, None
    image = _source_image(pair, gt_cat.shape, image_storage_options, retry_s)
    return acc, votes, _downsized_sample(pair.stem, image, gt_cat, pred_cat)


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


def _instance_evidence(evaluate_cfg: EvaluateConfig, storage_options: Mapping[str, Any], retry_s: float,
                       labels: LabelSet, join: Join) -> _Instances | None:
    """Gt instances of the joined images and the predictions on their ids; None when none are configured.

    Prediction image ids are renumbered to the gt instances file's ids (joined by stem as well: its ids
    need not be the panoptic file's).
    """
    if not evaluate_cfg.gt_instances_json:
        return None
    pred = labels.instances_dict()
    gt = read_json_input(evaluate_cfg.gt_instances_json, storage_options, retry_s)
    gt_by_stem = stem_index(gt)
    pred_to_gt = {p.pred_image["id"]: gt_by_stem[p.stem] for p in join.pairs if p.stem in gt_by_stem}
    keep = set(pred_to_gt.values())
    gt_sub = {"images": [im for im in gt["images"] if im["id"] in keep],
              "annotations": [a for a in gt.get("annotations", []) if a["image_id"] in keep],
              "categories": gt["categories"]}
    preds = [{**a, "image_id": pred_to_gt[a["image_id"]], "score": float(a.get("score", 1.0))}
             for a in pred.get("annotations", []) if a["image_id"] in pred_to_gt]
    if not gt_sub["annotations"]:
        log.warning("evaluate: no gt instance on the evaluated images; instance AP skipped")
        return _Instances(None, preds, "no ground-truth instance on the evaluated images")
    return _Instances(gt_sub, preds)


def _instance_block(ev: _Evidence, mapping: Mapping[int, int], *, iou_types: Sequence[str],
                    agnostic: bool) -> dict[str, Any] | None:
    """AP/AR after mapping (class-aware) and, with ``agnostic``, class-agnostic; None without gt instances."""
    inst = ev.instances
    if inst is None:
        return None
    if inst.gt is None:
        return {"skipped": inst.skipped}
    inst_cats = {int(c["id"]) for c in inst.gt["categories"]}
    inst_mapping = {p: g for p, g in mapping.items() if g in inst_cats}
    out: dict[str, Any] = {"images": len(inst.gt["images"]), "predictions": len(inst.preds),
                           "class_aware": instance_metrics(inst.gt, inst.preds, mapping=inst_mapping,
                                                           iou_types=iou_types)}
    if agnostic:
        out["class_agnostic"] = instance_metrics(inst.gt, inst.preds, class_agnostic=True, iou_types=iou_types)
    return out
