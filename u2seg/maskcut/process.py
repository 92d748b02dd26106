"""The extract stage's per-batch work: images -> MaskCut masks, descriptors and sampled patch features.

Pure torch/numpy (no Ray): the pipeline's actors call `process_batch` on their device.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from u2seg.features import extract_features, patch_size, preprocess
from u2seg.features.pooling import pooled_stuff_grid
from u2seg.labels.masks import encode_masks
from u2seg.maskcut.core import maskcut_detailed
from u2seg.maskcut.crops import crop_cls_descriptors, mask_boxes, object_crops
from u2seg.maskcut.descriptors import mask_descriptors, sample_patch_features
from u2seg.maskcut.refine import refine_masks, upsample_masks


@dataclass
class ImageResult:
    """Everything extract writes for one image.

    masks: one dict per kept mask, mask_id 0..m-1 in cut order: {"mask_id": int, "rle": {"size": [H, W],
      "counts": str}, "bbox": [x, y, w, h], "area": int, "score": float, "descriptor": list[float]}.
      score = 1 - Ncut/2 of the patch-level cut in its affinity graph (1 = perfectly separated).
    patches: {"feature": np.ndarray float32 [D], "row": int, "col": int} on the patch grid.
    timings: this image's share of the batch's backbone_s / maskcut_s (batch time / B) and its own
      refine_s (upsample + refine + RLE + descriptors).
    """

    height: int
    width: int
    masks: list[dict] = field(default_factory=list)
    patches: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    stuff_grid: torch.Tensor | None = None  # [gh, gw, dim] float16, when process_batch(stuff=...)
    stuff_classes: np.ndarray | None = None  # [h, w] uint8 stuff class per patch, when process_batch(stuff_head=...)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def image_seed(image: np.ndarray, seed: int) -> int:
    """A per-image seed from the run seed and a cheap content hash (batch-composition independent)."""
    sub = np.ascontiguousarray(image[::7, ::7])
    shape_crc = zlib.crc32(np.asarray(image.shape, np.int64).tobytes(), seed & 0xFFFFFFFF)
    return zlib.crc32(sub.tobytes(), shape_crc)


def _descriptors(tokens: torch.Tensor, full: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """Descriptors of final full-resolution masks [m,H,W]; weights = fraction of each patch covered."""
    if full.shape[0] == 0:
        return np.zeros((0, tokens.shape[-1]), np.float32)
    weights = F.interpolate(full[None].float(), size=grid, mode="area")
    return mask_descriptors(tokens, weights, grid)[0].cpu().numpy()


def process_batch(
    model: nn.Module,
    images_uint8: list[np.ndarray],
    *,
    image_size: int = 480,
    tau: float = 0.15,
    n_masks: int = 3,
    solver: str = "lanczos",
    refine: str = "guided",
    patches_per_image: int = 256,
    amp: str = "bf16",
    seed: int = 0,
    stuff: tuple[int, int] | None = None,
    stuff_head: nn.Module | None = None,
    descriptor: str = "mask_pool",
    crop_context: float = 0.1,
    crop_size: int = 224,
    full_sizes: Sequence[tuple[int, int]] | None = None,
) -> list[ImageResult]:
    """Preprocess, backbone, MaskCut, upsample to each image's size, refine, RLE, descriptors, patches.

    ``stuff=(grid, dim)`` also returns each image's pooled, projected stuff grid (features/pooling.py);
    ``stuff_head`` (a STEGO head, ``u2seg/stuff/stego.py``) each image's stuff class per patch, from the
    same backbone pass. ``descriptor``: "mask_pool" = the mean of the image's tokens under each mask
    (L2-normalised); "crop_cls" = the CLS (after the final norm, not normalised) of a second pass of the
    same backbone over each mask's masked square crop (``maskcut/crops.py``; U2Seg's descriptor), all of the
    batch's crops in batches of ``len(images_uint8)``.

    ``full_sizes``: the images' own (H, W) when ``images_uint8`` are downscaled working copies (extract sends
    the actors no more pixels than refinement needs: ``extract.max_side``): refinement and crops use the
    working copy, and the masks are upsampled to the full size for output.
    """
    if descriptor not in ("mask_pool", "crop_cls"):
        raise ValueError(f"descriptor must be 'mask_pool' or 'crop_cls', got {descriptor!r}")
    B = len(images_uint8)
    if B == 0:
        return []
    device = next(model.parameters()).device
    ph, pw = patch_size(model)
    t0 = time.perf_counter()
    feats = extract_features(model, preprocess(images_uint8, image_size), amp=amp)
    _sync(device)
    t1 = time.perf_counter()
    patch_masks, valid, stats = maskcut_detailed(
        feats.keys, feats.grid, tau=tau, n_masks=n_masks, solver=solver
    )
    _sync(device)
    t2 = time.perf_counter()
    seeds = [image_seed(im, seed) for im in images_uint8]
    patches = sample_patch_features(feats.tokens, patches_per_image, seeds, feats.grid)
    stuff_grids = (pooled_stuff_grid(feats.tokens, feats.grid, stuff[0], stuff[1], seed).cpu()
                   if stuff else None)
    stuff_classes = None
    if stuff_head is not None:
        grid_feats = feats.tokens.transpose(1, 2).reshape(B, -1, *feats.grid)
        with torch.inference_mode():
            stuff_classes = stuff_head.assign(stuff_head.project(grid_feats)).to(torch.uint8).cpu().numpy()
    results = []
    crops: list[torch.Tensor] = []
    for b, img in enumerate(images_uint8):
        tr = time.perf_counter()
        h, w = img.shape[:2]  # the (working) image refinement and crops see
        H, W = (int(full_sizes[b][0]), int(full_sizes[b][1])) if full_sizes is not None else (h, w)
        radius = max(2, round(max(ph * h, pw * w) / image_size))  # ~ one patch in image pixels
        work = upsample_masks(patch_masks[b, valid[b]], (h, w))
        work = refine_masks(work, img, refine, radius=radius)
        kept = work.flatten(1).any(1)
        work = work[kept]
        full = work if (h, w) == (H, W) else upsample_masks(work, (H, W))
        scores = stats.scores[b, valid[b]][kept].tolist()
        anns = encode_masks(full.cpu().numpy())
        if descriptor == "mask_pool":
            desc = _descriptors(feats.tokens[b : b + 1], work, feats.grid)
        else:  # the crops go through the backbone after the loop, the whole batch's at once
            work_np = work.cpu().numpy()
            crops.append(object_crops(img, work_np, mask_boxes(work_np), context=crop_context, crop_size=crop_size))
            desc = np.zeros((len(anns), 0), np.float32)
        masks = [
            {**ann, "mask_id": k, "score": float(scores[k]), "descriptor": desc[k].tolist()}
            for k, ann in enumerate(anns)
        ]
        _sync(device)
        sample = patches[b]
        results.append(ImageResult(
            height=H,
            width=W,
            masks=masks,
            patches=[{"feature": f, "row": int(r), "col": int(c)}
                     for f, r, c in zip(sample["feature"], sample["row"], sample["col"], strict=True)],
            timings={"backbone_s": (t1 - t0) / B, "maskcut_s": (t2 - t1) / B,
                     "refine_s": time.perf_counter() - tr},
            stuff_grid=None if stuff_grids is None else stuff_grids[b],
            stuff_classes=None if stuff_classes is None else stuff_classes[b],
        ))
    if descriptor == "crop_cls":
        td = time.perf_counter()
        cls = crop_cls_descriptors(model, torch.cat(crops), batch_size=max(1, B), amp=amp) if crops else None
        offset = 0
        for r in results:
            for m in r.masks:
                m["descriptor"] = cls[offset].tolist()
                offset += 1
        _sync(device)
        for r in results:
            r.timings["descriptor_s"] = (time.perf_counter() - td) / B
    return results
