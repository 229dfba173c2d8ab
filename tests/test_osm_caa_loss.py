"""The paper-form OSM+CAA loss against a float64 double loop over pairs."""

from __future__ import annotations

import math

import pytest
import torch

from softmine.losses import OSMCAALoss, caa_attention, weighted_contrastive_loss


def _loop_loss(f, y, a, margin, sigma, lam, osm):
    x = [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in f.tolist()]
    y = y.tolist()
    n = len(y)
    pn = pd = nn_ = nd = 0.0
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            d = math.sqrt(sum((u - v) ** 2 for u, v in zip(x[i], x[j], strict=True)))
            att = 1.0 if a is None else min(a[i], a[j])
            if y[i] == y[j]:
                s = math.exp(-d * d / sigma**2) if osm else 1.0
                pn += s * att * d * d
                pd += s * att
            else:
                s = max(0.0, margin - d) if osm else 1.0
                nn_ += s * att * max(0.0, margin - d) ** 2
                nd += s * att
    lp = 0.5 * pn / pd if pd > 0 else 0.0
    ln = 0.5 * nn_ / nd if nd > 0 else 0.0
    return (1 - lam) * lp + lam * ln


@pytest.mark.parametrize("osm", [True, False])
@pytest.mark.parametrize("use_attention", [True, False])
def test_matches_float64_loop(osm: bool, use_attention: bool) -> None:
    g = torch.Generator().manual_seed(0)
    f = torch.randn(12, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    a = torch.rand(12, generator=g, dtype=torch.float64) if use_attention else None
    got = weighted_contrastive_loss(f, y, a, margin=1.2, sigma=0.8, lam=0.3, osm=osm)
    ref = _loop_loss(f, y, None if a is None else a.tolist(), 1.2, 0.8, 0.3, osm)
    assert float(got) == pytest.approx(ref, rel=1e-9)


def test_softmax_cosine_attention_hand_example() -> None:
    emb = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    vecs = torch.tensor([[2.0, 0.0], [0.0, 3.0]], dtype=torch.float64)  # normalised to e1, e2
    a = caa_attention(emb, torch.tensor([0]), vecs)
    assert float(a) == pytest.approx(math.e / (math.e + 1.0))


def test_module_trains_class_vectors_and_reports_pieces() -> None:
    torch.manual_seed(0)
    loss_fn = OSMCAALoss(num_classes=3, embedding_dim=4)
    emb = torch.randn(9, 4, requires_grad=True)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    loss, details = loss_fn(emb, y, return_details=True)
    loss.backward()
    assert loss_fn.class_vectors.grad is not None and loss_fn.class_vectors.grad.abs().sum() > 0
    assert {"l_pos", "l_neg", "ce", "attention", "weights"} <= set(details)
    assert torch.isfinite(emb.grad).all()
