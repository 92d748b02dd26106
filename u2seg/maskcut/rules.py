"""MaskCut's rules for turning an eigenvector into one foreground patch mask (batched torch).

Reference semantics (CutLER maskcut_forward), per image, with x the generalized eigenvector:
  bipartition = x > mean(x); s = argmax |x|
  if bipartition covers >= 3 of the 4 grid corners, or s is not in it: flip (x <- -x, bip <- not bip)
  seed = argmax x (after the flip); keep the 4-connected component of bip that contains the seed.

The eigenvector's sign is arbitrary (LAPACK's choice in the reference) and the corner test looks at the
*pre-flip* partition, so the reference result depends on that sign whenever the partition holds >= 3
corners on one side. Our deterministic convention (`canonical_sign`, applied before the rules):
  flip x so that its entry of largest magnitude is positive.
Then the pre-flip partition is always the seed's side, and the rule reads: "foreground = the seed's
side, unless that side covers >= 3 corners, then the other side" (docs/method.md's wording). Near-ties in
the argmax (patches zeroed by earlier cuts all share one eigenvector value, up to solver noise) are
broken towards the lowest index within a relative tolerance, so solvers with different round-off agree.
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage
import torch

ARGMAX_RTOL = 1e-3
IOU_DROP = 0.5
MIN_AREA_FRAC = 0.01


def argmax_tol(v: torch.Tensor, rtol: float = ARGMAX_RTOL) -> torch.Tensor:
    """Lowest index whose value is within rtol*|max| of the row maximum (v: [B,N]) -> [B]."""
    top = v.max(dim=1, keepdim=True).values
    near = v >= top - rtol * top.abs()
    return near.to(torch.uint8).argmax(dim=1)  # first True


def canonical_sign(x: torch.Tensor) -> torch.Tensor:
    """Flip each row so the entry of largest magnitude is positive (see module doc)."""
    s = argmax_tol(x.abs())
    sign = torch.where(x.gather(1, s[:, None]) < 0, -1.0, 1.0).to(x.dtype)
    return x * sign


def corner_count(bip: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Number of the 4 grid corners inside each partition (bip: [B,N] bool) -> [B] int."""
    h, w = grid
    idx = torch.tensor([0, w - 1, (h - 1) * w, h * w - 1], device=bip.device)
    return bip[:, idx].sum(1)


def foreground_partition(
    x: torch.Tensor, grid: tuple[int, int], *, exact_argmax: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the reference flip rules to eigenvectors x [B,N] -> (bipartition [B,N] bool, seed [B]).

    exact_argmax=True uses plain argmax (bit-for-bit the reference, sensitive to round-off ties).
    """
    pick = (lambda v: v.argmax(dim=1)) if exact_argmax else argmax_tol
    mean = x.mean(dim=1, keepdim=True)
    bip = x > mean
    s = pick(x.abs())
    reverse = (corner_count(bip, grid) >= 3) | ~bip.gather(1, s[:, None]).squeeze(1)
    x = torch.where(reverse[:, None], -x, x)
    bip = torch.where(reverse[:, None], ~bip, bip)
    seed = pick(x)
    return bip, seed


_FOUR_CONNECTED = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)


def seed_component(bip: torch.Tensor, seed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """4-connected component of each partition that contains its seed -> [B,h,w] bool (same device).

    Runs scipy.ndimage.label on CPU: the grids are tiny (60x60 at 480 px), a device round trip is
    cheaper than an iterative flood fill. A seed outside its partition (only possible for a degenerate,
    constant eigenvector) yields an empty mask.
    """
    h, w = grid
    B = bip.shape[0]
    bips = bip.reshape(B, h, w).cpu().numpy()
    seeds = seed.cpu().numpy()
    out = np.zeros((B, h, w), dtype=bool)
    for b in range(B):
        r, c = divmod(int(seeds[b]), w)
        if not bips[b, r, c]:
            continue
        labels, _ = scipy.ndimage.label(bips[b], structure=_FOUR_CONNECTED)
        out[b] = labels == labels[r, c]
    return torch.from_numpy(out).to(bip.device)


def drop_repeated_or_tiny(prev: torch.Tensor, cut: torch.Tensor) -> torch.Tensor:
    """The reference's test for cuts after the first: empty `cut` [B,h,w] where its IoU with the previous
    cut's (post-drop) mask is > 0.5 or it covers <= 1% of the patches. An empty `prev` gives IoU NaN,
    which never exceeds 0.5, so only the area test applies then."""
    area = cut.flatten(1).float().mean(1)
    drop = (mask_iou(prev, cut) > IOU_DROP) | (area <= MIN_AREA_FRAC)
    return cut & ~drop.view(-1, 1, 1)


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of boolean masks over the trailing two dims; NaN when both are empty (as the reference)."""
    inter = (a & b).flatten(-2).sum(-1).float()
    union = (a | b).flatten(-2).sum(-1).float()
    return inter / union
