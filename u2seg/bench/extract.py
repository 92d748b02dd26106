"""Extract throughput split into phases: decode, backbone, MaskCut, refinement, write.

The per-image work of one extract actor is timed on the synthetic world (no Ray, so the numbers are
the work itself, not scheduling), in the same run: refinement off and on (the ratio is what the guided
refinement costs), mask-pooled against object-crop CLS descriptors (the ratio is what U2Seg's second
backbone pass over each mask's crop costs), plus fused (SDPA) against explicit attention for the backbone,
and the bytes per image a decode task hands the object store with and without the working copy
(``extract.max_side``).
"""

from __future__ import annotations

import io
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from u2seg.data.synthetic import make_synthetic
from u2seg.features.backbone import build_backbone, extract_features, preprocess, set_fused_attention
from u2seg.io.images import decode_image
from u2seg.io.schemas import MASKS_SCHEMA
from u2seg.maskcut.process import process_batch


def _phase_run(model: torch.nn.Module, images: list[np.ndarray], blobs: list[bytes], *, image_size: int,
               refine: str, batch_size: int, amp: str, descriptor: str = "mask_pool") -> dict[str, Any]:
    phases = {"decode": 0.0, "backbone": 0.0, "maskcut": 0.0, "refine": 0.0, "descriptor": 0.0, "write": 0.0}
    t_all = time.perf_counter()
    for start in range(0, len(blobs), batch_size):
        t0 = time.perf_counter()
        batch = [decode_image(b) for b in blobs[start:start + batch_size]]
        phases["decode"] += time.perf_counter() - t0
        with torch.no_grad():
            res = process_batch(model, batch, image_size=image_size, refine=refine, patches_per_image=64,
                                amp=amp, stuff=(32, 32), descriptor=descriptor)
        for r in res:
            phases["backbone"] += r.timings["backbone_s"]
            phases["maskcut"] += r.timings["maskcut_s"]
            phases["refine"] += r.timings["refine_s"]
            phases["descriptor"] += r.timings.get("descriptor_s", 0.0)
        t1 = time.perf_counter()
        rows = [{"image_id": str(i), "mask_id": m["mask_id"], "rle": m["rle"], "bbox": m["bbox"],
                 "area": m["area"], "score": m["score"], "descriptor": m["descriptor"],
                 "image_width": r.width, "image_height": r.height} for i, r in enumerate(res) for m in r.masks]
        pq.write_table(pa.Table.from_pylist(rows, schema=MASKS_SCHEMA), io.BytesIO(), compression="zstd")
        phases["write"] += time.perf_counter() - t1
    wall = time.perf_counter() - t_all
    n = len(blobs)
    return {"images_per_s": round(n / wall, 3), "wall_s": round(wall, 3),
            "seconds_per_image": {k: round(v / n, 4) for k, v in phases.items()}}


def decode_traffic(sizes: tuple[tuple[int, int], ...] = ((640, 480), (2048, 1536), (4032, 3024)),
                   max_side: int = 1024, seed: int = 0) -> dict[str, Any]:
    """Bytes per image that cross the object store from a decode task to the MaskCut actors: the pickled output
    of ``decode_batch`` (what Ray stores) with full-resolution arrays (``max_side=0``) and with the working copy."""
    import pickle

    import cv2

    from u2seg.pipeline.extract_actor import decode_batch

    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"max_side": max_side}
    with tempfile.TemporaryDirectory() as tmp:
        for w, h in sizes:
            small = rng.integers(0, 256, (max(1, h // 16), max(1, w // 16), 3), dtype=np.uint8)
            path = Path(tmp, f"{w}x{h}.jpg")
            cv2.imwrite(str(path), cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR))
            batch = {"uri": np.array([str(path)]), "image_id": np.array(["x"]), "version": np.array(["v"])}
            full, copy = (len(pickle.dumps(decode_batch(batch, {}, max_side=m), protocol=5)) for m in (0, max_side))
            out[f"{w}x{h}"] = {"full_resolution_bytes": full, "working_copy_bytes": copy,
                               "ratio": round(full / copy, 2), "jpeg_bytes": path.stat().st_size}
    return out


def bench_extract(n_images: int = 16, image_size: int = 480, backbone: str = "vit_small_patch8_224.dino",
                  batch_size: int = 4, seed: int = 0) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = "bf16" if device.type == "cuda" else "none"
    with tempfile.TemporaryDirectory() as tmp:
        make_synthetic(tmp, n_images, seed=seed, min_size=320, max_size=640)
        blobs = [p.read_bytes() for p in sorted(Path(tmp, "images").iterdir())]
    model = build_backbone(backbone, "none", image_size=image_size, seed=seed).to(device).eval()
    images = [decode_image(b) for b in blobs]
    process_batch(model, images[:1], image_size=image_size, refine="none", patches_per_image=0, amp=amp)  # warm
    plain = _phase_run(model, images, blobs, image_size=image_size, refine="none", batch_size=batch_size, amp=amp)
    refined = _phase_run(model, images, blobs, image_size=image_size, refine="guided", batch_size=batch_size,
                         amp=amp)
    crop_cls = _phase_run(model, images, blobs, image_size=image_size, refine="none", batch_size=batch_size,
                          amp=amp, descriptor="crop_cls")
    x = preprocess(images[:batch_size], image_size).to(device)
    timings = {}
    for fused in (True, False):
        set_fused_attention(model, fused)
        with torch.no_grad():
            extract_features(model, x, amp=amp)
            t0 = time.perf_counter()
            for _ in range(2):
                extract_features(model, x, amp=amp)
            if device.type == "cuda":
                torch.cuda.synchronize()
        timings["fused" if fused else "explicit"] = (time.perf_counter() - t0) / (2 * len(x))
    set_fused_attention(model, True)
    return {
        "config": {"n_images": n_images, "image_size": image_size, "backbone": backbone, "n_masks": 3,
                   "batch_size": batch_size, "device": str(device), "amp": amp},
        "refine_none": plain, "refine_guided": refined, "descriptor_crop_cls": crop_cls,
        "refine_cost_ratio": round(plain["images_per_s"] / refined["images_per_s"], 3),
        # seconds per image with U2Seg's object-crop CLS descriptors over the mask-pooled ones (refine none)
        "crop_cls_cost_ratio": round(plain["images_per_s"] / crop_cls["images_per_s"], 3),
        "backbone_s_per_image": {k: round(v, 4) for k, v in timings.items()},
        "sdpa_speedup": round(timings["explicit"] / timings["fused"], 3),
        "decode_to_actor_bytes_per_image": decode_traffic(),
    }
