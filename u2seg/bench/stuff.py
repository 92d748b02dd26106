"""STEGO stuff-head training throughput: crops per second of one training step, two ways in one run.

With the frozen backbone computing the features of each batch of crops and of their kNN positives on the
fly (what the stuff stage does: nothing of size images x grid x channels is stored), and the head's step
alone on features computed once (what storing features would buy). The ratio says how much of a step the
backbone pass costs. No Ray: the per-worker work itself.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from u2seg.data.synthetic import make_synthetic
from u2seg.features.backbone import build_backbone
from u2seg.io.images import decode_image
from u2seg.pipeline.stuff import crop_batch, feature_maps
from u2seg.stuff.stego import StegoHead, StegoTrainConfig, make_stego_optimizers, stego_train_step


def bench_stuff(steps: int = 6, batch_size: int = 8, crop_size: int = 224, backbone: str = "vit_small_patch8_224.dino",
                seed: int = 0) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = "bf16" if device.type == "cuda" else "none"
    with tempfile.TemporaryDirectory() as tmp:
        make_synthetic(tmp, max(2, batch_size // 2), seed=seed, min_size=320, max_size=480)
        images = [decode_image(p.read_bytes()) for p in sorted(Path(tmp, "images").iterdir())]
    model = build_backbone(backbone, "none", image_size=crop_size, seed=seed).to(device).eval()
    pixels = crop_batch(images, 0.5, crop_size)[: batch_size]  # five crops per image
    positives = pixels.flip(0)
    cfg = StegoTrainConfig(batch_size=batch_size, res=crop_size)
    with torch.no_grad():
        dim = feature_maps(model, pixels[:1], amp).shape[1]
    head = StegoHead(dim, cfg.code_dim, cfg.n_classes, generator=torch.Generator().manual_seed(seed)).to(device)
    optimizers = make_stego_optimizers(head, cfg)

    def step(feats: torch.Tensor, feats_pos: torch.Tensor, i: int) -> None:
        gen = torch.Generator(device=device).manual_seed(seed + i)
        stego_train_step(head, optimizers, feats, feats_pos, loss_cfg=cfg, generator=gen)

    def timed(fn) -> float:
        fn(-1)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(steps):
            fn(i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / steps

    def on_the_fly(i: int) -> None:
        with torch.no_grad():
            feats = feature_maps(model, pixels.to(device), amp).float()
            feats_pos = feature_maps(model, positives.to(device), amp).float()
        step(feats, feats_pos, i)

    with torch.no_grad():
        cached = (feature_maps(model, pixels.to(device), amp).float(), feature_maps(model, positives.to(device),
                                                                                      amp).float())
    fly_s = timed(on_the_fly)
    head_s = timed(lambda i: step(*cached, i))
    crops = 2 * len(pixels)  # each crop and its positive pass the backbone
    return {
        "config": {"steps": steps, "batch_size": len(pixels), "crop_size": crop_size, "backbone": backbone,
                   "feature_grid": list(cached[0].shape[2:]), "device": str(device), "amp": amp},
        "on_the_fly": {"seconds_per_step": round(fly_s, 4), "crops_per_s": round(crops / fly_s, 3)},
        "head_only": {"seconds_per_step": round(head_s, 4), "crops_per_s": round(crops / head_s, 3)},
        "backbone_share_of_a_step": round(1 - head_s / fly_s, 3) if fly_s > 0 else None,
        "on_the_fly_cost_ratio": round(fly_s / head_s, 3) if head_s > 0 else None,
    }
