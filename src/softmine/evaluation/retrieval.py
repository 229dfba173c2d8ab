"""Retrieval metrics of deep metric learning: leave-one-out on one labelled test set, or query/gallery.

Leave-one-out (CUB, Cars196, SOP): each test item is a query in turn; its database is
every other test item, ranked by cosine similarity (exact faiss search, see
:mod:`softmine.evaluation.knn`). The query
itself is excluded by index, so an exact duplicate of it still counts as a neighbour.
All ranking metrics come from one chunked search with ``k = max(max K, largest R)``,
where R of a query is the number of other items with its label; memory stays bounded
by the chunk size times that k (never an N x N matrix). Query/gallery (In-Shop):
:func:`query_gallery_metrics` ranks a separate gallery for each query, the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import faiss
import numpy as np

from softmine.evaluation.knn import (
    ArrayLike,
    as_array,
    as_labels,
    iter_knn,
    normalized_rows,
    resolve_faiss_device,
)
from softmine.evaluation.metric_names import MAP_AT_R, NMI, R_PRECISION, RECALL


def _checked(embeddings: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    x, y = as_array(embeddings), as_labels(labels)
    if len(x) != len(y):
        raise ValueError(f"{len(x)} embeddings but {len(y)} labels; they must match one to one")
    if len(x) < 2:
        raise ValueError(f"leave-one-out retrieval needs at least 2 items, got {len(x)}")
    return x, y


def _ks(ks: Iterable[int]) -> list[int]:
    out = sorted({int(k) for k in ks})
    if out and out[0] < 1:
        raise ValueError(f"every K of Recall@K must be >= 1, got {out}")
    return out


def _reduce_chunks(
    chunks: Iterable[tuple[int, np.ndarray, np.ndarray]],
    query_labels: np.ndarray,
    base_labels: np.ndarray,
    r: np.ndarray,
    ks: list[int],
    with_r: bool,
) -> dict[str, float]:
    """Recall@K, MAP@R and R-Precision from the chunked neighbour lists of every query.

    ``r[i]`` is the number of relevant database items of query i (items with its label).
    """
    hits = np.zeros(len(ks), dtype=np.int64)
    ap_sum = rp_sum = 0.0
    for start, _, idx in chunks:
        stop = start + len(idx)
        rel = base_labels[idx] == query_labels[start:stop, None]
        if ks:
            first = np.where(rel.any(1), rel.argmax(1), np.iinfo(np.int64).max)
            hits += (first[:, None] < np.asarray(ks)[None, :]).sum(0)
        if with_r:
            rr = r[start:stop]
            ap, hits_in_r = _ap_at_r(rel, rr)
            valid = rr > 0
            ap_sum += float(ap[valid].sum())
            rp_sum += float((hits_in_r[valid] / rr[valid]).sum())
    n = len(query_labels)
    out = {f"{RECALL}{kk}": float(h) / n for kk, h in zip(ks, hits, strict=True)}
    if with_r:
        n_valid = int((r > 0).sum())
        out[MAP_AT_R] = ap_sum / n_valid if n_valid else 0.0
        out[R_PRECISION] = rp_sum / n_valid if n_valid else 0.0
    return out


def _ap_at_r(rel: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per query of a chunk: AP@R (NaN where R = 0) and the number of relevant items among the R nearest.

    ``rel`` (rows, k): whether each neighbour, nearest first, shares the query's label
    (k >= R); ``r`` (rows,): R of each query.
    """
    rel = rel & (np.arange(rel.shape[1])[None, :] < r[:, None])
    cum = np.cumsum(rel, axis=1, dtype=np.int64)
    precision_at_hits = np.where(rel, cum / np.arange(1, rel.shape[1] + 1), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ap = np.where(r > 0, precision_at_hits.sum(1) / r, np.nan)
    return ap, cum[:, -1]


def ranking_metrics(
    embeddings: ArrayLike,
    labels: ArrayLike,
    ks: Iterable[int] = (1, 2, 4, 8),
    *,
    with_r: bool = True,
    device: str = "auto",
    chunk_size: int | None = None,
) -> dict[str, float]:
    """``recall@K`` for each K and, with ``with_r``, ``map@r`` and ``r_precision``, from one search.

    Definitions (cosine similarity, query excluded by index, R = number of other items
    with the query's label):

    - ``recall@K``: fraction of all queries with at least one same-label item among their K
      nearest neighbours (the metric-learning definition; a query whose label has no other
      item counts as a miss).
    - ``r_precision``: mean over queries with R > 0 of (same-label items among the R nearest) / R.
    - ``map@r``: mean over queries with R > 0 of (1/R) sum_{i<=R} P(i) rel(i), where rel(i) says
      whether the i-th neighbour has the query's label and P(i) is the precision of the first i
      (Musgrave et al., A Metric Learning Reality Check, ECCV 2020).
    """
    x, y = _checked(embeddings, labels)
    ks = _ks(ks)
    _, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    r = counts[inverse] - 1
    k = max([*ks, int(r.max()) if with_r else 0, 1])
    chunks = iter_knn(x, k=k, exclude_self=True, device=device, chunk_size=chunk_size)
    return _reduce_chunks(chunks, y, y, r, ks, with_r)


def query_gallery_metrics(
    query: ArrayLike,
    query_labels: ArrayLike,
    gallery: ArrayLike,
    gallery_labels: ArrayLike,
    ks: Iterable[int] = (1, 10, 20, 30, 40, 50),
    *,
    with_r: bool = True,
    device: str = "auto",
    chunk_size: int | None = None,
) -> dict[str, float]:
    """The metrics of :func:`ranking_metrics` for queries searched in a separate gallery.

    The protocol of In-Shop Clothes (and of a CSV with ``is_query`` / ``is_gallery``
    columns): each query ranks the whole gallery by cosine similarity (nothing is
    excluded: query and gallery are different images), R = number of gallery items with
    the query's label. ``recall@K`` counts every query (one without a same-label gallery
    item is a miss); ``map@r`` / ``r_precision`` average over queries with R > 0.
    Searched in chunks with faiss like the leave-one-out metrics (bounded memory).
    """
    q, g = as_array(query), as_array(gallery)
    qy, gy = as_labels(query_labels), as_labels(gallery_labels)
    if len(q) != len(qy) or len(g) != len(gy):
        raise ValueError(
            f"{len(q)} query embeddings but {len(qy)} labels, {len(g)} gallery embeddings "
            f"but {len(gy)} labels; they must match one to one"
        )
    if len(q) == 0 or len(g) == 0:
        raise ValueError(
            f"query/gallery retrieval needs items on both sides, got {len(q)}/{len(g)}"
        )
    ks = _ks(ks)
    classes, counts = np.unique(gy, return_counts=True)
    pos = np.searchsorted(classes, qy).clip(0, len(classes) - 1)
    r = np.where(classes[pos] == qy, counts[pos], 0)
    k = min(max([*ks, int(r.max()) if with_r else 0, 1]), len(g))
    chunks = iter_knn(q, g, k=k, device=device, chunk_size=chunk_size)
    return _reduce_chunks(chunks, qy, gy, r, ks, with_r)


def recall_at_k(
    embeddings: ArrayLike, labels: ArrayLike, ks: Sequence[int] = (1, 2, 4, 8)
) -> dict[int, float]:
    """Recall@K: fraction of queries with at least one same-label item among their K nearest others."""
    ks = _ks(ks)
    m = ranking_metrics(embeddings, labels, ks, with_r=False)
    return {k: m[f"{RECALL}{k}"] for k in ks}


def map_at_r(embeddings: ArrayLike, labels: ArrayLike) -> float:
    """MAP@R: mean over queries with R>0 of (1/R) sum_{i<=R} P(i) rel(i), R = same-label others."""
    return ranking_metrics(embeddings, labels, (), with_r=True)[MAP_AT_R]


def r_precision(embeddings: ArrayLike, labels: ArrayLike) -> float:
    """R-Precision: mean over queries with R>0 of (same-label items among the R nearest others) / R."""
    return ranking_metrics(embeddings, labels, (), with_r=True)[R_PRECISION]


def nmi(
    embeddings: ArrayLike,
    labels: ArrayLike,
    seed: int = 0,
    niter: int = 50,
    device: str = "auto",
) -> float:
    """NMI(labels, faiss k-means of the L2-normalised embeddings, k = #classes), arithmetic-mean normaliser.

    Plain (Euclidean) k-means, ``niter`` iterations from one seeded initialisation on all
    points (no subsampling); score by ``sklearn.metrics.normalized_mutual_info_score``
    with ``average_method="arithmetic"``.
    """
    x, y = _checked(embeddings, labels)
    k = len(np.unique(y))
    if k < 2:
        return 1.0
    x = normalized_rows(x)
    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=niter,
        nredo=1,
        seed=seed,
        verbose=False,
        spherical=False,
        min_points_per_centroid=1,
        max_points_per_centroid=len(x),
        gpu=resolve_faiss_device(device) is not None,
    )
    km.train(x)
    _, assign = km.index.search(x, 1)
    from sklearn.metrics import normalized_mutual_info_score  # 0.7 s: when NMI is scored

    return float(normalized_mutual_info_score(y, assign[:, 0], average_method="arithmetic"))


