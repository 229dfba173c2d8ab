"""k-reciprocal re-ranking (Zhong, Zheng, Cao, Li. *Re-ranking Person Re-identification
with k-reciprocal Encoding*, CVPR 2017), vectorised and without an N x N matrix.

With N = queries + gallery items, all L2-normalised:

- d(i, j) = ||x_i - x_j||^2 / max_l ||x_i - x_l||^2, the squared Euclidean distance scaled
  by its row maximum over all N items (as the authors' reference code does);
- N(i, k): i itself and its k nearest neighbours; R(i, k) = {j in N(i, k) : i in N(j, k)};
- R*(i) = R(i, k1) united with every R(j, round(k1/2)), j in R(i, k1), that shares more than
  2/3 of its items with R(i, k1);
- V_i = exp(-d(i, j)) on R*(i), normalised to sum 1; with k2 > 1 replaced by the mean of
  V over N(i, k2 - 1) (local query expansion);
- d_J(q, g) = 1 - sum min(V_q, V_g) / sum max(V_q, V_g) (Jaccard distance);
- the result is (1 - lambda) d_J(q, g) + lambda d(q, g), a (Q, G) distance matrix.

Neighbours come from the chunked faiss search; V is sparse (about N x 2 k1 entries) and
the Jaccard sums are accumulated from pairs of items that share a neighbour, so memory
is the (Q, G) output plus O(N k1^2), never N x N.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp

from softmine.errors import ConfigError
from softmine.evaluation.knn import ArrayLike, as_array, knn_search, normalized_rows

#: Bound on pairs (or dense cells) materialised at once.
MAX_BLOCK_ELEMENTS = 1 << 22


def _reciprocal(nn: np.ndarray, block: int = 4096) -> np.ndarray:
    """(N, k) mask: nn[i, t] is k-reciprocal, i.e. i is among the neighbours ``nn[nn[i, t]]``."""
    out = np.empty(nn.shape, dtype=bool)
    for a in range(0, len(nn), block):
        rows = np.arange(a, min(a + block, len(nn)))
        out[rows] = (nn[nn[rows]] == rows[:, None, None]).any(-1)
    return out


def _expanded_sets(nn: np.ndarray, kh: int, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the expanded k-reciprocal sets R*(i), each pair once, sorted by row then col."""
    n = len(nn)
    recip = _reciprocal(nn)
    nnh = nn[:, : kh + 1]
    recip_h = _reciprocal(nnh)
    keys = []
    for a in range(0, n, block):
        rows = np.arange(a, min(a + block, n))
        cand, cand_ok = nn[rows], recip[rows]  # R(i, k1) as (b, K) with a validity mask
        r_set = np.where(cand_ok, cand, -1)
        half, half_ok = nnh[cand], recip_h[cand]  # R(j, k1/2) of each j in N(i, k1): (b, K, Kh)
        in_r = (half[..., None] == r_set[:, None, None, :]).any(-1)
        shared = (in_r & half_ok).sum(-1)
        accept = cand_ok & (shared > 2.0 / 3.0 * half_ok.sum(-1))
        add = accept[..., None] & half_ok
        b_rows = np.broadcast_to(rows[:, None], cand.shape)
        h_rows = np.broadcast_to(rows[:, None, None], half.shape)
        keys.append(
            np.concatenate([b_rows[cand_ok] * n + cand[cand_ok], h_rows[add] * n + half[add]])
        )
    uniq = np.unique(np.concatenate(keys))
    return uniq // n, uniq % n


#: The ways :func:`k_reciprocal_distances` may size a candidate's reciprocal set.
EXPANSIONS = ("zhong", "authors")


def expansion_size(k1: int, expansion: str = "zhong") -> int:
    """Neighbours (besides itself) a candidate's reciprocal set is drawn from (``expansion``)."""
    if expansion == "zhong":
        return int(np.around(k1 / 2.0))
    if expansion == "authors":
        return int(np.floor((k1 + 1) / 2.0 + 0.5)) - 1
    raise ConfigError(
        f"re-ranking expansion must be one of {', '.join(EXPANSIONS)}, got {expansion!r}"
    )


