"""STEGO's kNN positives: a global descriptor per (cropped) image and its cosine nearest neighbours.

STEGO (src/precompute_knns.py) mean-pools the backbone's patch features of each 224x224 image, L2-normalises
them and keeps the top 30 by cosine similarity, the image itself included (column 0). Training
(src/data.py, ContrastiveSegDataset.__getitem__) then draws the positive uniformly from columns
1..num_neighbors (num_neighbors = 7), i.e. uniformly among the 7 nearest *other* images.
Here `knn_indices` returns those k neighbours with the image itself removed, and `pick_positives`
draws one of the k uniformly, which is the same distribution.

One STEGO quirk is not mirrored: its precompute runs the featurizer in training mode, so the pooled
features pass through Dropout2d(0.1) first (random channels zeroed); `global_descriptor` uses the
clean features.
"""

from __future__ import annotations

import faiss
import numpy as np
import torch
import torch.nn.functional as F


def global_descriptor(feats: torch.Tensor) -> torch.Tensor:
    """Spatial mean of [B, C, h, w] features, L2-normalised: [B, C] (STEGO's get_feats)."""
    if feats.ndim != 4:
        raise ValueError(f"feats must be [B, C, h, w], got shape {tuple(feats.shape)}")
    return F.normalize(feats.mean([2, 3]), dim=1)


def knn_indices(global_feats: np.ndarray | torch.Tensor, k: int = 7) -> np.ndarray:
    """Indices of each row's k most cosine-similar other rows, best first: int64 [N, k].

    Exact search (faiss IndexFlatIP on L2-normalised float32 rows). The query row itself is removed
    even when a duplicate outranks it; if it is not among the k+1 hits (all k+1 tie), the last hit goes.
    """
    if isinstance(global_feats, torch.Tensor):
        global_feats = global_feats.detach().cpu().numpy()
    x = np.asarray(global_feats, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"global_feats must be [N, C] with C > 0, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("global_feats contain NaN or inf")
    if isinstance(k, bool) or int(k) != k or k <= 0:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    n = x.shape[0]
    if n < k + 1:
        raise ValueError(f"need at least k+1={k + 1} rows to find {k} neighbours other than the image, got {n}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError("global_feats contain an all-zero row (no direction to compare)")
    x = np.ascontiguousarray(x / norms, dtype=np.float32)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    _, hits = index.search(x, int(k) + 1)
    hits = hits.astype(np.int64)
    rows = np.arange(n)[:, None]
    is_self = hits == rows
    # Drop the first self hit per row, or the last column where self is absent.
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), int(k))
    keep = np.ones_like(hits, dtype=bool)
    keep[np.arange(n), drop] = False
    return hits[keep].reshape(n, int(k))


def pick_positives(knn: np.ndarray, indices: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One kNN positive per requested image, uniform over its k neighbours (STEGO's randint(1, k+1))."""
    table = np.asarray(knn)
    idx = np.asarray(indices, dtype=np.int64)
    if table.ndim != 2 or table.shape[1] == 0:
        raise ValueError(f"knn must be [N, k] with k > 0, got shape {table.shape}")
    if idx.size and (idx.min() < 0 or idx.max() >= table.shape[0]):
        raise ValueError(f"indices must lie in [0, {table.shape[0]}), got range [{idx.min()}, {idx.max()}]")
    cols = rng.integers(0, table.shape[1], size=idx.shape)
    return table[idx, cols].astype(np.int64)
