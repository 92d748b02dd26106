"""Per-batch work of the extract actors and the conversion of results into the run root's tables."""

from __future__ import annotations

import logging
import pickle
from typing import Any

import numpy as np

from u2seg.config import U2SegConfig

log = logging.getLogger(__name__)


def run_model_batch(model: Any, batch: dict[str, np.ndarray], cfg: U2SegConfig, device: Any) -> dict[str, np.ndarray]:
    """Backbone + MaskCut on the decodable images of a batch; failed images pass through as errors."""
    from u2seg.features.pooling import sample_grid_cells
    from u2seg.maskcut.process import image_seed, process_batch

    ex = cfg.extract
    n = len(batch["uri"])
    ok = [bool(x) for x in batch["ok"]]
    err = [str(x) for x in batch["error_class"]]
    msg = [str(x) for x in batch["message"]]
    ok_idx = [i for i in range(n) if ok[i]]
    images = [batch["image"][i] for i in ok_idx]
    results: dict[int, Any] = {}
    if images:
        try:
            out = process_batch(model, images, image_size=ex.image_size, tau=ex.tau, n_masks=ex.n_masks,
                                solver=ex.solver, refine=ex.refine, patches_per_image=0, amp=ex.amp,
                                seed=cfg.run.seed, stuff=(ex.stuff_grid, ex.stuff_dim))
            results = dict(zip(ok_idx, out, strict=True))
        except Exception as exc:  # a batch-level failure (e.g. OOM) becomes per-image errors, not a crash
            log.exception("extract: batch of %d failed in the model", len(images))
            for i in ok_idx:
                ok[i], err[i], msg[i] = False, type(exc).__name__, f"model failure: {exc}"[:2000]
    payload = []
    for i in range(n):
        r = results.get(i)
        if r is None:
            payload.append(b"")
            continue
        grid = r.stuff_grid
        feats, rows, cols = sample_grid_cells(grid, ex.patches_per_image, image_seed(batch["image"][i], cfg.run.seed))
        payload.append(pickle.dumps({
            "height": r.height, "width": r.width, "masks": r.masks, "timings": r.timings,
            "stuff_grid": grid.numpy(), "patches": (feats.numpy(), rows.numpy(), cols.numpy()),
        }, protocol=5))
    return {"image_id": batch["image_id"], "uri": batch["uri"], "ok": np.array(ok),
            "error_class": np.array(err, dtype=object), "message": np.array(msg, dtype=object),
            "result": np.array(payload, dtype=object)}


def rows_for_tables(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """Rows of the masks, patches, errors and images (ledger) tables for one group of results."""
    masks, patches, errors, images = [], [], [], []
    timings: dict[str, float] = {}
    for i in range(len(batch["image_id"])):
        image_id, uri = str(batch["image_id"][i]), str(batch["uri"][i])
        blob = batch["result"][i]
        if not batch["ok"][i] or not blob:
            errors.append({"image_id": image_id, "uri": uri, "stage": "extract",
                           "error_class": str(batch["error_class"][i]) or "Error", "message": str(batch["message"][i])})
            images.append({"image_id": image_id, "uri": uri, "status": "error", "width": -1, "height": -1,
                           "n_masks": 0, "grid_h": 0, "grid_w": 0, "stuff_grid": [], "stuff_dim": 0})
            continue
        r = pickle.loads(blob)
        for m in r["masks"]:
            masks.append({"image_id": image_id, "mask_id": m["mask_id"], "rle": m["rle"], "bbox": m["bbox"],
                          "area": int(m["area"]), "score": float(m["score"]), "descriptor": m["descriptor"],
                          "image_width": r["width"], "image_height": r["height"]})
        feats, rows, cols = r["patches"]
        for f, rr, cc in zip(feats, rows, cols, strict=True):
            patches.append({"image_id": image_id, "feature": f, "row": int(rr), "col": int(cc)})
        grid = r["stuff_grid"]
        images.append({"image_id": image_id, "uri": uri, "status": "ok", "width": r["width"], "height": r["height"],
                       "n_masks": len(r["masks"]), "grid_h": grid.shape[0], "grid_w": grid.shape[1],
                       "stuff_grid": grid.reshape(-1), "stuff_dim": grid.shape[2]})
        for k, v in r["timings"].items():
            timings[k] = timings.get(k, 0.0) + v
    return {"masks": masks, "patches": patches, "errors": errors, "images": images, "timings": timings}
