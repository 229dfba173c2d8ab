"""Re-identification metrics: CMC and mAP under the Market-1501 / MARS protocol.

For each query the gallery is ranked by cosine similarity (or by a given distance
matrix, e.g. after k-reciprocal re-ranking), then:

- gallery items with the query's identity *and* camera are removed (same-camera
  matches are trivial: the official "junk" of Market-1501 and MARS);
- gallery items whose identity is in ``junk_pids`` (MARS/Market: -1) are removed;
- gallery items whose identity is in ``distractor_pids`` (MARS/Market: 0) stay in the
  ranking as negatives for every query and are never a match;
- by default both lists are empty: every identity is real, so a data set with 0-based
  identities keeps identity 0. Each dataset config declares its own lists
  (``dataset.junk_pids``, ``dataset.distractor_pids``) and the evaluator passes them;
- a true match is a remaining gallery item with the query's identity;
- a query with no true match is skipped and counted (``num_skipped``), never silently.

Ties in similarity are broken against the query (a true match tied with a negative
is ranked after it), so degenerate embeddings cannot score well by accident.

The ranking is vectorised over chunks of queries (no loop over queries): only the
negatives scoring at or above a query's lowest true match can change its ranks, so
each row keeps those, is sorted, and every true match finds the number of negatives
above it by a binary search done for all matches of the chunk at once.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from softmine.errors import ConfigError, DataError
from softmine.evaluation.knn import ArrayLike, as_array, as_labels, normalized_rows
from softmine.evaluation.metric_names import CMC, MAP

log = logging.getLogger(__name__)

APType = Literal["standard", "market"]
AP_TYPES = ("standard", "market")
#: Bound on query rows x gallery size of one chunk of the score matrix.
MAX_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class ReIDResult:
    """Per-query outcome of a re-ID evaluation and its averages over the evaluated queries."""

    cmc: np.ndarray  #: (max_rank,) fraction of evaluated queries with a true match within rank r+1
    mAP: float  #: mean AP over the evaluated (not skipped) queries, in [0, 1]
    ap: np.ndarray  #: (num_queries,) AP of each query (``ap_type``), NaN where skipped
    first_match_rank: np.ndarray  #: (num_queries,) rank of the first true match, 0 if skipped
    num_matches: np.ndarray  #: (num_queries,) true matches in the gallery after removals
    num_skipped: int  #: queries without any true match, left out of cmc and mAP
    ap_type: str  #: "standard" or "market"

    @property
    def num_queries(self) -> int:
        """All queries, evaluated and skipped."""
        return len(self.ap)

    def cmc_at(self, rank: int) -> float:
        """Fraction of evaluated queries whose first true match is within the top ``rank``."""
        valid = self.first_match_rank > 0
        return float((self.first_match_rank[valid] <= rank).mean())

    def metrics(self, ranks: Sequence[int] = (1, 5, 10, 20)) -> dict[str, float]:
        """Flat dict for ``metrics.json``: ``cmc@R`` per rank, ``mAP`` and ``num_skipped_queries``."""
        out: dict[str, float] = {f"{CMC}{r}": self.cmc_at(int(r)) for r in ranks}
        out[MAP] = self.mAP
        out["num_skipped_queries"] = self.num_skipped
        return out


def _count_at_least(sorted_rows: np.ndarray, rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    """For each (row, value): entries of ``sorted_rows[row]`` (ascending) that are >= value.

    A binary search run for all pairs at once (a fixed number of vectorised halvings).
    """
    g = sorted_rows.shape[1]
    flat = sorted_rows.ravel()
    base = rows * g
    lo = np.zeros(len(rows), dtype=np.int64)
    hi = np.full(len(rows), g, dtype=np.int64)
    for _ in range(int(g).bit_length()):
        mid = (lo + hi) // 2
        below = flat[base + np.minimum(mid, g - 1)] < values
        open_ = lo < hi
        lo = np.where(open_ & below, mid + 1, lo)
        hi = np.where(open_ & ~below, mid, hi)
    return g - lo


def _rank_chunk(
    scores: np.ndarray,
    q_pids: np.ndarray,
    q_cams: np.ndarray,
    g_pids: np.ndarray,
    g_cams: np.ndarray,
    g_countable: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """First-match rank, standard AP, market AP and match count of each query of a (c, G) chunk.

    The gallery holds no junk here (removed by the caller). A negative is a gallery item of
    another identity; negatives of a query scoring below its lowest match change nothing,
    so only the others are kept (the rest become -inf) and each row is sorted. The rank
    of the i-th best match is then i + (negatives scoring >= it), ties going against it.
    """
    c = scores.shape[0]
    same_pid = q_pids[:, None] == g_pids[None, :]
    match = same_pid & (q_cams[:, None] != g_cams[None, :])
    match &= g_countable[None, :]
    n_match = match.sum(1)
    lowest = np.where(match, scores, np.inf).min(1)
    negatives = np.where(~same_pid & (scores >= lowest[:, None]), scores, -np.inf)
    negatives.sort(axis=1)
    r, col = np.nonzero(match)
    t = scores[r, col]
    order = np.lexsort((-t, r))
    r, t = r[order], t[order]
    n_before = _count_at_least(negatives, r, t).astype(np.float64)  # negatives ranked above
    row_start = np.searchsorted(r, r)
    i = (np.arange(len(r)) - row_start + 1).astype(np.float64)  # 1-based index among matches
    rank = i + n_before
    prev = np.where(rank > 1, (i - 1) / np.maximum(rank - 1, 1), 1.0)
    ap_std = np.bincount(r, weights=i / rank, minlength=c)
    ap_mkt = np.bincount(r, weights=(prev + i / rank) / 2, minlength=c)
    first = np.zeros(c, dtype=np.int64)
    first[r[i == 1]] = rank[i == 1].astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return first, ap_std / n_match, ap_mkt / n_match, n_match


def _ids(name: str, ids: ArrayLike, n: int) -> np.ndarray:
    out = as_labels(ids)
    if len(out) != n:
        raise ValueError(f"{name} has {len(out)} entries but there are {n} features")
    return out


def _query_gallery_ids(
    ids: tuple[ArrayLike, ArrayLike, ArrayLike, ArrayLike], nq: int, ng: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(query pids, query camids, gallery pids, gallery camids), checked against nq and ng items."""
    qp, qc = _ids("query_pids", ids[0], nq), _ids("query_camids", ids[1], nq)
    gp, gc = _ids("gallery_pids", ids[2], ng), _ids("gallery_camids", ids[3], ng)
    return qp, qc, gp, gc


