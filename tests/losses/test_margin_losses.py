"""ArcFace, CosFace, Sub-center ArcFace, Circle and SoftTriple against float64 loops written here
from the papers' formulas (values and gradients), hand examples, and loss=<name> training steps."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from softmine.engine import Trainer
from softmine.errors import ConfigError
from softmine.losses import (
    ArcFaceLoss,
    CircleLoss,
    CosFaceLoss,
    LossNeeds,
    SoftTripleLoss,
    SubCenterArcFaceLoss,
    arcface_loss,
    circle_loss,
    cosface_loss,
    needs_of,
    softtriple_loss,
)
from tests.conftest import FAST_DIGITS, compose

F64 = torch.float64
LABELS = [0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 4]
NEW = {
    "arcface": "softmine.losses.ArcFaceLoss",
    "cosface": "softmine.losses.CosFaceLoss",
    "circle": "softmine.losses.CircleLoss",
    "softtriple": "softmine.losses.SoftTripleLoss",
    "subcenter_arcface": "softmine.losses.SubCenterArcFaceLoss",
}


def _unit(f: torch.Tensor) -> list[torch.Tensor]:
    return [row / row.square().sum().sqrt() for row in f]


def _dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (u * v).sum()


def _ce(logits: list[torch.Tensor], target: int) -> torch.Tensor:
    """-log softmax(logits)[target], summed by hand."""
    return -(logits[target] - torch.log(sum(torch.exp(z) for z in logits)))


def loop_margin_softmax(f, y, w, scale, margin, kind, sub_centers=1):
    """CosFace (Wang et al. Eq. 4) or ArcFace (Deng et al. Eq. 3, with the authors' fallback
    cos(theta) - m sin(m) past theta + m > pi); sub-centers: the class's best cosine."""
    x, c = _unit(f), _unit(w)
    total = f.sum() * 0
    for i, yi in enumerate(y):
        cos = []
        for k in range(len(c) // sub_centers):
            sims = [_dot(x[i], c[k * sub_centers + j]) for j in range(sub_centers)]
            best = max(range(sub_centers), key=lambda j: float(sims[j].detach()))
            cos.append(sims[best])
        logits = []
        for k, ck in enumerate(cos):
            if k != yi:
                logits.append(scale * ck)
            elif kind == "cosface":
                logits.append(scale * (ck - margin))
            else:
                theta = torch.acos(ck)
                if float(theta) + margin <= math.pi:
                    logits.append(scale * torch.cos(theta + margin))
                else:
                    logits.append(scale * (ck - margin * math.sin(margin)))
        total = total + _ce(logits, yi)
    return total / len(y)


def loop_circle(f, y, m, gamma):
    """Circle loss, Eq. 6 with Eq. 8's margins, each sample an anchor (weights not differentiated)."""
    x, total, anchors = _unit(f), f.sum() * 0, 0
    for i in range(len(y)):
        pos = [_dot(x[i], x[j]) for j in range(len(y)) if j != i and y[j] == y[i]]
        neg = [_dot(x[i], x[j]) for j in range(len(y)) if y[j] != y[i]]
        if not pos or not neg:
            continue
        sum_n = sum(torch.exp(gamma * max(0.0, float(s) + m) * (s - m)) for s in neg)
        sum_p = sum(torch.exp(-gamma * max(0.0, 1 + m - float(s)) * (s - (1 - m))) for s in pos)
        total, anchors = total + torch.log(1 + sum_n * sum_p), anchors + 1
    return total / anchors if anchors else total


def loop_softtriple(f, y, w, k, la, gamma, tau, margin, eps=1e-5):
    """SoftTriple, Eq. 10 of Qian et al. plus tau times the regulariser of Eq. 12."""
    x, c = _unit(f), _unit(w)
    classes = len(c) // k
    total = f.sum() * 0
    for i, yi in enumerate(y):
        logits = []
        for cl in range(classes):
            sims = [_dot(x[i], c[cl * k + j]) for j in range(k)]
            norm = sum(torch.exp(s / gamma) for s in sims)
            s_ic = sum(torch.exp(s / gamma) / norm * s for s in sims)
            logits.append(la * (s_ic - (margin if cl == yi else 0.0)))
        total = total + _ce(logits, yi)
    loss = total / len(y)
    if tau > 0 and k > 1:
        reg = f.sum() * 0
        for cl in range(classes):
            for a in range(k):
                for b in range(a + 1, k):
                    reg = reg + torch.sqrt(2 + eps - 2 * _dot(c[cl * k + a], c[cl * k + b]))
        loss = loss + tau * reg / (classes * k * (k - 1))
    return loss


def _inputs(seed: int, rows: int, dim: int = 4):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(len(LABELS), dim, generator=g, dtype=F64)
    w = torch.randn(rows, dim, generator=g, dtype=F64)
    return f, w, torch.tensor(LABELS)


PROXY_CASES = {
    "cosface": (
        5,
        lambda f, y, w: cosface_loss(f, y, w, scale=8.0, margin=0.35),
        lambda f, y, w: loop_margin_softmax(f, y, w, 8.0, 0.35, "cosface"),
    ),
    "arcface": (
        5,
        lambda f, y, w: arcface_loss(f, y, w, scale=8.0, margin=0.5),
        lambda f, y, w: loop_margin_softmax(f, y, w, 8.0, 0.5, "arcface"),
    ),
    "arcface_wide_margin": (  # m = 2.5: most targets take the fallback branch
        5,
        lambda f, y, w: arcface_loss(f, y, w, scale=4.0, margin=2.5),
        lambda f, y, w: loop_margin_softmax(f, y, w, 4.0, 2.5, "arcface"),
    ),
    "subcenter_arcface": (
        15,
        lambda f, y, w: arcface_loss(f, y, w, scale=8.0, margin=0.5, sub_centers=3),
        lambda f, y, w: loop_margin_softmax(f, y, w, 8.0, 0.5, "arcface", 3),
    ),
    "softtriple": (
        20,
        lambda f, y, w: softtriple_loss(
            f, y, w, centers_per_class=4, la=20.0, gamma=0.1, tau=0.2, margin=0.01
        ),
        lambda f, y, w: loop_softtriple(f, y, w, 4, 20.0, 0.1, 0.2, 0.01),
    ),
    "softtriple_one_center": (
        5,
        lambda f, y, w: softtriple_loss(f, y, w, centers_per_class=1, la=5.0, margin=0.1),
        lambda f, y, w: loop_softtriple(f, y, w, 1, 5.0, 0.1, 0.2, 0.1),
    ),
}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", list(PROXY_CASES))
def test_class_vector_losses_match_float64_loop(name: str, seed: int) -> None:
    rows, vec, loop = PROXY_CASES[name]
    f, w, y = _inputs(seed, rows)
    f1, w1 = f.clone().requires_grad_(), w.clone().requires_grad_()
    f2, w2 = f.clone().requires_grad_(), w.clone().requires_grad_()
    got, ref = vec(f1, y, w1), loop(f2, y.tolist(), w2)
    got.backward()
    ref.backward()
    assert got.dtype == F64
    assert float(got) == pytest.approx(float(ref), rel=1e-10)
    for a, b in ((f1.grad, f2.grad), (w1.grad, w2.grad)):
        assert float((a - b).norm()) <= 1e-9 * float(b.norm())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("m", "gamma"), [(0.4, 80.0), (0.25, 4.0)])
