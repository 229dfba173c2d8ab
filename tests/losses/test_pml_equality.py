"""Every loss softmine shares with pytorch-metric-learning (PML) equals PML's on random float64 inputs.

Parameters are mapped where the conventions differ (said at each case); class vectors are
copied across. Values agree to 1e-10 relative and the gradients (embeddings and class
vectors) to 1e-9. Where the definitions differ the test states the exact relation it checks.
PML version compared: the one installed (the dev extra pins >=2.9,<3; 2.9.0 when written).
"""

from __future__ import annotations

import math

import pytest
import torch

pml = pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import losses as pml_losses  # noqa: E402
from pytorch_metric_learning import miners as pml_miners  # noqa: E402
from pytorch_metric_learning import regularizers as pml_regularizers  # noqa: E402
from pytorch_metric_learning.distances import LpDistance  # noqa: E402
from pytorch_metric_learning.reducers import MeanReducer  # noqa: E402

from softmine.losses import (  # noqa: E402
    arcface_loss,
    circle_loss,
    contrastive_hard_loss,
    cosface_loss,
    lifted_structure_loss,
    multi_similarity_loss,
    normalized_softmax_loss,
    proxy_anchor_loss,
    softtriple_loss,
    triplet_batchhard_loss,
    triplet_semihard_loss,
    weighted_contrastive_loss,
)

F64 = torch.float64
LABELS = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 4, 4, 5])
NUM_CLASSES = 7  # classes 6 has no sample in the batch
DIM = 5
SEEDS = [0, 1, 2]


def _embeddings(seed: int, dim: int = DIM) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(LABELS), dim, generator=g, dtype=F64)


def _weights(rows: int, seed: int) -> torch.Tensor:
    """Class vectors drawn apart from the embeddings (a shared seed would make row 0 equal)."""
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(rows, DIM, generator=g, dtype=F64)


def _close(ours: torch.Tensor, theirs: torch.Tensor, *leaves: torch.Tensor) -> None:
    """Equal values, and equal gradients with respect to each pair of leaves (ours, theirs)."""
    assert float(ours) == pytest.approx(float(theirs), rel=1e-10, abs=1e-13)
    ga = torch.autograd.grad(ours, leaves[0::2], allow_unused=True)
    gb = torch.autograd.grad(theirs, leaves[1::2], allow_unused=True)
    for a, b in zip(ga, gb, strict=True):
        b = torch.zeros_like(a) if b is None else b
        a = torch.zeros_like(b) if a is None else a
        if a.shape != b.shape:  # PML keeps some class matrices as (dim, classes)
            b = b.T
        assert float((a - b).norm()) <= 1e-9 * max(float(b.norm()), 1e-6)


