"""Binary cosine affinity of patch features, built in place so a batch holds one B x N x N buffer."""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS_EDGE = 1e-5  # weight of "dissimilar" edges; keeps the graph connected (as in CutLER)


def binary_affinity(
    feats: torch.Tensor, tau: float, eps: float = EPS_EDGE
) -> tuple[torch.Tensor, torch.Tensor]:
    """W[b,i,j] = 1 if cos(f_i, f_j) > tau else eps, and degrees d = W.sum(-1).

    feats: [B, N, C]. Zero feature vectors (patches taken by an earlier cut) normalise to zero, so
    their similarity to everything is 0 and, for tau >= 0, their whole row is eps: nearly isolated.
    """
    f = F.normalize(feats.float(), p=2, dim=-1)
    W = torch.bmm(f, f.transpose(1, 2))
    W.gt_(tau)  # in place -> 1.0 / 0.0
    W.clamp_(min=eps)
    d = W.sum(-1)
    return W, d


def normalize_affinity_(W: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """In place W -> D^-1/2 W D^-1/2 (the symmetric normalised affinity); returns W."""
    dinv = d.rsqrt()
    W.mul_(dinv.unsqueeze(2)).mul_(dinv.unsqueeze(1))
    return W
