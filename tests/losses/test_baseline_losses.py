"""Baseline losses against float64 loops written here (values and gradients) and hand examples."""

from __future__ import annotations

import math

import pytest
import torch

from softmine.errors import ConfigError
from softmine.losses import (
    ContrastiveHardLoss,
    LiftedStructureLoss,
    MultiSimilarityLoss,
    NormSoftmaxLoss,
    ProxyAnchorLoss,
    TripletBatchHardLoss,
    TripletSemiHardLoss,
    contrastive_hard_loss,
    lifted_structure_loss,
    multi_similarity_loss,
    normalized_softmax_loss,
    proxy_anchor_loss,
    triplet_batchhard_loss,
    triplet_semihard_loss,
)

F64 = torch.float64
LABELS = [0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 4]


def _unit(f: torch.Tensor) -> list[torch.Tensor]:
    return [row / row.square().sum().sqrt() for row in f]


def _sq(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (u - v).square().sum()


def _dist(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _sq(u, v).sqrt()


def _pick(values: list[torch.Tensor], largest: bool) -> torch.Tensor:
    key = [float(v.detach()) for v in values]
    return values[key.index(max(key) if largest else min(key))]


def loop_contrastive_hard(f, y, margin, lam):
    x, zero = _unit(f), f.sum() * 0
    pos, neg, n_pos, n_neg = zero, zero, 0, 0
    for i in range(len(y)):
        negs = [float(_dist(x[i], x[k]).detach()) for k in range(len(y)) if y[k] != y[i]]
        closest = min(negs) if negs else math.inf
        for j in range(len(y)):
            if i == j:
                continue
            d = _dist(x[i], x[j])
            if y[i] == y[j] and float(d.detach()) > closest:
                pos, n_pos = pos + d**2, n_pos + 1
            elif y[i] != y[j] and float(d.detach()) < margin:
                neg, n_neg = neg + (margin - d) ** 2, n_neg + 1
    lp = 0.5 * pos / n_pos if n_pos else zero
    ln = 0.5 * neg / n_neg if n_neg else zero
    return (1 - lam) * lp + lam * ln


def loop_triplet_semihard(f, y, margin, squared):
    x, total, count = _unit(f), f.sum() * 0, 0
    dist = _sq if squared else _dist
    for a in range(len(y)):
        negs = [dist(x[a], x[k]) for k in range(len(y)) if y[k] != y[a]]
        if not negs:
            continue
        for p in range(len(y)):
            if p == a or y[p] != y[a]:
                continue
            d_ap = dist(x[a], x[p])
            farther = [v for v in negs if float(v.detach()) > float(d_ap.detach())]
            d_an = _pick(farther, largest=False) if farther else _pick(negs, largest=True)
            total, count = total + torch.clamp(d_ap - d_an + margin, min=0), count + 1
    return total / count if count else total


def loop_triplet_batchhard(f, y, margin, soft):
    x, total, count = _unit(f), f.sum() * 0, 0
    for a in range(len(y)):
        pos = [_dist(x[a], x[p]) for p in range(len(y)) if p != a and y[p] == y[a]]
        neg = [_dist(x[a], x[k]) for k in range(len(y)) if y[k] != y[a]]
        if not pos or not neg:
            continue
        gap = _pick(pos, largest=True) - _pick(neg, largest=False)
        term = torch.log1p(torch.exp(gap)) if soft else torch.clamp(gap + margin, min=0)
        total, count = total + term, count + 1
    return total / count if count else total


def loop_lifted(f, y, margin):
    x, total, pairs = _unit(f), f.sum() * 0, 0
    n = len(y)
    for i in range(n):
        for j in range(i + 1, n):
            if y[i] != y[j]:
                continue
            pairs += 1
            terms = [torch.exp(margin - _dist(x[i], x[k])) for k in range(n) if y[k] != y[i]]
            terms += [torch.exp(margin - _dist(x[j], x[k])) for k in range(n) if y[k] != y[j]]
            if not terms:
                continue
            jij = torch.log(sum(terms)) + _dist(x[i], x[j])
            total = total + torch.clamp(jij, min=0) ** 2
    return total / (2 * pairs) if pairs else total


def loop_multi_similarity(f, y, alpha, beta, base, eps):
    x, total = _unit(f), f.sum() * 0
    n = len(y)
    for i in range(n):
        pos = [(x[i] * x[k]).sum() for k in range(n) if k != i and y[k] == y[i]]
        neg = [(x[i] * x[k]).sum() for k in range(n) if y[k] != y[i]]
        if not pos or not neg:
            continue
        min_pos = min(float(s.detach()) for s in pos)
        max_neg = max(float(s.detach()) for s in neg)
        kept_neg = [s for s in neg if float(s.detach()) + eps > min_pos]
        kept_pos = [s for s in pos if float(s.detach()) - eps < max_neg]
        if not kept_pos or not kept_neg:
            continue
        pos_term = torch.log(1 + sum(torch.exp(-alpha * (s - base)) for s in kept_pos)) / alpha
        neg_term = torch.log(1 + sum(torch.exp(beta * (s - base)) for s in kept_neg)) / beta
        total = total + pos_term + neg_term
    return total / n


def loop_normsoftmax(f, y, w, temperature):
    x, c, total = _unit(f), _unit(w), f.sum() * 0
    for i, yi in enumerate(y):
        logits = torch.stack([(x[i] * ck).sum() / temperature for ck in c])
        total = total - (logits[yi] - torch.logsumexp(logits, 0))
    return total / len(y)


CASES = {
    "contrastive_hard": (
        lambda f, y: contrastive_hard_loss(f, y, margin=1.2, lam=0.4),
        lambda f, y: loop_contrastive_hard(f, y.tolist(), 1.2, 0.4),
    ),
    "triplet_semihard": (
        lambda f, y: triplet_semihard_loss(f, y, margin=0.2),
        lambda f, y: loop_triplet_semihard(f, y.tolist(), 0.2, True),
    ),
    "triplet_semihard_unsquared": (
        lambda f, y: triplet_semihard_loss(f, y, margin=0.3, squared=False),
        lambda f, y: loop_triplet_semihard(f, y.tolist(), 0.3, False),
    ),
    "triplet_batchhard": (
        lambda f, y: triplet_batchhard_loss(f, y, margin=0.2),
        lambda f, y: loop_triplet_batchhard(f, y.tolist(), 0.2, False),
    ),
    "triplet_batchhard_soft": (
        lambda f, y: triplet_batchhard_loss(f, y, soft=True),
        lambda f, y: loop_triplet_batchhard(f, y.tolist(), 0.0, True),
    ),
    "lifted": (
        lambda f, y: lifted_structure_loss(f, y, margin=1.0),
        lambda f, y: loop_lifted(f, y.tolist(), 1.0),
    ),
    "multi_similarity": (
        lambda f, y: multi_similarity_loss(f, y, alpha=2.0, beta=10.0, base=0.5, epsilon=0.1),
        lambda f, y: loop_multi_similarity(f, y.tolist(), 2.0, 10.0, 0.5, 0.1),
    ),
}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64_loop(name: str, seed: int) -> None:
    vec, loop = CASES[name]
    g = torch.Generator().manual_seed(seed)
    # low dimension so that distances spread over [0, 2] and every mining branch is hit
    f = torch.randn(len(LABELS), 3, generator=g, dtype=F64)
    y = torch.tensor(LABELS)
    f1, f2 = f.clone().requires_grad_(), f.clone().requires_grad_()
    got, ref = vec(f1, y), loop(f2, y)
    assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-9, abs=1e-12)
    (g1,) = torch.autograd.grad(got, f1)
    if ref.requires_grad:
        (g2,) = torch.autograd.grad(ref, f2)
    else:
        g2 = torch.zeros_like(f2)
    assert float((g1 - g2).norm()) <= 1e-9 * max(float(g2.norm()), 1e-3)


def test_normsoftmax_matches_loop() -> None:
    g = torch.Generator().manual_seed(3)
    f = torch.randn(len(LABELS), 4, generator=g, dtype=F64)
    w = torch.randn(5, 4, generator=g, dtype=F64)
    y = torch.tensor(LABELS)
    f1, w1 = f.clone().requires_grad_(), w.clone().requires_grad_()
    f2, w2 = f.clone().requires_grad_(), w.clone().requires_grad_()
    got = normalized_softmax_loss(f1, y, w1, temperature=0.1)
    ref = loop_normsoftmax(f2, y.tolist(), w2, 0.1)
    got.backward()
    ref.backward()
    assert float(got) == pytest.approx(float(ref), rel=1e-12)
    assert torch.allclose(f1.grad, f2.grad, rtol=1e-9, atol=1e-12)
    assert torch.allclose(w1.grad, w2.grad, rtol=1e-9, atol=1e-12)


def loop_proxy_anchor(f, y, w, alpha, delta):
    x, c = _unit(f), _unit(w)
    pos, neg, present = f.sum() * 0, f.sum() * 0, 0
    for k, ck in enumerate(c):
        mine = [i for i, yi in enumerate(y) if yi == k]
        others = [i for i, yi in enumerate(y) if yi != k]
        if mine:
            present += 1
            pos = pos + torch.log(
                1 + sum(torch.exp(-alpha * ((x[i] * ck).sum() - delta)) for i in mine)
            )
        if others:
            neg = neg + torch.log(
                1 + sum(torch.exp(alpha * ((x[i] * ck).sum() + delta)) for i in others)
            )
    return pos / present + neg / len(c)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("alpha", [32.0, 4.0])
def test_proxy_anchor_matches_loop(seed: int, alpha: float) -> None:
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(len(LABELS), 4, generator=g, dtype=F64)
    w = torch.randn(7, 4, generator=g, dtype=F64)  # proxies 5 and 6 have no sample in the batch
    y = torch.tensor(LABELS)
    f1, w1 = f.clone().requires_grad_(), w.clone().requires_grad_()
    f2, w2 = f.clone().requires_grad_(), w.clone().requires_grad_()
    got = proxy_anchor_loss(f1, y, w1, alpha=alpha, delta=0.1)
    ref = loop_proxy_anchor(f2, y.tolist(), w2, alpha, 0.1)
    got.backward()
    ref.backward()
    assert float(got) == pytest.approx(float(ref), rel=1e-6)
    for a, b in ((f1.grad, f2.grad), (w1.grad, w2.grad)):
        assert float((a - b).norm()) <= 1e-6 * float(b.norm())


def test_proxy_anchor_hand_example() -> None:
    # two samples on the proxies of their classes, orthogonal to the other proxy
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64)
    w = torch.tensor([[2.0, 0.0], [0.0, 3.0]], dtype=F64)
    got = proxy_anchor_loss(f, torch.tensor([0, 1]), w, alpha=2.0, delta=0.5)
    # positives: s = 1 -> log(1 + e^{-2 * 0.5}); negatives: s = 0 -> log(1 + e^{2 * 0.5})
    want = math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(1.0))
    assert float(got) == pytest.approx(want, rel=1e-12)