def test_circle_matches_float64_loop(seed: int, m: float, gamma: float) -> None:
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(len(LABELS), 3, generator=g, dtype=F64)
    y = torch.tensor(LABELS)
    f1, f2 = f.clone().requires_grad_(), f.clone().requires_grad_()
    got, ref = circle_loss(f1, y, m=m, gamma=gamma), loop_circle(f2, y.tolist(), m, gamma)
    got.backward()
    ref.backward()
    assert float(got) == pytest.approx(float(ref), rel=1e-10)
    assert float((f1.grad - f2.grad).norm()) <= 1e-9 * float(f2.grad.norm())


def test_arcface_hand_example() -> None:
    # the sample at 30 degrees from its class vector, at 90 degrees from the other
    ang = math.radians(30)
    f = torch.tensor([[math.cos(ang), math.sin(ang)]], dtype=F64)
    w = torch.tensor([[1.0, 0.0], [-math.sin(ang), math.cos(ang)]], dtype=F64)
    got = arcface_loss(f, torch.tensor([0]), w, scale=2.0, margin=0.5)
    want = math.log(1 + math.exp(-2.0 * math.cos(ang + 0.5)))  # the other logit is 2 cos 90 = 0
    assert float(got) == pytest.approx(want, rel=1e-12)
    got = cosface_loss(f, torch.tensor([0]), w, scale=2.0, margin=0.35)
    assert float(got) == pytest.approx(math.log(1 + math.exp(-2.0 * (math.cos(ang) - 0.35))))


