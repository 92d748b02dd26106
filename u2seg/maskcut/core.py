"""MaskCut (CutLER): up to n normalized cuts per image on patch features, batched over images.

Order of operations per cut i (reproducing the reference loop):
  1. features of patches taken by kept earlier masks are zeroed (cumulative "painting");
  2. binary cosine affinity, eigenvector (dense reference or batched Lanczos), flip rules, seed component;
  3. for i >= 1 the cut is dropped (emptied) if its IoU with the previous cut's mask is > 0.5 or it
     covers <= 1% of the patches. The comparison is against the previous cut *after* its own drop, so
     after a dropped cut the IoU is NaN and only the area test applies; the first cut is never dropped;
  4. the output mask is the cut minus every earlier output (an earlier mask wins each patch); a mask
     that ends up empty is invalid.
A degenerate eigenproblem (top deflated eigenvalue theta <= 1e-4, e.g. all-identical or all-zeroed
features, where the eigenvector is arbitrary) gives an empty, invalid mask instead of a random one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from u2seg.maskcut.affinity import binary_affinity, normalize_affinity_
from u2seg.maskcut.rules import canonical_sign, drop_repeated_or_tiny, foreground_partition, seed_component
from u2seg.maskcut.solver import dense_fiedler, lanczos_fiedler

logger = logging.getLogger(__name__)

DEGENERATE_THETA = 1e-4


@dataclass
class CutStats:
    """Side outputs of `maskcut_detailed` for scores, benchmarks and debugging."""

    scores: torch.Tensor  # [B, n] normalized-cut quality of each cut: 1 - Ncut/2 in [0, 1]
    eigvals: torch.Tensor  # [B, n] generalized eigenvalue lambda_2 of each cut
    solve_s: float = 0.0  # time in the eigen-solver
    affinity_s: float = 0.0  # time building affinities
    eigvecs: list[torch.Tensor] = field(default_factory=list)  # per cut [B, N] (as returned by solver)


def maskcut(
    feats: torch.Tensor,
    grid: tuple[int, int],
    *,
    tau: float = 0.15,
    n_masks: int = 3,
    solver: str = "lanczos",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch masks [B, n_masks, h, w] bool (pairwise disjoint) and valid [B, n_masks] bool."""
    masks, valid, _ = maskcut_detailed(feats, grid, tau=tau, n_masks=n_masks, solver=solver)
    return masks, valid


def maskcut_detailed(
    feats: torch.Tensor,
    grid: tuple[int, int],
    *,
    tau: float = 0.15,
    n_masks: int = 3,
    solver: str = "lanczos",
    reference_sign: bool = False,
    keep_eigvecs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, CutStats]:
    """`maskcut` plus per-cut scores/eigenvalues/timings.

    reference_sign=True skips the canonical sign and the tie-tolerant argmax: with solver="dense" this
    is bit-for-bit the reference rules on LAPACK's sign (used by the benchmark to measure what our
    convention changes).
    """
    if solver not in ("lanczos", "dense"):
        raise ValueError(f"solver must be 'lanczos' or 'dense', got {solver!r}")
    if feats.ndim != 3:
        raise ValueError(f"feats must be [B, N, C], got {tuple(feats.shape)}")
    h, w = grid
    B, N, _ = feats.shape
    if h * w != N:
        raise ValueError(f"feats has {N} patches but grid {grid} has {h * w}")
    dev = feats.device
    masks = torch.zeros(B, n_masks, h, w, dtype=torch.bool, device=dev)
    valid = torch.zeros(B, n_masks, dtype=torch.bool, device=dev)
    stats = CutStats(scores=torch.zeros(B, n_masks, device=dev), eigvals=torch.ones(B, n_masks, device=dev))
    if B == 0 or n_masks == 0:
        return masks, valid, stats
    feats = feats.float()
    painted = torch.zeros(B, h, w, dtype=torch.bool, device=dev)
    prev = torch.zeros(B, h, w, dtype=torch.bool, device=dev)
    for i in range(n_masks):
        f = feats * (~painted).reshape(B, N, 1) if i else feats
        t0 = time.perf_counter()
        W, d = binary_affinity(f, tau)
        t1 = time.perf_counter()
        if solver == "dense":
            x, lam = dense_fiedler(W, d)
            normalize_affinity_(W, d)  # M, for the score below
        else:
            normalize_affinity_(W, d)
            x, lam = lanczos_fiedler(W, d, seed=i)
        t2 = time.perf_counter()
        stats.affinity_s += t1 - t0
        stats.solve_s += t2 - t1
        if keep_eigvecs:
            stats.eigvecs.append(x.detach().cpu())
        degenerate = (1.0 - lam) <= DEGENERATE_THETA
        if not reference_sign:
            x = canonical_sign(x)
        bip, seed = foreground_partition(x, grid, exact_argmax=reference_sign)
        cut = seed_component(bip, seed, grid) & ~degenerate.view(B, 1, 1)
        stats.scores[:, i] = ncut_quality(W, d, cut.reshape(B, N))
        stats.eigvals[:, i] = lam
        del W
        if i >= 1:
            cut = drop_repeated_or_tiny(prev, cut)
        prev = cut
        out = cut & ~painted  # union of earlier outputs == union of earlier kept cuts == painted
        painted |= cut
        masks[:, i] = out
        valid[:, i] = out.flatten(1).any(1)
    stats.scores *= valid
    return masks, valid, stats


def ncut_quality(M: torch.Tensor, d: torch.Tensor, cut: torch.Tensor) -> torch.Tensor:
    """1 - Ncut(A, B)/2 for the partition A = cut in the graph W = D^1/2 M D^1/2 (1 = perfect cut).

    Ncut = cut(A,B)/assoc(A) + cut(A,B)/assoc(B); 0 for an empty or full A.
    """
    m = cut.to(M.dtype)
    sd = d.sqrt()
    Wm = sd * torch.bmm(M, (sd * m).unsqueeze(2)).squeeze(2)
    assoc_a = (m * d).sum(1)
    assoc_b = d.sum(1) - assoc_a
    cut_ab = assoc_a - (m * Wm).sum(1)
    ok = (assoc_a > 0) & (assoc_b > 0)
    ncut = cut_ab / assoc_a.clamp_min(1e-12) + cut_ab / assoc_b.clamp_min(1e-12)
    return torch.where(ok, 1.0 - 0.5 * ncut, torch.zeros_like(ncut)).clamp(0.0, 1.0)