def _evaluate(
    scores_fn: Callable[[int, int], np.ndarray],
    q_pids: np.ndarray,
    q_cams: np.ndarray,
    g_pids: np.ndarray,
    g_cams: np.ndarray,
    *,
    max_rank: int,
    ap: str,
    distractor_pids: Sequence[int],
    chunk_size: int | None,
) -> ReIDResult:
    """The protocol on a junk-free gallery; ``scores_fn(a, b)`` gives queries a:b's (b-a, G) scores."""
    if ap not in AP_TYPES:
        raise ConfigError(f"unknown AP definition {ap!r}; use one of {AP_TYPES}")
    if max_rank < 1:
        raise ConfigError(f"max_rank must be >= 1, got {max_rank}")
    nq, ng = len(q_pids), len(g_pids)
    if ng == 0:
        raise DataError("the re-ID gallery is empty (or only junk); check the gallery split")
    g_countable = ~np.isin(g_pids, np.asarray(list(distractor_pids), dtype=np.int64))
    rows = chunk_size or max(1, MAX_CHUNK_ELEMENTS // ng)
    first = np.zeros(nq, dtype=np.int64)
    aps = np.full(nq, np.nan)
    n_match = np.zeros(nq, dtype=np.int64)
    for a in range(0, nq, rows):
        b = min(a + rows, nq)
        s = np.asarray(scores_fn(a, b), dtype=np.float32)
        f, ap_std, ap_mkt, m = _rank_chunk(s, q_pids[a:b], q_cams[a:b], g_pids, g_cams, g_countable)
        first[a:b], n_match[a:b] = f, m
        aps[a:b] = ap_std if ap == "standard" else ap_mkt
    valid = n_match > 0
    num_skipped = int((~valid).sum())
    if not valid.any():
        raise DataError(
            f"none of the {nq} queries has a true match in the gallery (same identity, "
            "another camera, not junk); check the pids/camids of the query and gallery splits"
        )
    if num_skipped:
        log.info("%d of %d queries have no true match and were skipped", num_skipped, nq)
    aps[~valid] = np.nan
    cmc = (first[valid, None] <= np.arange(1, max_rank + 1)[None, :]).mean(0)
    return ReIDResult(
        cmc=cmc,
        mAP=float(aps[valid].mean()),
        ap=aps,
        first_match_rank=first,
        num_matches=n_match,
        num_skipped=num_skipped,
        ap_type=ap,
    )


def _not_junk(g_pids: np.ndarray, junk_pids: Sequence[int]) -> np.ndarray:
    return ~np.isin(g_pids, np.asarray(list(junk_pids), dtype=np.int64))


def evaluate_reid_distmat(
    distmat: ArrayLike,
    query_pids: ArrayLike,
    query_camids: ArrayLike,
    gallery_pids: ArrayLike,
    gallery_camids: ArrayLike,
    *,
    max_rank: int = 20,
    ap: APType = "standard",
    junk_pids: Sequence[int] = (),
    distractor_pids: Sequence[int] = (),
    chunk_size: int | None = None,
) -> ReIDResult:
    """Like :func:`evaluate_reid`, ranking by a given (Q, G) distance matrix (lower = closer)."""
    d = as_array(distmat)
    if not np.isfinite(d).all():
        raise ValueError("the distance matrix contains NaN or Inf")
    qp, qc, gp, gc = _query_gallery_ids(
        (query_pids, query_camids, gallery_pids, gallery_camids), *d.shape
    )
    keep = _not_junk(gp, junk_pids)
    cols = np.flatnonzero(keep)
    return _evaluate(
        lambda a, b: np.negative(d[a:b][:, cols]),
        qp,
        qc,
        gp[keep],
        gc[keep],
        max_rank=max_rank,
        ap=ap,
        distractor_pids=distractor_pids,
        chunk_size=chunk_size,
    )


def evaluate_reid(
    query: ArrayLike,
    query_pids: ArrayLike,
    query_camids: ArrayLike,
    gallery: ArrayLike,
    gallery_pids: ArrayLike,
    gallery_camids: ArrayLike,
    *,
    max_rank: int = 20,
    ap: APType = "standard",
    rerank: bool = False,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    junk_pids: Sequence[int] = (),
    distractor_pids: Sequence[int] = (),
    chunk_size: int | None = None,
) -> ReIDResult:
    """CMC, AP per query and mAP of query/gallery features by cosine similarity (module protocol).

    ``junk_pids`` / ``distractor_pids`` (default: none, every identity real) are the
    identities removed from the gallery / kept in it as never-matching negatives; MARS
    and Market-1501 use ``(-1,)`` / ``(0,)``.

    ``ap`` picks the AP definition, with rank_i the rank of the i-th true match among the
    kept gallery items and M the number of true matches:

    - ``"standard"``: non-interpolated AP = (1/M) sum_{i=1..M} i / rank_i;
    - ``"market"``: the trapezoid AP of the official Market-1501/MARS MATLAB code
      (``compute_AP.m``): (1/M) sum_i (P(rank_i - 1) + P(rank_i)) / 2, with P(r) the
      precision of the top r and P(0) = 1.

    ``rerank=True`` ranks by the k-reciprocal re-ranking distance of Zhong et al.
    (CVPR 2017) with ``k1``, ``k2`` and ``lambda_value``
    (:func:`softmine.evaluation.rerank.k_reciprocal_distances`), computed on the gallery
    as given (junk included, as in the official pipeline) and then ranked by the same rules.
    Queries are processed ``chunk_size`` at a time (default: about 4M scores per chunk).
    """
    q, g = as_array(query), as_array(gallery)
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"query features have dim {q.shape[1]}, gallery features {g.shape[1]}")
    qp, qc, gp, gc = _query_gallery_ids(
        (query_pids, query_camids, gallery_pids, gallery_camids), len(q), len(g)
    )
    opts = dict(max_rank=max_rank, ap=ap, distractor_pids=distractor_pids, chunk_size=chunk_size)
    if rerank:
        from softmine.evaluation.rerank import k_reciprocal_distances

        dist = k_reciprocal_distances(q, g, k1=k1, k2=k2, lambda_value=lambda_value)
        return evaluate_reid_distmat(dist, qp, qc, gp, gc, junk_pids=junk_pids, **opts)
    keep = _not_junk(gp, junk_pids)
    qn, gn = normalized_rows(q), normalized_rows(g[keep])
    return _evaluate(lambda a, b: qn[a:b] @ gn.T, qp, qc, gp[keep], gc[keep], **opts)


