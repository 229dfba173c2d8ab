"""Retrieval metrics against hand-worked examples and an independent float64 loop."""

from __future__ import annotations

import numpy as np
import pytest

from softmine.evaluation import knn_search, map_at_r, nmi, recall_at_k
from softmine.evaluation.knn import as_float32


def _unit(angles_deg: list[float]) -> np.ndarray:
    a = np.deg2rad(np.asarray(angles_deg))
    return np.stack([np.cos(a), np.sin(a)], 1)


def test_recall_hand_example() -> None:
    # Unit vectors at 0, 10, 100, 110, 205 degrees with labels 0 0 1 0 1.
    # Neighbours by angle (nearest first), hit = same label:
    #   q0: 1 hit            -> hit@1
    #   q1: 0 hit            -> hit@1
    #   q2: 3, 1, 0, 4       -> first hit at rank 4
    #   q3: 2, 4, 1          -> first hit at rank 3
    #   q4: 3, 2             -> first hit at rank 2
    x = _unit([0, 10, 100, 110, 205])
    y = np.array([0, 0, 1, 0, 1])
    r = recall_at_k(x, y, ks=(1, 2, 3, 4))
    assert r == pytest.approx({1: 2 / 5, 2: 3 / 5, 3: 4 / 5, 4: 1.0})


def test_self_is_excluded_by_index_so_duplicates_count() -> None:
    # Two identical points of the same class: each is the other's nearest neighbour.
    x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    y = np.array([0, 0, 1])
    assert recall_at_k(x, y, ks=(1,))[1] == pytest.approx(2 / 3)
    _, idx = knn_search(as_float32(x), k=1, exclude_self=True)
    assert idx[0, 0] == 1 and idx[1, 0] == 0


def test_map_at_r_hand_example() -> None:
    # Query 0 (label 0) has R=2 same-label others; ranking: 1 (rel), 3 (not), 2 (rel).
    x = _unit([0, 5, 40, 20])
    y = np.array([0, 0, 0, 1])
    # q0: order 1(5),3(20),2(40): rel@1 -> P=1; R=2 window [1,3]: AP = (1)/2 = 0.5
    # q1: distances 5->0 (5), 3 (15), 2 (35): order 0,3 -> AP=(1)/2 = 0.5
    # q2: 2 at 40: 3 (20), 1 (35), 0 (40): order 3,1 -> rel at 2: P=1/2 -> AP = 0.5/2 = 0.25
    # q3: R=0 -> skipped
    assert map_at_r(x, y) == pytest.approx((0.5 + 0.5 + 0.25) / 3)


def _loop_reference(x: np.ndarray, y: np.ndarray, ks: tuple[int, ...]) -> tuple[dict, float]:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    n = len(y)
    recalls = {k: 0.0 for k in ks}
    aps = []
    for q in range(n):
        sims = [(float(x[q] @ x[j]), j) for j in range(n) if j != q]
        order = [j for _, j in sorted(sims, key=lambda t: -t[0])]
        for k in ks:
            recalls[k] += any(y[j] == y[q] for j in order[:k]) / n
        r = sum(1 for j in range(n) if j != q and y[j] == y[q])
        if r:
            hits, ap = 0, 0.0
            for i, j in enumerate(order[:r], start=1):
                if y[j] == y[q]:
                    hits += 1
                    ap += hits / i
            aps.append(ap / r)
    return recalls, float(np.mean(aps))


def test_against_float64_loop_on_random_data() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 16))
    y = rng.integers(0, 6, size=120)
    ks = (1, 2, 4, 8)
    ref_recall, ref_map = _loop_reference(x, y, ks)
    got = recall_at_k(x, y, ks)
    for k in ks:
        assert got[k] == pytest.approx(ref_recall[k], abs=1e-9)
    assert map_at_r(x, y) == pytest.approx(ref_map, abs=1e-6)


def test_nmi_perfect_clusters_and_tensor_inputs() -> None:
    import torch

    rng = np.random.default_rng(1)
    centers = np.eye(4) * 10
    y = np.repeat(np.arange(4), 25)
    x = centers[y] + rng.normal(scale=0.01, size=(100, 4))
    assert nmi(x, y) == pytest.approx(1.0)
    assert recall_at_k(torch.from_numpy(x), torch.from_numpy(y))[1] == 1.0


def test_bad_inputs_are_clear() -> None:
    with pytest.raises(ValueError, match="2-D"):
        recall_at_k(np.zeros(5), np.zeros(5))
    with pytest.raises(ValueError, match="NaN"):
        recall_at_k(np.full((3, 2), np.nan), np.zeros(3))