def test_proxy_anchor_proxies_start_as_the_authors() -> None:
    torch.manual_seed(0)
    loss = ProxyAnchorLoss(num_classes=400, embedding_dim=512)
    assert loss.proxies.shape == (400, 512)
    assert float(loss.proxies.std()) == pytest.approx(math.sqrt(2 / 400), rel=0.01)


def test_batchhard_hand_example() -> None:
    # unit vectors at angles 0, 60 (class 0) and 90, 180 degrees (class 1)
    ang = torch.tensor([0.0, 60.0, 90.0, 180.0], dtype=F64) * math.pi / 180
    f = torch.stack([ang.cos(), ang.sin()], 1)
    y = torch.tensor([0, 0, 1, 1])
    chord = lambda deg: 2 * math.sin(math.radians(deg) / 2)  # noqa: E731
    # anchor 0: pos 60, closest neg 90; anchor 1: pos 60, neg 30; anchor 2: pos 90, neg 30;
    # anchor 3: pos 90, neg 120
    per = [
        chord(60) - chord(90),
        chord(60) - chord(30),
        chord(90) - chord(30),
        chord(90) - chord(120),
    ]
    want = sum(max(0.0, p + 0.2) for p in per) / 4
    assert float(triplet_batchhard_loss(f, y, margin=0.2)) == pytest.approx(want, rel=1e-12)


