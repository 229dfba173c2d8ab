"""Which wrong classes a retrieval confuses a query's class with: the share of one partner class.

On ``digits_pairs`` a class is an ordered pair of digits (a, b) and its *mirror* is
(b, a): the same two digits the other way round. A network that cannot tell left
from right (global pooling) retrieves the mirror class in place of the right one, so
the share of a query's top-R mistakes that are its mirror class says whether the
network, not the loss, is the bottleneck. :func:`partner_confusion` counts it from
neighbour lists; :func:`mirror_confusion` searches them (leave-one-out, cosine).
"""

from __future__ import annotations

import numpy as np

from softmine.evaluation.knn import ArrayLike, as_array, as_labels, iter_knn


def partner_confusion(
    neighbour_labels: np.ndarray, query_labels: np.ndarray, r: np.ndarray, partner: np.ndarray
) -> tuple[int, int]:
    """(mistakes that are the partner class, all mistakes) among each query's R nearest.

    Args:
        neighbour_labels: (n, k) labels of each query's neighbours, nearest first (k >= max R).
        query_labels: (n,) each query's label.
        r: (n,) R of each query: how many of its nearest neighbours count (the number of
            other items of its class, as in MAP@R).
        partner: (n,) the partner class of each query's class (its mirror); a partner equal
            to the query's own class is never a mistake.

    A mistake is a neighbour among the first R whose label differs from the query's; it
    is a partner mistake when that label is the query's partner class. Summed over queries.
    """
    labels = np.asarray(neighbour_labels)
    q = np.asarray(query_labels)[:, None]
    counted = np.arange(labels.shape[1])[None, :] < np.asarray(r)[:, None]
    wrong = counted & (labels != q)
    partner_wrong = wrong & (labels == np.asarray(partner)[:, None])
    return int(partner_wrong.sum()), int(wrong.sum())


def mirror_confusion(
    embeddings: ArrayLike,
    labels: ArrayLike,
    partner: ArrayLike,
    *,
    device: str = "auto",
    chunk_size: int | None = None,
) -> float:
    """The share of all top-R mistakes of leave-one-out retrieval that are the query's partner class.

    Each item is a query in turn, ranked against all others by cosine similarity (the
    search of MAP@R); R is the number of other items of its class. ``partner[i]`` is the
    partner (mirror) class of item i's class. 0.0 when there is no mistake at all.
    """
    x, y = as_array(embeddings), as_labels(labels)
    partner = np.asarray(partner)
    if not len(x) == len(y) == len(partner):
        raise ValueError(
            f"{len(x)} embeddings, {len(y)} labels and {len(partner)} partner labels; "
            "they must match one to one"
        )
    _, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    r = counts[inverse] - 1
    k = max(int(r.max()), 1)
    hits = wrong = 0
    for start, _, idx in iter_knn(x, k=k, exclude_self=True, device=device, chunk_size=chunk_size):
        stop = start + len(idx)
        h, w = partner_confusion(y[idx], y[start:stop], r[start:stop], partner[start:stop])
        hits, wrong = hits + h, wrong + w
    return hits / wrong if wrong else 0.0
