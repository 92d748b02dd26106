"""Normalized-cut eigenvector: the second-smallest generalized eigenvector of (D - W) x = lambda D x.

Two solvers return the same quantity:
- `dense_fiedler`: the reference (scipy.linalg.eigh on the full generalized problem, CPU, per image).
  O(N^3); it slows down badly after the first cut, when zeroed patches create a large repeated
  eigenvalue.
- `lanczos_fiedler`: batched block Lanczos with full reorthogonalisation and thick restart on
  M = D^-1/2 W D^-1/2 with the trivial eigenvector u = D^1/2 1 / |.| projected out. We want the
  largest eigenvalue of the deflated M. Krylov methods are shift-invariant, so no explicit shift is
  needed: the top end of the spectrum converges at a rate set by its gap, independently of the
  repeated eigenvalue (M-eigenvalue 0, i.e. generalized lambda = 1) that the zeroed patches put in the
  middle of the spectrum: a repeated eigenvalue adds only one Krylov direction.
Both return x = D^-1/2 y with |y| = 1 (x^T D x = 1, eigh's normalisation) and the generalized
eigenvalue lambda = 1 - theta.
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.linalg
import torch

logger = logging.getLogger(__name__)


def dense_fiedler(W: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference solver. W: [B,N,N] binary affinity (not normalised), d: [B,N] -> (x, lam) on W.device."""
    B, N = d.shape
    xs = torch.zeros(B, N, dtype=torch.float64)
    lams = torch.ones(B, dtype=torch.float64)
    for b in range(B):
        A = W[b].detach().to("cpu", torch.float64).numpy()
        D = np.diag(A.sum(axis=1))
        vals, vecs = scipy.linalg.eigh(D - A, D, subset_by_index=[1, 2])
        xs[b] = torch.from_numpy(np.ascontiguousarray(vecs[:, 0]))
        lams[b] = float(vals[0])
    return xs.to(W.device, torch.float32), lams.to(W.device, torch.float32)


def _project_out(Q: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Q - basis (basis^T Q), basis [B,N,k] orthonormal, Q [B,N,p]."""
    if basis.shape[-1] == 0:
        return Q
    return Q - torch.bmm(basis, torch.bmm(basis.transpose(1, 2), Q))


def _orthonormal_block(Q: torch.Tensor, fixed: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Orthonormalise Q against the basis `fixed` (CGS2) and within itself; columns that vanish
    (converged residuals) are replaced by random directions so the basis stays orthonormal."""
    norm0 = Q.norm(dim=1, keepdim=True).clamp_min(1e-30)
    Q = Q / norm0
    for _ in range(2):
        Q = _project_out(Q, fixed)
    dead = Q.norm(dim=1, keepdim=True) < 1e-3
    if bool(dead.any()):
        rnd = torch.randn(Q.shape, generator=gen, dtype=Q.dtype).to(Q.device)
        Q = torch.where(dead, rnd, Q)
        for _ in range(2):
            Q = _project_out(Q, fixed)
    Q, _ = torch.linalg.qr(Q)
    Q = _project_out(Q, fixed)  # one more pass: QR of nearly dependent columns leaks into `fixed`
    Q, _ = torch.linalg.qr(Q)
    return Q


def lanczos_fiedler(
    M: torch.Tensor,
    d: torch.Tensor,
    *,
    block: int = 4,
    max_basis: int = 64,
    keep: int = 16,
    tol: float = 1e-5,
    max_matvecs: int = 800,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched top eigenvector of the deflated M = D^-1/2 W D^-1/2 (M given, already normalised).

    Returns (x [B,N], lam [B]) for the generalized problem. Converges when every image's Ritz residual
    |M y - theta y| < tol (y unit); converged images keep iterating harmlessly until the batch is done.
    """
    B, N = d.shape
    dev, dt = M.device, M.dtype
    if B == 0:
        return torch.zeros(0, N, device=dev), torch.zeros(0, device=dev)
    sd = d.sqrt()
    u = (sd / sd.norm(dim=1, keepdim=True)).unsqueeze(2)  # [B,N,1] trivial eigenvector of M
    gen = torch.Generator().manual_seed(seed)
    block = max(1, min(block, N - 1))
    max_basis = max(min(max_basis, N - 1), 2 * block)
    keep = max(1, min(keep, max_basis - block))
    V = torch.zeros(B, N, 0, device=dev, dtype=dt)
    AV = torch.zeros(B, N, 0, device=dev, dtype=dt)
    Q = torch.randn(B, N, block, generator=gen, dtype=dt).to(dev)
    y = torch.zeros(B, N, device=dev, dtype=dt)
    theta = torch.zeros(B, device=dev, dtype=dt)
    matvecs = 0
    res = torch.full((B,), float("inf"), device=dev)
    while True:
        Q = _orthonormal_block(Q, torch.cat([u, V], dim=2), gen)
        AQ = torch.bmm(M, Q)
        matvecs += Q.shape[-1]
        V = torch.cat([V, Q], dim=2)
        AV = torch.cat([AV, AQ], dim=2)
        H = torch.bmm(V.transpose(1, 2), AV).double()
        H = 0.5 * (H + H.transpose(1, 2))
        evals, S = torch.linalg.eigh(H)  # ascending
        S = S.to(dt)
        p = min(block, S.shape[-1])
        S_top = S[..., -p:]
        Y = torch.bmm(V, S_top)
        R = torch.bmm(AV, S_top) - Y * evals[:, -p:].to(dt).unsqueeze(1)
        y, theta = Y[..., -1], evals[:, -1].to(dt)
        res = R[..., -1].norm(dim=1)
        if bool((res < tol).all()) or matvecs >= max_matvecs:
            break
        if V.shape[-1] + block > max_basis:  # thick restart on the top Ritz vectors
            S_keep = S[..., -keep:]
            V, AV = torch.bmm(V, S_keep), torch.bmm(AV, S_keep)
        Q = R.flip(-1)  # residuals of the top Ritz pairs extend the Krylov space
    if bool((res >= tol).any()):
        logger.warning("lanczos: %d/%d images not converged after %d matvecs (max residual %.2e)",
                       int((res >= tol).sum()), B, matvecs, float(res.max()))
    logger.debug("lanczos: B=%d N=%d converged after %d matvecs per image", B, N, matvecs)
    x = y / sd
    return x, 1.0 - theta