def test_contrastive_hard_hand_example() -> None:
    # 1-D on the circle: class 0 at 0 and 60 degrees, class 1 at 90 degrees
    ang = torch.tensor([0.0, 60.0, 90.0], dtype=F64) * math.pi / 180
    f = torch.stack([ang.cos(), ang.sin()], 1)
    y = torch.tensor([0, 0, 1])
    c30, c60, c90 = (2 * math.sin(math.radians(a) / 2) for a in (30, 60, 90))
    # anchor 0: pos 60 (1.0) > closest neg 90 (1.414)? no. anchor 1: pos 1.0 > neg 30 (0.518): kept
    # negatives inside 1.2: (0,2)? 1.414 no; (1,2) and (2,1): 0.518 yes
    l_pos = 0.5 * c60**2
    l_neg = 0.5 * (1.2 - c30) ** 2
    assert c90 > 1.2
    want = 0.5 * l_pos + 0.5 * l_neg
    assert float(contrastive_hard_loss(f, y, margin=1.2)) == pytest.approx(want, rel=1e-12)


DEGENERATE = {
    "no_positives": ([0, 1, 2, 3, 4], False),
    "single_class": ([2, 2, 2, 2], False),
    "identical": ([0, 0, 1, 1, 2, 2], True),
    "single_sample": ([3], False),
}