def test_circle_hand_example() -> None:
    # anchor 0 with one positive at cos 0.5 and one negative at cos 0 (and the reverse anchors)
    f = torch.tensor([[1.0, 0.0, 0.0], [0.5, math.sqrt(0.75), 0.0], [0.0, 0.0, 1.0]], dtype=F64)
    y = torch.tensor([0, 0, 1])
    m, gamma = 0.25, 2.0
    s_p, s_n = 0.5, 0.0
    term = gamma * (1 + m - s_p) * (s_p - 1 + m) - gamma * (s_n + m) * (s_n - m)
    # anchors 0 and 1: positive at 0.5, negative at 0; anchor 2 has no positive
    assert float(circle_loss(f, y, m=m, gamma=gamma)) == pytest.approx(
        math.log1p(math.exp(-term)), rel=1e-12
    )


def test_subcenter_arcface_with_equal_sub_centers_is_arcface() -> None:
    f, w, y = _inputs(5, 5)
    one = arcface_loss(f, y, w)
    w3 = torch.stack([w, 2 * w, 3 * w], 1).reshape(15, -1)  # each class's 3 sub-centers agree
    assert float(arcface_loss(f, y, w3, sub_centers=3)) == pytest.approx(float(one), rel=1e-12)


def test_softtriple_with_one_center_is_normalised_softmax_with_margin() -> None:
    f, w, y = _inputs(6, 5)
    got = softtriple_loss(f, y, w, centers_per_class=1, la=7.0, margin=0.0)
    x = torch.nn.functional.normalize(f, dim=1)
    c = torch.nn.functional.normalize(w, dim=1)
    want = torch.nn.functional.cross_entropy(7.0 * x @ c.T, y)
    assert float(got) == pytest.approx(float(want), rel=1e-12)


MODULES = {
    "arcface": lambda: ArcFaceLoss(5, 4),
    "cosface": lambda: CosFaceLoss(5, 4),
    "subcenter_arcface": lambda: SubCenterArcFaceLoss(5, 4),
    "softtriple": lambda: SoftTripleLoss(5, 4),
    "circle": lambda: CircleLoss(),
}


@pytest.mark.parametrize("labels", [[0, 1, 2, 3, 4], [2, 2, 2, 2], [3]])
@pytest.mark.parametrize("identical", [False, True])
@pytest.mark.parametrize("name", list(MODULES))
def test_finite_on_degenerate_batches(name: str, labels: list[int], identical: bool) -> None:
    g = torch.Generator().manual_seed(4)
    f = torch.ones(len(labels), 4) if identical else torch.randn(len(labels), 4, generator=g)
    f.requires_grad_()
    loss_fn = MODULES[name]()
    loss = loss_fn(f, torch.tensor(labels))
    loss.backward()
    assert loss.dtype == torch.float32 and math.isfinite(float(loss))
    assert torch.isfinite(f.grad).all()
    for p in loss_fn.parameters():
        assert torch.isfinite(p.grad).all()