def cmc_map(
    query: ArrayLike,
    query_pids: ArrayLike,
    query_camids: ArrayLike,
    gallery: ArrayLike,
    gallery_pids: ArrayLike,
    gallery_camids: ArrayLike,
    max_rank: int = 20,
    *,
    junk_pids: Sequence[int] = (),
    distractor_pids: Sequence[int] = (),
) -> tuple[np.ndarray, float]:
    """(CMC (max_rank,), mAP) under the Market-1501/MARS rules, cosine similarity, standard AP.

    Every identity is real unless listed in ``junk_pids`` (removed from the gallery) or
    ``distractor_pids`` (kept as negatives, never a match); MARS: ``junk_pids=(-1,)``,
    ``distractor_pids=(0,)``. Queries without a true match are skipped; a ``UserWarning``
    says how many (use :func:`evaluate_reid` for the count, the trapezoid AP and re-ranking).
    """
    res = evaluate_reid(
        query,
        query_pids,
        query_camids,
        gallery,
        gallery_pids,
        gallery_camids,
        max_rank=max_rank,
        junk_pids=junk_pids,
        distractor_pids=distractor_pids,
    )
    if res.num_skipped:
        warnings.warn(
            f"{res.num_skipped} of {res.num_queries} queries have no true match in the gallery "
            "(after removing junk and same-camera items) and were left out of CMC and mAP",
            UserWarning,
            stacklevel=2,
        )
    return res.cmc, res.mAP


def reid_metrics(
    query: ArrayLike,
    query_pids: ArrayLike,
    query_camids: ArrayLike,
    gallery: ArrayLike,
    gallery_pids: ArrayLike,
    gallery_camids: ArrayLike,
    *,
    ranks: Sequence[int] = (1, 5, 10, 20),
    ap: APType = "standard",
    rerank: bool = False,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    junk_pids: Sequence[int] = (),
    distractor_pids: Sequence[int] = (),
) -> dict[str, float]:
    """The flat dict for ``metrics.json``: ``cmc@R`` for each R in ``ranks``, ``mAP``, ``num_skipped_queries``."""
    res = evaluate_reid(
        query,
        query_pids,
        query_camids,
        gallery,
        gallery_pids,
        gallery_camids,
        max_rank=max(ranks),
        ap=ap,
        rerank=rerank,
        k1=k1,
        k2=k2,
        lambda_value=lambda_value,
        junk_pids=junk_pids,
        distractor_pids=distractor_pids,
    )
    return res.metrics(ranks)
