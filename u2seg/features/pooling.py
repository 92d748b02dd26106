"""The per-image stuff input: patch tokens pooled to a small grid and projected to a few dimensions.

Why: stuff labelling needs a feature for every patch of every image, but the label stage runs after
clustering, long after the backbone pass. Storing raw tokens costs ~2.7 MB per image (ViT-B/8, 480 px);
an average-pooled G x G grid projected by a fixed random orthogonal matrix to ``dim`` dimensions
(Johnson-Lindenstrauss: cosine geometry approximately kept) costs G*G*dim*2 bytes (64 KB at G=32,
dim=32) and needs no second backbone pass. Stuff centroids live in the same projected space because
the patch sample they are fitted on is drawn from these grids.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def projection_matrix(in_dim: int, out_dim: int, seed: int) -> torch.Tensor:
    """A fixed [in_dim, out_dim] matrix with orthonormal columns (identity-like when out_dim >= in_dim)."""
    if out_dim >= in_dim:
        return torch.eye(in_dim)
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(in_dim, out_dim, generator=gen))
    return q


def pooled_stuff_grid(tokens: torch.Tensor, grid: tuple[int, int], size: int, dim: int,
                      seed: int = 0) -> torch.Tensor:
    """[B, N, D] patch tokens -> [B, gh, gw, d] L2-normalised float16 (gh, gw <= size, aspect kept)."""
    B, _, D = tokens.shape
    h, w = grid
    gh, gw = min(size, h), min(size, w)
    x = tokens.float().transpose(1, 2).reshape(B, D, h, w)
    x = F.adaptive_avg_pool2d(x, (gh, gw)).permute(0, 2, 3, 1)  # [B, gh, gw, D]
    x = F.normalize(x, dim=-1)
    p = projection_matrix(D, dim, seed).to(x.device)
    x = F.normalize(x @ p, dim=-1)
    return x.to(torch.float16)


def sample_grid_cells(grid: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Up to ``n`` distinct cells of one [gh, gw, d] grid: (features [m, d] float32, rows, cols)."""
    gh, gw, d = grid.shape
    m = min(n, gh * gw)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(gh * gw, generator=gen)[:m].sort().values
    feats = grid.reshape(gh * gw, d)[idx.to(grid.device)].float()
    return feats, idx // gw, idx % gw
