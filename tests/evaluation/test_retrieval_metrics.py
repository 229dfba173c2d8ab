"""Retrieval metrics and the k-NN layer against hand-worked examples and an independent float64 loop."""

from __future__ import annotations

import tracemalloc

import faiss
import numpy as np
import pytest

from softmine.errors import ConfigError
from softmine.evaluation import (
    average_precision_at_r,
    knn,
    knn_search,
    map_at_r,
    nmi,
    query_gallery_metrics,
    r_precision,
    ranking_metrics,
    recall_at_k,
    retrieval_metrics,
)
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


def _loop_reference(x: np.ndarray, y: np.ndarray, ks: tuple[int, ...]) -> tuple[dict, float, float]:
    """Recall@K, MAP@R and R-Precision by sorting every query's neighbours in float64."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    n = len(y)
    recalls = {k: 0.0 for k in ks}
    aps, rps = [], []
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
            rps.append(hits / r)
    return recalls, float(np.mean(aps)), float(np.mean(rps))


def _tie_free(x: np.ndarray) -> None:
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    gaps = np.diff(np.sort(xn @ xn.T, axis=1), axis=1)
    assert gaps.min() > 1e-6, "test data must be free of (float32) ties"


@pytest.mark.parametrize("chunk_size", [None, 7])
def test_against_float64_loop_on_random_data(chunk_size: int | None) -> None:
    rng = np.random.default_rng(8)
    x = rng.normal(size=(120, 16))
    y = rng.integers(0, 6, size=120)
    y[:3] = 99  # a class with few items; and one singleton below
    y[3] = 100
    _tie_free(x)
    ks = (1, 2, 3, 4, 8, 16)
    ref_recall, ref_map, ref_rp = _loop_reference(x, y, ks)
    got = ranking_metrics(x, y, ks, chunk_size=chunk_size)
    for k in ks:
        assert got[f"recall@{k}"] == pytest.approx(ref_recall[k], abs=1e-9)
    assert got["map@r"] == pytest.approx(ref_map, abs=1e-9)
    assert got["r_precision"] == pytest.approx(ref_rp, abs=1e-9)
    assert recall_at_k(x, y, ks) == pytest.approx(ref_recall, abs=1e-9)
    assert map_at_r(x, y) == pytest.approx(ref_map, abs=1e-9)
    assert r_precision(x, y) == pytest.approx(ref_rp, abs=1e-9)


def test_retrieval_metrics_keys() -> None:
    rng = np.random.default_rng(3)
    m = retrieval_metrics(rng.normal(size=(40, 4)), rng.integers(0, 4, 40), (1, 2))
    assert set(m) == {"recall@1", "recall@2", "map@r", "r_precision", "nmi"}


def test_no_n_by_n_matrix_is_materialised() -> None:
    # 12,000 items: an N x N float32 matrix would take 576 MB; numpy allocations must
    # stay at the size of the inputs and a chunk of results (the index is faiss's).
    rng = np.random.default_rng(0)
    n, d = 12_000, 4
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.integers(0, 1_500, n)
    tracemalloc.start()
    try:
        ranking_metrics(x, y, (1, 2, 4, 8))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 0.02 * n * n * 4, f"peak numpy allocation {peak / 2**20:.0f} MiB"


def test_gpu_path_is_used_when_faiss_has_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    # No GPU here: stand-ins record that the CPU index is handed to faiss's GPU converter.
    moved = []
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1, raising=False)
    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(
        faiss, "index_cpu_to_gpu", lambda res, dev, idx: moved.append(dev) or idx, raising=False
    )
    monkeypatch.setattr(knn, "_GPU_RESOURCES", {})
    x = np.random.default_rng(0).normal(size=(50, 4))
    _, on_gpu = knn_search(x, k=3, exclude_self=True, device="auto")
    assert moved == [0]
    _, on_cpu = knn_search(x, k=3, exclude_self=True, device="cpu")
    np.testing.assert_array_equal(on_gpu, on_cpu)
    big = np.random.default_rng(1).normal(size=(knn.GPU_MAX_K + 10, 4))
    knn_search(big[:5], big, k=knn.GPU_MAX_K + 1, device="cuda:0")  # k too large for the GPU
    assert moved == [0]


def test_cuda_without_faiss_gpu_is_a_config_error() -> None:
    if knn.faiss_gpu_available():
        pytest.skip("this faiss has a GPU")
    with pytest.raises(ConfigError, match="faiss-gpu"):
        knn_search(np.ones((3, 2)), k=1, device="cuda")


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
    with pytest.raises(ValueError, match="whole numbers"):
        recall_at_k(np.ones((3, 2)), np.array([0.5, 1.0, 2.0]))
    with pytest.raises(ValueError, match="3 embeddings but 2 labels"):
        recall_at_k(np.ones((3, 2)), np.array([0, 1]))
    with pytest.raises(ValueError, match="NaN"):
        recall_at_k(np.full((3, 2), np.nan), np.zeros(3))


# ------------------------------------------------------------ query / gallery


def _query_gallery_loop(q, qy, g, gy, ks):
    """Float64 per-query loop: rank the gallery, Recall@K, AP over the first R, R-Precision."""
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    hits = dict.fromkeys(ks, 0)
    aps, rps = [], []
    for i in range(len(q)):
        order = np.argsort(-(gn @ qn[i]), kind="stable")
        rel = gy[order] == qy[i]
        for k in ks:
            hits[k] += bool(rel[:k].any())
        r = int(rel.sum())
        if r:
            prec = np.cumsum(rel[:r]) / np.arange(1, r + 1)
            aps.append(float((prec * rel[:r]).sum() / r))
            rps.append(float(rel[:r].sum() / r))
    return {k: hits[k] / len(q) for k in ks}, float(np.mean(aps)), float(np.mean(rps))


def test_query_gallery_hand_example() -> None:
    # Query at 0 degrees, label 1; gallery at 5 (label 2), 10 (label 1), 20 (label 1), 30 (2).
    # Ranked: 2, 1, 1, 2 -> first hit at rank 2; R = 2: AP = (1/2) / 2; R-Precision = 1/2.
    m = query_gallery_metrics(_unit([0]), [1], _unit([5, 10, 20, 30]), [2, 1, 1, 2], ks=(1, 2))
    assert m == pytest.approx({"recall@1": 0.0, "recall@2": 1.0, "map@r": 0.25, "r_precision": 0.5})
    # A query whose label is not in the gallery is a miss for Recall@K, left out of MAP@R.
    m = query_gallery_metrics(_unit([0, 90]), [1, 7], _unit([5, 10]), [1, 2], ks=(1,))
    assert m["recall@1"] == 0.5 and m["map@r"] == 1.0


@pytest.mark.parametrize("chunk_size", [None, 7])
def test_query_gallery_against_float64_loop(chunk_size: int | None) -> None:
    rng = np.random.default_rng(3)
    centers = rng.normal(size=(9, 8))
    qy, gy = rng.integers(0, 9, 60), rng.integers(0, 9, 150)
    q = centers[qy] + rng.normal(scale=0.9, size=(60, 8))
    g = centers[gy] + rng.normal(scale=0.9, size=(150, 8))
    ks = (1, 5, 10, 30)
    ref_recall, ref_map, ref_rp = _query_gallery_loop(q, qy, g, gy, ks)
    got = query_gallery_metrics(q, qy, g, gy, ks, chunk_size=chunk_size)
    assert {k: got[f"recall@{k}"] for k in ks} == pytest.approx(ref_recall, abs=1e-12)
    assert got["map@r"] == pytest.approx(ref_map, abs=1e-6)
    assert got["r_precision"] == pytest.approx(ref_rp, abs=1e-6)
    # Renumbering the labels (0-based to 1-based) changes nothing.
    assert query_gallery_metrics(q, qy + 1, g, gy + 1, ks, chunk_size=chunk_size) == got


def test_query_gallery_bad_inputs() -> None:
    with pytest.raises(ValueError, match="must match one to one"):
        query_gallery_metrics(np.ones((2, 3)), [1], np.ones((3, 3)), [1, 2, 3])
    with pytest.raises(ValueError, match="items on both sides"):
        query_gallery_metrics(np.ones((2, 3)), [1, 2], np.ones((0, 3)), [])


def test_average_precision_at_r_per_query_hand_example() -> None:
    # The MAP@R hand example above, query by query: 0.5, 0.5, 0.25, and none for the
    # query whose label has no other item.
    ap = average_precision_at_r(_unit([0, 5, 40, 20]), np.array([0, 0, 0, 1]))
    assert ap[:3] == pytest.approx([0.5, 0.5, 0.25]) and np.isnan(ap[3])


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_average_precision_at_r_against_float64_loop(chunk_size: int | None) -> None:
    rng = np.random.default_rng(11)
    x = rng.normal(size=(60, 8))
    y = rng.integers(0, 5, size=60)
    y[0] = 77  # a singleton: no AP
    _tie_free(x)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    expected = []
    for q in range(len(y)):
        order = sorted((j for j in range(len(y)) if j != q), key=lambda j: -float(xn[q] @ xn[j]))
        r = sum(1 for j in order if y[j] == y[q])
        hits, ap = 0, 0.0
        for i, j in enumerate(order[:r], start=1):
            if y[j] == y[q]:
                hits += 1
                ap += hits / i
        expected.append(ap / r if r else np.nan)
    got = average_precision_at_r(x, y, chunk_size=chunk_size)
    assert got == pytest.approx(np.array(expected), abs=1e-9, nan_ok=True)
