"""Self-training rounds: predict with round R-1, merge confident predictions into the labels, train R.

The merged label set of round R lives at ``selftrain/round-R/`` in the label format. Per image: the
previous pseudo things stay (they win overlaps), predicted things scoring >= ``train.score_threshold``
that do not duplicate a previous thing (mask IoU > ``train.dedup_iou``) are added, the previous stuff
map is kept under them.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np

from u2seg.config import U2SegConfig
from u2seg.io import RunRoot

log = logging.getLogger(__name__)


def label_dir_for_round(r: int) -> str:
    return "labels" if r == 0 else f"selftrain/round-{r}"


def merge_image(old_seg: np.ndarray, old_segs: list[dict], new_seg: np.ndarray, new_segs: list[dict], *,
                k_things: int, k_stuff: int, score_threshold: float, dedup_iou: float, min_stuff_area: float,
                min_thing_area: int) -> tuple[Any, int]:
    """One image's merged panoptic label and how many predicted things were added."""
    from u2seg.labels import panoptic_merge

    stuff = np.full(old_seg.shape, -1, np.int32)
    masks, classes, scores = [], [], []
    for s in old_segs:
        m = old_seg == s["id"]
        if s["category_id"] > k_things:
            stuff[m] = s["category_id"] - k_things - 1
        else:
            masks.append(m)
            classes.append(s["category_id"] - 1)
            scores.append(2.0)  # previous pseudo-labels outrank predictions where they overlap
    n_old_things = len(masks)
    added = 0
    for s in new_segs:
        if s["category_id"] > k_things or s.get("score", 0.0) < score_threshold:
            continue
        m = new_seg == s["id"]
        inter = [np.logical_and(m, o).sum() / max(np.logical_or(m, o).sum(), 1) for o in masks[:n_old_things]]
        if inter and max(inter) > dedup_iou:
            continue
        masks.append(m)
        classes.append(s["category_id"] - 1)
        scores.append(float(s["score"]))
        added += 1
    result = panoptic_merge(masks, classes, scores, stuff, k_things=k_things, k_stuff=k_stuff,
                            min_stuff_area=min_stuff_area, min_thing_area=min_thing_area)
    return result, added


def build_round_labels(cfg: U2SegConfig, root: RunRoot, r: int) -> dict[str, Any]:
    """selftrain/round-r = labels of round r-1 merged with predict/round-(r-1)."""
    from u2seg.labels import decode_panoptic_png
    from u2seg.pipeline.cluster import load_npy
    from u2seg.pipeline.label import merge_label_parts
    from u2seg.pipeline.predict import write_image_labels

    prev, pred, out = label_dir_for_round(r - 1), f"predict/round-{r - 1}", label_dir_for_round(r)
    k_things = len(load_npy(root, "cluster/things.npy"))
    k_stuff = len(load_npy(root, "cluster/stuff.npy"))
    pred_anns: dict[str, dict] = {}
    for name in root.list(f"{pred}/_parts", ".json"):
        part = json.loads(root.read_bytes(f"{pred}/_parts/{name}"))
        by_id = {i["id"]: i for i in part["images"]}
        for a in part["panoptic"]:
            pred_anns[by_id[a["image_id"]]["u2seg_image_id"]] = a
    root.remove(out, recursive=True)
    added_total = 0
    for name in root.list(f"{prev}/_parts", ".json"):
        part = json.loads(root.read_bytes(f"{prev}/_parts/{name}"))
        new_part: dict[str, list] = {"images": [], "panoptic": [], "instances": []}
        anns = {a["image_id"]: a for a in part["panoptic"]}
        for img in part["images"]:
            hex_id, ann = img["u2seg_image_id"], anns[img["id"]]
            old_seg = decode_panoptic_png(root.read_bytes(f"{prev}/panoptic/{ann['file_name']}"))
            p = pred_anns.get(hex_id)
            new_seg = (decode_panoptic_png(root.read_bytes(f"{pred}/panoptic/{p['file_name']}"))
                       if p else np.zeros_like(old_seg))
            result, added = merge_image(old_seg, ann["segments_info"], new_seg, p["segments_info"] if p else [],
                                        k_things=k_things, k_stuff=k_stuff, score_threshold=cfg.train.score_threshold,
                                        dedup_iou=cfg.train.dedup_iou, min_stuff_area=cfg.label.min_stuff_area,
                                        min_thing_area=cfg.label.min_thing_area)
            added_total += added
            i, a, inst = write_image_labels(root, out, hex_id, img["uri"], result.seg_ids, result.segments_info,
                                            k_things, k_stuff, {})
            new_part["images"].append(i)
            new_part["panoptic"].append(a)
            new_part["instances"].extend(inst)
        root.write_json(f"{out}/_parts/{name}", new_part, indent=None)
    merged = merge_label_parts(root, out, k_things, k_stuff, f"u2seg self-training labels, round {r}")
    log.info("selftrain round %d: %d predicted things added to the labels", r, added_total)
    return {"round": r, "added_things": added_total, **merged}


def self_training_rounds(cfg: U2SegConfig, root: RunRoot, *, start_round: int, rounds: int) -> list[dict]:
    """For r in start..start+rounds-1: predict with r-1, relabel, train r. Finished rounds are kept."""
    from u2seg.pipeline.predict import run_predict
    from u2seg.pipeline.train import final_model_rel, run_train_round

    out = []
    for r in range(start_round, start_round + rounds):
        if root.exists(final_model_rel(r)):
            log.info("selftrain: round %d already trained, kept", r)
            continue
        pred = run_predict(cfg, root, r - 1)
        relabel = build_round_labels(cfg, root, r)
        stats = run_train_round(cfg, root, r, label_dir_for_round(r))
        out.append({**stats, "predicted_images": pred["images"], "added_things": relabel["added_things"]})
    if rounds >= 0:
        last = start_round + rounds - 1
        if last >= 0 and root.exists(final_model_rel(last)) and not root.exists(f"predict/round-{last}/panoptic.json"):
            run_predict(cfg, root, last)  # the final model's predictions, for evaluate target=model
    return out


def run_selftrain(cfg: U2SegConfig, rounds: int | None = None) -> dict[str, Any]:
    """`u2seg selftrain --rounds R`: R more rounds after the latest trained one."""
    from u2seg.pipeline.runner import ensure_ray, open_root
    from u2seg.pipeline.train import latest_round

    ensure_ray(cfg)
    root = open_root(cfg)
    start = latest_round(root) + 1
    if start == 0:
        raise FileNotFoundError(f"no trained round in {root.uri}: run `u2seg train` first")
    return {"rounds": self_training_rounds(cfg, root, start_round=start, rounds=cfg.train.rounds if rounds is None
                                           else rounds)}