def retrieval_metrics(
    embeddings: ArrayLike, labels: ArrayLike, ks: Iterable[int] = (1, 2, 4, 8)
) -> dict[str, float]:
    """The flat dict written to ``metrics.json``: ``recall@K`` for each K, ``map@r``, ``r_precision``, ``nmi``."""
    out = ranking_metrics(embeddings, labels, ks, with_r=True)
    out[NMI] = nmi(embeddings, labels)
    return out


def average_precision_at_r(
    embeddings: ArrayLike,
    labels: ArrayLike,
    *,
    device: str = "auto",
    chunk_size: int | None = None,
) -> np.ndarray:
    """Per-query AP@R of leave-one-out retrieval, the terms whose mean is ``map@r``: (n,) float64.

    AP@R of query q = (1/R) sum_{i<=R} P(i) rel(i), R = number of other items with its
    label; NaN for a query whose label has no other item. Searched in chunks like
    :func:`ranking_metrics` (memory: the index plus a chunk of k = largest R neighbours).
    """
    x, y = _checked(embeddings, labels)
    _, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    r = counts[inverse] - 1
    out = np.full(len(y), np.nan)
    k = max(int(r.max()), 1)
    for start, _, idx in iter_knn(x, k=k, exclude_self=True, device=device, chunk_size=chunk_size):
        stop = start + len(idx)
        out[start:stop] = _ap_at_r(y[idx] == y[start:stop, None], r[start:stop])[0]
    return out
