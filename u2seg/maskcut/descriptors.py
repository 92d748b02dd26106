"""Per-mask descriptors and sampled dense patch features, from the backbone's final patch tokens.

Mask descriptor (our choice, documented): the mean of the final normed patch tokens inside the mask,
weighted by how much of each patch the mask covers, then L2-normalised. The U2Seg reference crops the
object and runs DINO again to take its CLS feature; pooling the tokens we already have costs no second
forward pass and lives in the same (cosine) geometry the spherical k-means clusters in.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def mask_descriptors(tokens: torch.Tensor, masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """tokens [B,N,D], masks [B,n,h,w] (bool or float patch weights) -> [B,n,D] unit vectors (0 if empty)."""
    B, N, _ = tokens.shape
    h, w = grid
    if h * w != N:
        raise ValueError(f"tokens have {N} patches, grid {grid} has {h * w}")
    weights = masks.reshape(B, masks.shape[1], N).to(tokens.dtype)
    pooled = torch.bmm(weights, tokens) / weights.sum(-1, keepdim=True).clamp_min(1e-6)
    return F.normalize(pooled, p=2, dim=-1)


def sample_patch_features(
    tokens: torch.Tensor, n: int, seed: int | Sequence[int], grid: tuple[int, int]
) -> list[dict[str, np.ndarray]]:
    """Up to n patches per image, without replacement, sorted by index -> per image
    {"feature": [k,D] float32, "row": [k] int32, "col": [k] int32} (row/col on the patch grid).

    seed: one int for all images or one per image (pass a per-image seed, e.g. from the image id, so an
    image's sample does not depend on which batch it landed in).
    """
    B, N, _ = tokens.shape
    h, w = grid
    if h * w != N:
        raise ValueError(f"tokens have {N} patches, grid {grid} has {h * w}")
    seeds = [int(seed)] * B if isinstance(seed, (int, np.integer)) else [int(s) for s in seed]
    if len(seeds) != B:
        raise ValueError(f"got {len(seeds)} seeds for {B} images")
    k = max(0, min(int(n), N))
    feats = tokens.detach().float().cpu().numpy()
    out = []
    for b in range(B):
        idx = np.sort(np.random.default_rng(seeds[b]).choice(N, size=k, replace=False))
        out.append({
            "feature": np.ascontiguousarray(feats[b, idx], dtype=np.float32),
            "row": (idx // w).astype(np.int32),
            "col": (idx % w).astype(np.int32),
        })
    return out
