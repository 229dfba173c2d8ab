"""k-reciprocal re-ranking against a per-sample float64 loop of Zhong et al.'s algorithm."""

from __future__ import annotations

import numpy as np
import pytest

from softmine.errors import ConfigError
from softmine.evaluation import evaluate_reid, evaluate_reid_distmat, k_reciprocal_distances


def _reference(q: np.ndarray, g: np.ndarray, k1: int, k2: int, lam: float) -> np.ndarray:
    """The algorithm of the paper, one sample at a time, with a dense N x N float64 matrix."""
    x = np.concatenate([q, g])
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    n, nq = len(x), len(q)
    dist = np.maximum(2.0 - 2.0 * x @ x.T, 0.0)
    dist = dist / dist.max(axis=1, keepdims=True)
    rank = np.argsort(dist, axis=1)

    def reciprocal(i: int, k: int) -> list[int]:
        return [int(j) for j in rank[i, : k + 1] if i in rank[j, : k + 1]]

    v = np.zeros((n, n))
    kh = int(np.around(k1 / 2))
    for i in range(n):
        r = reciprocal(i, k1)
        expanded = set(r)
        for c in r:
            rc = reciprocal(c, kh)
            if len(set(rc) & set(r)) > 2 / 3 * len(rc):
                expanded |= set(rc)
        cols = sorted(expanded)
        w = np.exp(-dist[i, cols])
        v[i, cols] = w / w.sum()
    if k2 > 1:
        v = np.stack([v[rank[i, :k2]].mean(0) for i in range(n)])
    jac = np.zeros((nq, n - nq))
    for i in range(nq):
        for j in range(n - nq):
            a, b = v[i], v[nq + j]
            jac[i, j] = 1 - np.minimum(a, b).sum() / np.maximum(a, b).sum()
    return (1 - lam) * jac + lam * dist[:nq, nq:]


def _data(seed: int, nq: int = 15, ng: int = 70, d: int = 8):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(6, d)) * 2
    qp, gp = rng.integers(0, 6, nq), rng.integers(0, 6, ng)
    q = centers[qp] + rng.normal(size=(nq, d))
    g = centers[gp] + rng.normal(size=(ng, d))
    return q, qp, g, gp


@pytest.mark.parametrize(("k1", "k2", "lam"), [(20, 6, 0.3), (7, 1, 0.5), (5, 3, 0.0)])
def test_matches_per_sample_reference(k1: int, k2: int, lam: float) -> None:
    q, _, g, _ = _data(0)
    x = np.concatenate([q, g])
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    gaps = np.diff(np.sort(x @ x.T, axis=1), axis=1)
    assert gaps.min() > 1e-6, "test data must be free of (float32) ties"
    got = k_reciprocal_distances(q, g, k1=k1, k2=k2, lambda_value=lam)
    np.testing.assert_allclose(got, _reference(q, g, k1, k2, lam), atol=2e-6)


def test_rerank_option_of_evaluate_reid_ranks_by_the_reranked_distance() -> None:
    q, qp, g, gp = _data(1)
    qc, gc = np.zeros(len(q), int), np.ones(len(g), int)
    dist = k_reciprocal_distances(q, g)
    want = evaluate_reid_distmat(dist, qp, qc, gp, gc, ap="market")
    got = evaluate_reid(q, qp, qc, g, gp, gc, rerank=True, ap="market")
    assert got.mAP == pytest.approx(want.mAP, abs=1e-12)
    np.testing.assert_array_equal(got.first_match_rank, want.first_match_rank)


def test_bad_parameters_are_clear() -> None:
    q, _, g, _ = _data(2, nq=3, ng=5)
    with pytest.raises(ConfigError, match="k1 must be in"):
        k_reciprocal_distances(q, g, k1=20)
    with pytest.raises(ConfigError, match="lambda_value"):
        k_reciprocal_distances(q, g, k1=3, k2=2, lambda_value=1.5)
