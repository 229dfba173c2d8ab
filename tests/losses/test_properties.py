"""Property tests (hypothesis): losses and metrics on random batch sizes, label patterns, dimensions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from softmine.evaluation import map_at_r, nmi, recall_at_k
from softmine.losses import OSMCAALoss, weighted_contrastive_loss

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


@st.composite
def batches(
    draw: st.DrawFn, min_n: int = 2, max_n: int = 24, min_d: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    n = draw(st.integers(min_n, max_n))
    d = draw(st.integers(min_d, 12))
    k = draw(st.integers(1, max(1, n // 2)))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    if draw(st.booleans()):  # sometimes duplicate rows (identical embeddings)
        x[: n // 2] = x[0]
    y = rng.integers(0, k, size=n)
    return x, y


@SETTINGS
@given(batch=batches(), osm=st.booleans(), caa=st.booleans(), scale=st.floats(0.01, 100.0))
def test_loss_finite_and_invariant(batch, osm: bool, caa: bool, scale: float) -> None:
    x, y = batch
    f = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor(y)
    att = (
        torch.rand(len(y), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        if caa
        else None
    )
    loss = weighted_contrastive_loss(f, labels, att, osm=osm)
    loss.backward()
    assert torch.isfinite(loss) and loss >= 0
    assert torch.isfinite(f.grad).all()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(2))
    permuted = weighted_contrastive_loss(
        f.detach()[perm], labels[perm], None if att is None else att[perm], osm=osm
    )
    rescaled = weighted_contrastive_loss(f.detach() * scale, labels, att, osm=osm)
    assert float(permuted) == pytest.approx(loss.item(), rel=1e-9, abs=1e-12)
    assert float(rescaled) == pytest.approx(loss.item(), rel=1e-7, abs=1e-10)


@SETTINGS
@given(batch=batches())
def test_module_loss_finite(batch) -> None:
    x, y = batch
    labels = torch.tensor(np.unique(y, return_inverse=True)[1])
    loss_fn = OSMCAALoss(num_classes=int(labels.max()) + 1, embedding_dim=x.shape[1]).double()
    f = torch.tensor(x, requires_grad=True)
    loss = loss_fn(f, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(f.grad).all()


@SETTINGS
@given(batch=batches(min_n=3, max_n=40, min_d=2), scale=st.floats(0.01, 100.0))
def test_metrics_in_unit_interval_and_invariant(batch, scale: float) -> None:
    x, y = batch
    # No (near-)ties: float32 cosine order is undefined there; d >= 2 (1-D vectors normalise to +-1).
    x = x + np.random.default_rng(0).normal(scale=5e-2, size=x.shape)
    r = recall_at_k(x, y)
    m = map_at_r(x, y)
    assert all(0.0 <= v <= 1.0 for v in r.values()) and 0.0 <= m <= 1.0
    assert list(r.values()) == sorted(r.values())  # Recall@K never decreases with K
    perm = np.random.default_rng(1).permutation(len(y))
    assert recall_at_k(x[perm], y[perm]) == pytest.approx(r)
    assert map_at_r(x[perm], y[perm]) == pytest.approx(m)
    assert recall_at_k(x * scale, y) == pytest.approx(r)
    assert map_at_r(x * scale, y) == pytest.approx(m)
    assert 0.0 <= nmi(x, y) <= 1.0 + 1e-12
