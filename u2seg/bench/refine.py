"""Does the guided refinement help? Raw vs refined MaskCut masks against exact instance ground truth.

On the synthetic world (exact instance labels), MaskCut runs twice through ``process_batch``, once with
``refine="none"`` and once with ``refine="guided"``. Each mask is scored by its IoU with the best-matching
ground-truth thing instance (and, separately, with any segment, stuff included). Each raw mask is also
refined alone, which tells exactly whether CutLER's drop (IoU(refined, raw) < 0.5 -> mask dropped) fired
for it, so raw and refined masks can be compared pairwise on the masks that survive.

With random-init weights (no weights are downloaded) the masks are whatever a random ViT separates:
the numbers check the plumbing and the refinement's effect on boundaries, not segmentation quality.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Any

import numpy as np
import torch

from u2seg.data.world import CATEGORIES, render_scene
from u2seg.features import build_backbone, patch_size
from u2seg.labels.masks import decode_mask
from u2seg.maskcut.process import process_batch
from u2seg.maskcut.refine import REFINE_IOU_DROP, refine_masks

logger = logging.getLogger(__name__)

_THING_IDS = {c.id for c in CATEGORIES if c.isthing}


def best_match_ious(masks: np.ndarray, segment_map: np.ndarray, segment_ids: list[int]) -> np.ndarray:
    """For each mask [m, H, W], the largest IoU with any of the listed segments of ``segment_map``.

    0 when no segment is listed or none overlaps. One bincount over (mask pixel, segment id) pairs
    gives every intersection, so the cost is one pass over each mask.
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3 or masks.shape[1:] != segment_map.shape:
        raise ValueError(f"masks {masks.shape} do not match segment_map {segment_map.shape}")
    out = np.zeros(masks.shape[0], np.float64)
    if not segment_ids or masks.shape[0] == 0:
        return out
    n_ids = int(segment_map.max()) + 1
    seg_area = np.bincount(segment_map.ravel(), minlength=n_ids)
    ids = np.asarray(segment_ids, dtype=np.int64)
    for k, mask in enumerate(masks):
        inter = np.bincount(segment_map[mask], minlength=n_ids)[ids]
        union = seg_area[ids] + int(mask.sum()) - inter
        out[k] = float(np.max(np.where(union > 0, inter / np.maximum(union, 1), 0.0)))
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int((a | b).sum())
    return float((a & b).sum()) / union if union else 0.0


def _decode(result: Any) -> np.ndarray:
    if not result.masks:
        return np.zeros((0, result.height, result.width), bool)
    return np.stack([decode_mask(m["rle"]) for m in result.masks])


def _image_record(model: torch.nn.Module, scene: Any, *, image_size: int, n_masks: int, amp: str,
                  seed: int) -> dict[str, Any]:
    """Both refine modes on one scene -> per-mask numbers (lists) and the two process_batch times."""
    img = scene.image
    times = {}
    out = {}
    for mode in ("none", "guided"):
        t0 = time.perf_counter()
        (res,) = process_batch(model, [img], image_size=image_size, n_masks=n_masks, refine=mode,
                               patches_per_image=0, amp=amp, seed=seed)
        times[mode] = time.perf_counter() - t0
        out[mode] = _decode(res)
    raw, guided = out["none"], out["guided"]
    # process_batch's refinement radius (about one patch in image pixels), to refine each mask alone.
    ph, pw = patch_size(model)
    H, W = img.shape[:2]
    radius = max(2, round(max(ph * H, pw * W) / image_size))
    alone = [refine_masks(torch.from_numpy(m[None]), img, "guided", radius=radius)[0].numpy() for m in raw]
    dropped = [not a.any() for a in alone]
    # The guided output is the surviving raw masks in cut order, less pixels a mask lost to an earlier
    # one's refined overlap; pair them in order when the counts agree, else by best IoU.
    survivors = [k for k, d in enumerate(dropped) if not d]
    if len(survivors) == guided.shape[0]:
        pairs = list(zip(survivors, range(guided.shape[0]), strict=True))
    else:
        pairs = [(max(survivors, key=lambda k, g=g: _iou(raw[k], g)), j) for j, g in enumerate(guided)] \
            if survivors else []
    things = [s.id for s in scene.segments if s.category_id in _THING_IDS]
    every = [s.id for s in scene.segments]
    seg = scene.segment_map
    return {
        "raw_iou_things": best_match_ious(raw, seg, things).tolist(),
        "guided_iou_things": best_match_ious(guided, seg, things).tolist(),
        "raw_iou_any": best_match_ious(raw, seg, every).tolist(),
        "guided_iou_any": best_match_ious(guided, seg, every).tolist(),
        "dropped": dropped,
        "refined_vs_raw_iou": [_iou(a, m) for a, m in zip(alone, raw, strict=True)],
        "pairs": pairs,
        "n_gt_things": len(things),
        "consistent": len(survivors) == guided.shape[0],
        "time_none_s": times["none"],
        "time_guided_s": times["guided"],
    }