def _leaves(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return f.clone().requires_grad_(), f.clone().requires_grad_()


# --- the classifier / proxy losses: copy the class vectors across ---------------------------


def _with_weights(loss: torch.nn.Module, name: str, ours_rows: torch.Tensor) -> torch.Tensor:
    """Set PML's class matrix ``name`` from our (rows, dim) vectors; return it (a leaf)."""
    param = getattr(loss, name)
    with torch.no_grad():
        param.data = (ours_rows.T if param.shape != ours_rows.shape else ours_rows).clone()
    return param


@pytest.mark.parametrize("seed", SEEDS)
def test_arcface(seed: int) -> None:
    f1, f2 = _leaves(_embeddings(seed))
    theirs = pml_losses.ArcFaceLoss(NUM_CLASSES, DIM, margin=math.degrees(0.5), scale=64)
    w = _weights(NUM_CLASSES, seed)
    w1 = w.clone().requires_grad_()
    w2 = _with_weights(theirs, "W", w)
    # PML's margin is in degrees, ours in radians (the paper's m = 0.5); both scale 64
    _close(arcface_loss(f1, LABELS, w1, scale=64.0, margin=0.5), theirs(f2, LABELS), f1, f2, w1, w2)


@pytest.mark.parametrize("seed", SEEDS)
def test_arcface_fallback_branch(seed: int) -> None:
    # m = 2.5 rad: most targets have theta + m > pi, where both use cos(theta) - m sin(m)
    f1, f2 = _leaves(_embeddings(seed))
    theirs = pml_losses.ArcFaceLoss(NUM_CLASSES, DIM, margin=math.degrees(2.5), scale=4)
    w = _weights(NUM_CLASSES, seed)
    w1, w2 = w.clone().requires_grad_(), _with_weights(theirs, "W", w)
    _close(arcface_loss(f1, LABELS, w1, scale=4.0, margin=2.5), theirs(f2, LABELS), f1, f2, w1, w2)


@pytest.mark.parametrize("seed", SEEDS)
def test_subcenter_arcface(seed: int) -> None:
    f1, f2 = _leaves(_embeddings(seed))
    theirs = pml_losses.SubCenterArcFaceLoss(
        num_classes=NUM_CLASSES, embedding_size=DIM, margin=math.degrees(0.5), scale=64,
        sub_centers=3,
    )  # fmt: skip
    w = _weights(NUM_CLASSES * 3, seed)
    # same layout: class c's sub-centers are PML's columns (ours rows) c*3 ... c*3 + 2
    w1, w2 = w.clone().requires_grad_(), _with_weights(theirs, "W", w)
    ours = arcface_loss(f1, LABELS, w1, scale=64.0, margin=0.5, sub_centers=3)
    _close(ours, theirs(f2, LABELS), f1, f2, w1, w2)


@pytest.mark.parametrize("seed", SEEDS)
def test_cosface(seed: int) -> None:
    f1, f2 = _leaves(_embeddings(seed))
    theirs = pml_losses.CosFaceLoss(NUM_CLASSES, DIM, margin=0.35, scale=64)
    w = _weights(NUM_CLASSES, seed)
    w1, w2 = w.clone().requires_grad_(), _with_weights(theirs, "W", w)
    ours = cosface_loss(f1, LABELS, w1, scale=64.0, margin=0.35)
    _close(ours, theirs(f2, LABELS), f1, f2, w1, w2)


@pytest.mark.parametrize("seed", SEEDS)
def test_softtriple_without_regulariser(seed: int) -> None:
    # PML's SoftTripleLoss has no center regulariser (tau = 0 here); gamma is the temperature
    # in both (PML stores its inverse)
    f1, f2 = _leaves(_embeddings(seed))
    theirs = pml_losses.SoftTripleLoss(
        NUM_CLASSES, DIM, centers_per_class=4, la=20, gamma=0.1, margin=0.01
    )
    w = _weights(NUM_CLASSES * 4, seed)
    w1, w2 = w.clone().requires_grad_(), _with_weights(theirs, "fc", w)
    ours = softtriple_loss(
        f1, LABELS, w1, centers_per_class=4, la=20.0, gamma=0.1, tau=0.0, margin=0.01
    )
    _close(ours, theirs(f2, LABELS), f1, f2, w1, w2)


@pytest.mark.parametrize("seed", SEEDS)
def test_softtriple_with_regulariser(seed: int) -> None:
    # the regulariser is PML's SparseCentersRegularizer weighted by tau; PML adds the smallest
    # normal float under its square root where the authors' code (our default) adds 1e-5,
    # so reg_eps is set to PML's here
    f1, f2 = _leaves(_embeddings(seed))
    reg = pml_regularizers.SparseCentersRegularizer(NUM_CLASSES, 4)
    theirs = pml_losses.SoftTripleLoss(
        NUM_CLASSES, DIM, centers_per_class=4, la=20, gamma=0.1, margin=0.01,
        weight_regularizer=reg, weight_reg_weight=0.2,
    )  # fmt: skip
    w = _weights(NUM_CLASSES * 4, seed)
    w1, w2 = w.clone().requires_grad_(), _with_weights(theirs, "fc", w)
    ours = softtriple_loss(
        f1, LABELS, w1, centers_per_class=4, la=20.0, gamma=0.1, tau=0.2, margin=0.01,
        reg_eps=torch.finfo(F64).tiny,
    )  # fmt: skip
    _close(ours, theirs(f2, LABELS), f1, f2, w1, w2)


@pytest.mark.parametrize("seed", SEEDS)
def test_normalized_softmax(seed: int) -> None:
    # PML's default distance normalises the embeddings as well as its W: the same logits
    f1, f2 = _leaves(_embeddings(seed))
    theirs = pml_losses.NormalizedSoftmaxLoss(NUM_CLASSES, DIM, temperature=0.05)
    w = _weights(NUM_CLASSES, seed)
    w1, w2 = w.clone().requires_grad_(), _with_weights(theirs, "W", w)
    ours = normalized_softmax_loss(f1, LABELS, w1, temperature=0.05)
    _close(ours, theirs(f2, LABELS), f1, f2, w1, w2)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("alpha", "delta"), [(32.0, 0.1), (4.0, 0.3)])