def test_arcface_is_finite_at_zero_angle() -> None:
    # an embedding exactly on its class vector: theta = 0, where d acos / d cos is infinite
    w = torch.eye(3, dtype=F64, requires_grad=True)
    f = torch.eye(3, dtype=F64, requires_grad=True)
    loss = arcface_loss(f, torch.arange(3), w)
    loss.backward()
    assert torch.isfinite(f.grad).all() and torch.isfinite(w.grad).all()


def test_parameters_start_as_documented() -> None:
    torch.manual_seed(0)
    st = SoftTripleLoss(num_classes=40, embedding_dim=64, centers_per_class=10)
    assert st.centers.shape == (400, 64)
    assert float(st.centers.abs().max()) <= 1 / math.sqrt(400)
    arc = SubCenterArcFaceLoss(num_classes=100, embedding_dim=64)
    assert arc.class_weights.shape == (300, 64) and arc.sub_centers == 3
    assert float(arc.class_weights.std()) == pytest.approx(0.01, rel=0.05)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ArcFaceLoss(num_classes=None, embedding_dim=4),
        lambda: ArcFaceLoss(3, 4, scale=0.0),
        lambda: ArcFaceLoss(3, 4, margin=-0.1),
        lambda: ArcFaceLoss(3, 4, margin=3.2),
        lambda: ArcFaceLoss(3, 4, sub_centers=0),
        lambda: SubCenterArcFaceLoss(3, 4, sub_centers=1.5),
        lambda: CosFaceLoss(3, 0),
        lambda: CosFaceLoss(3, 4, margin=-0.35),
        lambda: CircleLoss(m=1.0),
        lambda: CircleLoss(gamma=0.0),
        lambda: SoftTripleLoss(3, 4, centers_per_class=0),
        lambda: SoftTripleLoss(3, 4, gamma=0.0),
        lambda: SoftTripleLoss(3, 4, tau=-1.0),
    ],
)
def test_bad_hyperparameters_raise_config_error(make) -> None:
    with pytest.raises(ConfigError):
        make()


def test_labels_out_of_range_are_an_error() -> None:
    f, w, _ = _inputs(0, 5)
    for loss in (cosface_loss, arcface_loss):
        with pytest.raises((IndexError, RuntimeError)):  # torch's own check (on the CPU)
            loss(f[:2], torch.tensor([0, 5]), w)
    with pytest.raises(ValueError, match="class_weights must be"):
        arcface_loss(f, torch.tensor(LABELS), w, sub_centers=3)


@pytest.mark.parametrize("name", list(NEW))
def test_loss_config_composes_and_trains_two_digits_steps(name: str, tmp_path: Path) -> None:
    cfg = compose([f"loss={name}", "trainer.device=cpu", "trainer.max_iters=2", *FAST_DIGITS])
    assert cfg.loss._target_ == NEW[name]
    t = Trainer(cfg, tmp_path)  # builds the run: the loss/model contract is checked here
    assert needs_of(t.parts.loss_fn) == LossNeeds()  # the embeddings and labels only
    loss_params = {id(p) for p in t.parts.loss_fn.parameters()}
    in_optimizer = {id(p) for g in t.parts.optimizer.param_groups for p in g["params"]}
    assert loss_params <= in_optimizer  # the class vectors / centers are trained
    before = [p.detach().clone() for p in t.parts.loss_fn.parameters()]
    metrics = t.fit()
    assert t.state.step == 2
    assert all(math.isfinite(v) for v in metrics.values())
    for old, new in zip(before, t.parts.loss_fn.parameters(), strict=True):
        assert not torch.equal(old, new.detach())