MODULES = {
    "contrastive_hard": lambda: ContrastiveHardLoss(),
    "triplet_semihard": lambda: TripletSemiHardLoss(),
    "triplet_batchhard": lambda: TripletBatchHardLoss(),
    "triplet_batchhard_soft": lambda: TripletBatchHardLoss(soft=True),
    "lifted": lambda: LiftedStructureLoss(),
    "multi_similarity": lambda: MultiSimilarityLoss(),
    "normsoftmax": lambda: NormSoftmaxLoss(num_classes=5, embedding_dim=4),
    "proxy_anchor": lambda: ProxyAnchorLoss(num_classes=5, embedding_dim=4),
}


@pytest.mark.parametrize("case", list(DEGENERATE))
@pytest.mark.parametrize("name", list(MODULES))
def test_finite_on_degenerate_batches(name: str, case: str) -> None:
    labels, identical = DEGENERATE[case]
    g = torch.Generator().manual_seed(4)
    f = torch.ones(len(labels), 4) if identical else torch.randn(len(labels), 4, generator=g)
    f.requires_grad_()
    loss = MODULES[name]()(f, torch.tensor(labels))
    loss.backward()
    assert loss.dtype == torch.float32 and math.isfinite(float(loss))
    assert torch.isfinite(f.grad).all()


@pytest.mark.parametrize(
    "make",
    [
        lambda: ContrastiveHardLoss(margin=0.0),
        lambda: ContrastiveHardLoss(lam=2.0),
        lambda: TripletSemiHardLoss(margin=-0.1),
        lambda: TripletBatchHardLoss(margin=0.0),
        lambda: LiftedStructureLoss(margin=0.0),
        lambda: MultiSimilarityLoss(beta=0.0),
        lambda: NormSoftmaxLoss(num_classes=None, embedding_dim=4),
        lambda: NormSoftmaxLoss(num_classes=3, embedding_dim=4, temperature=0.0),
        lambda: ProxyAnchorLoss(num_classes=3, embedding_dim=4, alpha=0.0),
        lambda: ProxyAnchorLoss(num_classes=3, embedding_dim=4, delta=-0.1),
        lambda: ProxyAnchorLoss(num_classes=0, embedding_dim=4),
    ],
)
def test_bad_hyperparameters_raise_config_error(make) -> None:
    with pytest.raises(ConfigError):
        make()