def test_proxy_anchor(seed: int, alpha: float, delta: float) -> None:
    # PML's margin is delta; its divisors are ours (proxies with samples, all proxies)
    f1, f2 = _leaves(_embeddings(seed))
    theirs = pml_losses.ProxyAnchorLoss(NUM_CLASSES, DIM, margin=delta, alpha=alpha)
    w = _weights(NUM_CLASSES, seed)
    w1, w2 = w.clone().requires_grad_(), _with_weights(theirs, "proxies", w)
    ours = proxy_anchor_loss(f1, LABELS, w1, alpha=alpha, delta=delta)
    _close(ours, theirs(f2, LABELS), f1, f2, w1, w2)


# --- the pair losses: the same pairs, mined by PML's miners where their rule is ours ----------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("m", "gamma"), [(0.4, 80.0), (0.25, 256.0), (0.25, 4.0)])
def test_circle(seed: int, m: float, gamma: float) -> None:
    f1, f2 = _leaves(_embeddings(seed, dim=3))
    theirs = pml_losses.CircleLoss(m=m, gamma=gamma)
    _close(circle_loss(f1, LABELS, m=m, gamma=gamma), theirs(f2, LABELS), f1, f2)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    ("alpha", "beta", "base", "epsilon"), [(2.0, 50.0, 0.5, 0.1), (2.0, 10.0, 0.5, 0.3)]
)
def test_multi_similarity_with_its_miner(
    seed: int, alpha: float, beta: float, base: float, epsilon: float
) -> None:
    f1, f2 = _leaves(_embeddings(seed, dim=3))
    pairs = pml_miners.MultiSimilarityMiner(epsilon=epsilon)(f2, LABELS)
    theirs = pml_losses.MultiSimilarityLoss(alpha=alpha, beta=beta, base=base)(f2, LABELS, pairs)
    ours = multi_similarity_loss(f1, LABELS, alpha=alpha, beta=beta, base=base, epsilon=epsilon)
    _close(ours, theirs, f1, f2)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("margin", [1.0, 0.5])
def test_lifted_structure(seed: int, margin: float) -> None:
    # PML's LiftedStructureLoss (Oh Song et al.), not GeneralizedLiftedStructureLoss (Hermans
    # et al.'s per-anchor form); neg_margin is our margin, on unit-sphere distances
    f1, f2 = _leaves(_embeddings(seed, dim=3))
    theirs = pml_losses.LiftedStructureLoss(neg_margin=margin, pos_margin=0)(f2, LABELS)
    _close(lifted_structure_loss(f1, LABELS, margin=margin), theirs, f1, f2)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("soft", [False, True])
def test_triplet_batchhard_with_its_miner(seed: int, soft: bool) -> None:
    # PML averages only the non-zero triplet losses by default; ours averages over every
    # anchor that has a positive and a negative, so PML's MeanReducer is the match.
    # The soft margin is PML's smooth_loss with margin 0: softplus(d_ap - d_an).
    f1, f2 = _leaves(_embeddings(seed, dim=3))
    triplets = pml_miners.BatchHardMiner()(f2, LABELS)
    margin = 0.0 if soft else 0.2
    loss = pml_losses.TripletMarginLoss(margin=margin, smooth_loss=soft, reducer=MeanReducer())
    ours = triplet_batchhard_loss(f1, LABELS, margin=0.2, soft=soft)
    _close(ours, loss(f2, LABELS, triplets), f1, f2)


