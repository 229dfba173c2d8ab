"""Exact k-nearest-neighbour search on L2-normalised embeddings with faiss.

Cosine similarity = inner product after L2 normalisation, searched exactly
(``IndexFlatIP``) in query chunks so memory stays bounded by
``chunk_size * k`` results instead of an N x N matrix.
"""

from __future__ import annotations

import faiss
import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def as_float32(x: ArrayLike, normalize: bool = True) -> np.ndarray:
    """A contiguous float32 (n, d) numpy copy of ``x``, L2-normalised by default."""
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D (n, dim) array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("embeddings contain NaN or Inf; check the model's output")
    if normalize:
        x = x.copy()
        faiss.normalize_L2(x)
    return x


def as_labels(y: ArrayLike) -> np.ndarray:
    """A 1-D int64 numpy copy of ``y``."""
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    return y.astype(np.int64)


def knn_search(
    queries: np.ndarray,
    gallery: np.ndarray | None = None,
    k: int = 8,
    *,
    exclude_self: bool = False,
    chunk_size: int = 16384,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` inner-product neighbours of each query: (similarities, indices), both (nq, k).

    With ``gallery=None`` the queries search themselves; ``exclude_self=True`` then
    removes each query's own index (by index, not by distance, so exact duplicates of
    the query still count as neighbours).
    """
    base = queries if gallery is None else gallery
    if exclude_self and gallery is not None:
        raise ValueError("exclude_self only applies to leave-one-out search (gallery=None)")
    extra = 1 if exclude_self else 0
    k_eff = min(k + extra, base.shape[0])
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(base)
    nq = queries.shape[0]
    out_k = k_eff - extra
    sims = np.empty((nq, out_k), dtype=np.float32)
    idx = np.empty((nq, out_k), dtype=np.int64)
    for start in range(0, nq, chunk_size):
        stop = min(start + chunk_size, nq)
        s, i = index.search(queries[start:stop], k_eff)
        if exclude_self:
            s, i = _drop_self(s, i, np.arange(start, stop))
        sims[start:stop], idx[start:stop] = s, i
    return sims, idx


def _drop_self(s: np.ndarray, i: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's own index; rows where it was not returned lose their last column."""
    is_self = i == rows[:, None]
    missing = ~is_self.any(axis=1)
    is_self[missing, -1] = True
    keep = np.argsort(is_self, axis=1, kind="stable")[:, :-1]
    return np.take_along_axis(s, keep, 1), np.take_along_axis(i, keep, 1)