def k_reciprocal_distances(
    query: ArrayLike,
    gallery: ArrayLike,
    *,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    expansion: str = "zhong",
) -> np.ndarray:
    """(Q, G) float32 re-ranked distances (1-lambda) d_J + lambda d of Zhong et al. (module docstring).

    ``expansion``: how many neighbours a candidate's own reciprocal set is drawn from.
    ``zhong``: round(k1 / 2) besides itself (their Python code, ``np.around``, half to even);
    ``authors``: ``round((k1 + 1) / 2)`` including itself, MATLAB's round (half away from
    zero), as Wang et al.'s ``re_ranking_cosine.m``:30 does. They differ for k1 = 3, 7, 11, ...
    """
    q, g = as_array(query), as_array(gallery)
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"query features have dim {q.shape[1]}, gallery features {g.shape[1]}")
    nq, ng = len(q), len(g)
    x = normalized_rows(np.concatenate([q, g]))
    n = len(x)
    if not 1 <= k1 < n:
        raise ConfigError(
            f"re-ranking k1 must be in [1, {n - 1}] (queries + gallery - 1), got {k1}"
        )
    if not 1 <= k2 <= k1 + 1:
        raise ConfigError(f"re-ranking k2 must be in [1, k1 + 1 = {k1 + 1}], got {k2}")
    if not 0.0 <= lambda_value <= 1.0:
        raise ConfigError(f"re-ranking lambda_value must be in [0, 1], got {lambda_value}")

    far, _ = knn_search(-x, x, k=1, normalize=False)  # max_j -x_i.x_j = -(lowest similarity)
    row_max = np.maximum(2.0 + 2.0 * far[:, 0].astype(np.float64), 1e-12)
    _, others = knn_search(x, k=k1, exclude_self=True, normalize=False)
    nn = np.concatenate([np.arange(n)[:, None], others], axis=1)

    rows, cols = _expanded_sets(nn, expansion_size(k1, expansion))
    sims = np.empty(len(rows), dtype=np.float64)
    step = max(1, MAX_BLOCK_ELEMENTS // x.shape[1])
    for a in range(0, len(rows), step):
        r, c = rows[a : a + step], cols[a : a + step]
        sims[a : a + step] = np.einsum("ij,ij->i", x[r], x[c], dtype=np.float64)
    w = np.exp(-np.maximum(2.0 - 2.0 * sims, 0.0) / row_max[rows])
    w /= np.bincount(rows, weights=w, minlength=n)[rows]
    v = sp.csr_matrix((w, (rows, cols)), shape=(n, n))
    if k2 > 1:
        qe = sp.csr_matrix(
            (np.full(n * k2, 1.0 / k2), (np.repeat(np.arange(n), k2), nn[:, :k2].ravel())),
            shape=(n, n),
        )
        v = (qe @ v).tocsr()

    out = np.empty((nq, ng), dtype=np.float32)
    for a, b, jaccard in _jaccard_blocks(v, nq, ng):
        sim = (x[a:b] @ x[nq:].T).astype(np.float64)
        d = np.maximum(2.0 - 2.0 * sim, 0.0) / row_max[a:b, None]
        out[a:b] = (1.0 - lambda_value) * jaccard + lambda_value * d
    return out


def _jaccard_blocks(v: sp.csr_matrix, nq: int, ng: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield (a, b, block): weighted Jaccard distances 1 - sum min / sum max of rows a:b vs rows nq+g.

    Only pairs of rows sharing a nonzero column contribute to sum min; they are
    generated column by column (ragged ranges), a bounded number at a time.
    """
    sums = np.asarray(v.sum(axis=1)).ravel()
    vq = v[:nq].tocoo()
    vg = v[nq:].tocsc()
    pairs_per_entry = np.diff(vg.indptr)[vq.col]  # gallery rows sharing each query entry's column
    per_query = np.bincount(vq.row, weights=pairs_per_entry, minlength=nq)
    max_rows = max(1, MAX_BLOCK_ELEMENTS // max(ng, 1))
    a = 0
    while a < nq:
        fits = int(np.searchsorted(np.cumsum(per_query[a:]), MAX_BLOCK_ELEMENTS, side="right"))
        b = a + max(1, min(fits, max_rows))
        lo, hi = np.searchsorted(vq.row, [a, b])
        r, k, val = vq.row[lo:hi] - a, vq.col[lo:hi], vq.data[lo:hi]
        counts = pairs_per_entry[lo:hi]
        pos = np.repeat(vg.indptr[k] - (np.cumsum(counts) - counts), counts) + np.arange(
            counts.sum()
        )
        mins = np.minimum(np.repeat(val, counts), vg.data[pos])
        flat = np.repeat(r, counts) * ng + vg.indices[pos]
        smin = np.bincount(flat, weights=mins, minlength=(b - a) * ng).reshape(b - a, ng)
        smax = sums[a:b, None] + sums[None, nq:] - smin
        yield a, b, 1.0 - np.divide(smin, smax, out=np.zeros_like(smin), where=smax > 0)
        a = b