def _mean(v: list[float]) -> float | None:
    return round(float(np.mean(v)), 4) if v else None


def _summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    cat = lambda key: [x for r in records for x in r[key]]  # noqa: E731
    dropped = cat("dropped")
    raw_t, raw_a = cat("raw_iou_things"), cat("raw_iou_any")
    paired_raw = [r["raw_iou_things"][k] for r in records for k, _ in r["pairs"]]
    paired_ref = [r["guided_iou_things"][j] for r in records for _, j in r["pairs"]]
    paired_raw_any = [r["raw_iou_any"][k] for r in records for k, _ in r["pairs"]]
    paired_ref_any = [r["guided_iou_any"][j] for r in records for _, j in r["pairs"]]
    gains = np.asarray(paired_ref) - np.asarray(paired_raw)
    return {
        "images": len(records),
        "gt_thing_instances": sum(r["n_gt_things"] for r in records),
        "raw_masks": len(raw_t),
        "guided_masks": len(cat("guided_iou_things")),
        "drop_fired": int(sum(dropped)),
        "drop_rate": round(sum(dropped) / len(dropped), 4) if dropped else None,
        "mean_refined_vs_raw_iou": _mean(cat("refined_vs_raw_iou")),
        "iou_things": {
            "raw_all": _mean(raw_t),
            "guided_all": _mean(cat("guided_iou_things")),
            "raw_dropped": _mean([v for v, d in zip(raw_t, dropped, strict=True) if d]),
            "raw_kept_paired": _mean(paired_raw),
            "guided_kept_paired": _mean(paired_ref),
            "paired_gain": _mean(gains.tolist()),
            "paired_improved_fraction": _mean((gains > 0).astype(float).tolist()),
        },
        "iou_any_segment": {
            "raw_all": _mean(raw_a),
            "guided_all": _mean(cat("guided_iou_any")),
            "raw_kept_paired": _mean(paired_raw_any),
            "guided_kept_paired": _mean(paired_ref_any),
        },
        "pairing_by_order": all(r["consistent"] for r in records),
        "seconds_per_image": {"refine_none": _mean([r["time_none_s"] for r in records]),
                              "refine_guided": _mean([r["time_guided_s"] for r in records])},
    }


def bench_refine(n_images: int = 40, image_size: int = 480, backbone: str = "vit_small_patch8_224.dino",
                 n_masks: int = 3, seed: int = 0) -> dict[str, Any]:
    """MaskCut raw vs guided-refined masks on ``n_images`` synthetic scenes rendered at image_size^2."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = "bf16" if device.type == "cuda" else "none"
    model = build_backbone(backbone, "none", image_size=image_size, seed=seed).to(device)
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n_images):
        scene = render_scene(rng, image_size, image_size)
        with torch.no_grad():
            records.append(_image_record(model, scene, image_size=image_size, n_masks=n_masks, amp=amp, seed=seed))
        logger.info("image %d/%d: dropped %s", i + 1, n_images, records[-1]["dropped"])
    return {
        "config": {"n_images": n_images, "image_size": image_size, "backbone": backbone, "weights": "random-init",
                   "n_masks": n_masks, "seed": seed, "device": str(device), "amp": amp,
                   "refine_iou_drop": REFINE_IOU_DROP},
        **_summary(records),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n-images", type=int, default=40)
    parser.add_argument("--image-size", type=int, default=480)
    parser.add_argument("--backbone", default="vit_small_patch8_224.dino")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    result = bench_refine(args.n_images, args.image_size, args.backbone, seed=args.seed)
    logger.info("result %s", json.dumps(result))
    return result


if __name__ == "__main__":
    main()