def _semihard_triplets(f: torch.Tensor, labels: torch.Tensor, squared: bool):
    """FaceNet / TensorFlow's semi-hard rule, by loops: per (a, p), the closest negative farther
    than p, else the farthest negative. PML's TripletMarginMiner("semihard") keeps every
    semi-hard triplet instead, a different set, so the triplets are built here."""
    x = torch.nn.functional.normalize(f.detach(), dim=1)
    d = torch.cdist(x, x) ** (2 if squared else 1)
    a_idx, p_idx, n_idx = [], [], []
    y = labels.tolist()
    for a in range(len(y)):
        negs = [k for k in range(len(y)) if y[k] != y[a]]
        for p in range(len(y)):
            if p == a or y[p] != y[a] or not negs:
                continue
            farther = [k for k in negs if d[a, k] > d[a, p]]
            pick = (
                min(farther, key=lambda k: d[a, k]) if farther else max(negs, key=lambda k: d[a, k])
            )
            a_idx.append(a), p_idx.append(p), n_idx.append(pick)
    return tuple(torch.tensor(v) for v in (a_idx, p_idx, n_idx))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("squared", [True, False])
def test_triplet_semihard_on_the_same_triplets(seed: int, squared: bool) -> None:
    # FaceNet's squared distance is PML's LpDistance(power=2); every (a, p) pair counts in the
    # mean, zero or not (MeanReducer)
    f1, f2 = _leaves(_embeddings(seed, dim=3))
    triplets = _semihard_triplets(f2, LABELS, squared)
    loss = pml_losses.TripletMarginLoss(
        margin=0.2, distance=LpDistance(power=2 if squared else 1), reducer=MeanReducer()
    )
    ours = triplet_semihard_loss(f1, LABELS, margin=0.2, squared=squared)
    _close(ours, loss(f2, LABELS, triplets), f1, f2)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("hard", [False, True])
def test_contrastive_positive_term(seed: int, hard: bool) -> None:
    """Our contrastive losses are Hadsell et al.'s squared form, 1/2 d^2 and 1/2 (m - d)^2;
    PML's ContrastiveLoss is the unsquared hinge relu(d - pos_margin) + relu(neg_margin - d).
    With PML's squared distance (LpDistance(power=2)) its positive term is d^2, so with the
    negative term off (lam = 0) ours is exactly half of PML's on the same positive pairs:
    every positive pair (contrastive) or those farther than their anchor's closest negative
    (contrastive_hard), which is PML's MultiSimilarityMiner with epsilon 0 on distances.
    The negative terms differ by definition: (m - d)^2 / 2 here, relu(m - d) in PML."""
    f1, f2 = _leaves(_embeddings(seed, dim=3))
    if hard:
        miner = pml_miners.MultiSimilarityMiner(epsilon=0.0, distance=LpDistance())
        a1, p, _, _ = miner(f2, LABELS)
        ours = contrastive_hard_loss(f1, LABELS, margin=1.2, lam=0.0)
    else:
        same = LABELS[:, None] == LABELS[None, :]
        a1, p = torch.where(same & ~torch.eye(len(LABELS), dtype=torch.bool))
        ours = weighted_contrastive_loss(f1, LABELS, margin=1.2, lam=0.0, osm=False)
    assert len(a1) > 0
    empty = torch.tensor([], dtype=torch.long)
    loss = pml_losses.ContrastiveLoss(
        pos_margin=0, neg_margin=1.2, distance=LpDistance(power=2), reducer=MeanReducer()
    )
    _close(ours, 0.5 * loss(f2, LABELS, (a1, p, empty, empty)), f1, f2)


def test_version_compared() -> None:
    major, minor = (int(v) for v in pml.__version__.split(".")[:2])
    assert (major, minor) >= (2, 9) and major < 3
