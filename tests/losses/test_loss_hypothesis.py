"""Hypothesis over every loss config: random batch sizes, label patterns and dimensions."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.losses.test_loss_properties import NAMES, _build

SETTINGS = settings(max_examples=15, deadline=None, derandomize=True)


# The authors' form's classifier reads the raw feature (a linear layer with bias), so its
# attention and cross-entropy change with the feature's scale, as in the authors' code
# (osm_caa_official is its old name: the same config).
NOT_SCALE_INVARIANT = {"osm_caa_authors", "osm_caa_official"}


@st.composite
def batches(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(tie-free embeddings, the same with duplicated rows, labels, number of classes)."""
    n = draw(st.integers(2, 20))
    d = draw(st.integers(2, 16))
    k = draw(st.integers(1, max(1, n // 2)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    dup = x.clone()
    dup[: max(2, n // 2)] = x[0]  # identical embeddings
    y = torch.randint(0, k, (n,), generator=g)
    return x, dup, y, k


@pytest.mark.parametrize("name", NAMES)
@SETTINGS
@given(batch=batches(), scale=st.floats(0.05, 20.0))
@pytest.mark.slow
def test_finite_and_invariant_to_order_and_scale(name: str, batch, scale: float) -> None:
    x, dup, y, k = batch
    torch.manual_seed(0)
    loss_fn = _build(name, num_classes=k, dim=x.shape[1]).double()
    for data in (x, dup):  # finite values and gradients, duplicates included
        f = data.clone().requires_grad_(True)
        value = loss_fn(f, y)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(f.grad).all()
    # Invariances on tie-free data (hard mining flips on exact distance ties by rounding).
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        loss = loss_fn(x, y).item()
        assert loss_fn(x[perm], y[perm]).item() == pytest.approx(loss, rel=1e-6, abs=1e-9)
        if name not in NOT_SCALE_INVARIANT:
            assert loss_fn(x * scale, y).item() == pytest.approx(loss, rel=1e-6, abs=1e-9)
