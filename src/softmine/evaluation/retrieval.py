"""Retrieval metrics for deep metric learning (leave-one-out on one labelled set).

Each query is every test sample in turn; the database is all other test samples.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import faiss
import numpy as np
from sklearn.metrics import normalized_mutual_info_score

from softmine.evaluation.knn import ArrayLike, as_float32, as_labels, knn_search


def recall_at_k(
    embeddings: ArrayLike, labels: ArrayLike, ks: Sequence[int] = (1, 2, 4, 8)
) -> dict[int, float]:
    """Recall@K: fraction of queries with at least one same-label item among their K nearest others."""
    x, y = as_float32(embeddings), as_labels(labels)
    ks = sorted({int(k) for k in ks})
    _, idx = knn_search(x, k=ks[-1], exclude_self=True)
    hits = y[idx] == y[:, None]
    first = np.where(hits.any(1), hits.argmax(1), np.iinfo(np.int64).max)
    return {k: float((first < k).mean()) for k in ks}


def map_at_r(embeddings: ArrayLike, labels: ArrayLike) -> float:
    """MAP@R (Musgrave et al. 2020): mean over queries of (1/R) sum_{i<=R} P(i) rel(i), R = same-label others."""
    x, y = as_float32(embeddings), as_labels(labels)
    _, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    r = counts[inverse] - 1
    valid = r > 0
    if not valid.any():
        return 0.0
    _, idx = knn_search(x, k=int(r.max()), exclude_self=True)
    rel = (y[idx] == y[:, None]) & (np.arange(idx.shape[1])[None, :] < r[:, None])
    precision = np.cumsum(rel, axis=1) / np.arange(1, idx.shape[1] + 1)
    ap = (precision * rel).sum(1)[valid] / r[valid]
    return float(ap.mean())


def nmi(embeddings: ArrayLike, labels: ArrayLike, seed: int = 0, niter: int = 50) -> float:
    """NMI between labels and faiss k-means clusters (k = number of classes, arithmetic mean normaliser)."""
    x, y = as_float32(embeddings), as_labels(labels)
    k = len(np.unique(y))
    if k < 2:
        return 1.0
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, verbose=False, spherical=True)
    km.train(x)
    _, assign = km.index.search(x, 1)
    return float(normalized_mutual_info_score(y, assign[:, 0], average_method="arithmetic"))


def retrieval_metrics(
    embeddings: ArrayLike, labels: ArrayLike, ks: Iterable[int] = (1, 2, 4, 8)
) -> dict[str, float]:
    """The flat dict written to ``metrics.json``: ``recall@K`` for each K, ``map@r`` and ``nmi``."""
    out = {f"recall@{k}": v for k, v in recall_at_k(embeddings, labels, tuple(ks)).items()}
    out["map@r"] = map_at_r(embeddings, labels)
    out["nmi"] = nmi(embeddings, labels)
    return out
