"""The extract stage's workers: fetch + decode on CPU tasks, backbone + MaskCut in an actor pool."""

from __future__ import annotations

import logging
import pickle
from typing import Any

import cv2
import numpy as np

from u2seg.config import U2SegConfig, resolve_device
from u2seg.io.inputs import InputUnreachableError, read_input

log = logging.getLogger(__name__)


def working_copy(image: np.ndarray, max_side: int) -> np.ndarray:
    """The image downscaled (area) so its longer side is at most ``max_side`` (0 or smaller: unchanged)."""
    h, w = image.shape[:2]
    if max_side <= 0 or max(h, w) <= max_side:
        return image
    s = max_side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def decode_batch(batch: dict[str, np.ndarray], storage_options: dict[str, Any], retry_s: float = 0.0,
                 max_side: int = 0) -> dict[str, np.ndarray]:
    """Fetch and decode on CPU tasks; a bad image becomes a row with ok=False and the reason.

    What crosses the object store to the actor is the image's working copy (``max_side``; its full size in
    ``height``/``width``), not a full-resolution array. An input unreachable through a storage outage fails
    the task (Ray retries it; a rerun resumes): it is not the image's fault, so it never becomes an error row.
    """
    from u2seg.io.images import decode_image

    n = len(batch["uri"])
    out: dict[str, list] = {k: [] for k in ("image_id", "uri", "version", "ok", "error_class", "message", "image",
                                            "height", "width")}
    for i in range(n):
        uri = str(batch["uri"][i])
        out["image_id"].append(str(batch["image_id"][i]))
        out["uri"].append(uri)
        out["version"].append(str(batch["version"][i]))
        try:
            image = decode_image(read_input(uri, storage_options, retry_s))
            out["height"].append(image.shape[0])
            out["width"].append(image.shape[1])
            out["image"].append(working_copy(image, max_side))
            out["ok"].append(True)
            out["error_class"].append("")
            out["message"].append("")
        except InputUnreachableError:
            raise
        except Exception as exc:  # any other failure of one image must not stop the job
            reason = getattr(exc, "reason", None)
            out["ok"].append(False)
            out["error_class"].append(type(exc).__name__ + (f":{reason}" if reason else ""))
            out["message"].append(str(exc)[:2000])
            out["image"].append(np.zeros((1, 1, 3), np.uint8))
            out["height"].append(-1)
            out["width"].append(-1)
            log.warning("extract: %s failed to load: %s", uri, exc)
    images = np.empty(n, dtype=object)
    images[:] = out.pop("image")
    return {**{k: np.array(v) for k, v in out.items()}, "image": images}


class MaskCutActor:
    """Holds the backbone (and the stuff head) on its device; turns a batch of decoded images into per-image
    results."""

    def __init__(self, cfg_dict: dict[str, Any], stuff_head: bytes | None = None):
        import torch

        from u2seg.config import config_from_dict
        from u2seg.features.backbone import build_backbone

        self.cfg = config_from_dict(cfg_dict)
        extract_cfg = self.cfg.extract
        self.device = torch.device(resolve_device(self.cfg.run.device))
        torch.manual_seed(self.cfg.run.seed)
        self.model = build_backbone(extract_cfg.backbone, extract_cfg.weights, image_size=extract_cfg.image_size,
                                    seed=self.cfg.run.seed, storage_options=self.cfg.run.storage.storage_options()
                                    ).to(self.device).eval()
        self.stuff_head = None
        if stuff_head is not None:
            from u2seg.pipeline.stuff import load_head

            self.stuff_head = load_head(stuff_head).to(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return run_model_batch(self.model, batch, self.cfg, self.device, self.stuff_head)


def run_model_batch(model: Any, batch: dict[str, np.ndarray], cfg: U2SegConfig, device: Any,
                    stuff_head: Any = None) -> dict[str, np.ndarray]:
    """Backbone + MaskCut on the decodable images of a batch; images that failed to decode pass through as
    errors. A failing model call is split down to single images (``batch_retry.call_per_item``): only an
    image failing alone with an error of its own becomes an error row; out-of-memory and device errors are
    retried and then fail the task."""
    from u2seg.features.pooling import sample_grid_cells
    from u2seg.maskcut.process import image_seed, process_batch
    from u2seg.pipeline.batch_retry import ItemFailure, call_per_item

    extract_cfg = cfg.extract
    n = len(batch["uri"])
    ok = [bool(x) for x in batch["ok"]]
    err = [str(x) for x in batch["error_class"]]
    msg = [str(x) for x in batch["message"]]
    ok_idx = [i for i in range(n) if ok[i]]
    # (working copy, full (H, W)): decode sends a downscaled copy of large images (extract.max_side)
    items = [(batch["image"][i], (int(batch["height"][i]), int(batch["width"][i])) if "height" in batch
              else batch["image"][i].shape[:2]) for i in ok_idx]
    kmeans_stuff = stuff_head is None

    def model_call(chunk: list[tuple[np.ndarray, tuple[int, int]]]) -> list[Any]:
        return process_batch(model, [img for img, _ in chunk], image_size=extract_cfg.image_size,
                             tau=extract_cfg.tau, n_masks=extract_cfg.n_masks, solver=extract_cfg.solver,
                             refine=extract_cfg.refine, patches_per_image=0, amp=extract_cfg.amp, seed=cfg.run.seed,
                             stuff=(extract_cfg.stuff_grid, extract_cfg.stuff_dim) if kmeans_stuff else None,
                             stuff_head=stuff_head, descriptor=extract_cfg.descriptor,
                             crop_context=extract_cfg.crop_context, crop_size=extract_cfg.crop_size,
                             full_sizes=[size for _, size in chunk])

    results: dict[int, Any] = {}
    for i, out in zip(ok_idx, call_per_item(model_call, items, what="extract model"), strict=True):
        if isinstance(out, ItemFailure):
            ok[i], err[i], msg[i] = False, out.error_class, f"model failure: {out.error}"[:2000]
        else:
            results[i] = out
    payload = []
    for i in range(n):
        r = results.get(i)
        if r is None:
            payload.append(b"")
            continue
        result = {"height": r.height, "width": r.width, "masks": r.masks, "timings": r.timings}
        if r.stuff_classes is not None:
            result["stuff_classes"] = r.stuff_classes
        else:
            feats, rows, cols = sample_grid_cells(r.stuff_grid, extract_cfg.patches_per_image,
                                                  image_seed(batch["image"][i], cfg.run.seed))
            result.update(stuff_grid=r.stuff_grid.numpy(), patches=(feats.numpy(), rows.numpy(), cols.numpy()))
        payload.append(pickle.dumps(result, protocol=5))
    return {"image_id": batch["image_id"], "uri": batch["uri"], "version": batch["version"], "ok": np.array(ok),
            "error_class": np.array(err, dtype=object), "message": np.array(msg, dtype=object),
            "result": np.array(payload, dtype=object)}
