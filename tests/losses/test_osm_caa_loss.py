"""OSM+CAA loss (paper and authors' forms) against float64 loops over pairs written here.

The loops use true Euclidean distances ||x_i - x_j|| of the normalised rows and
scalar autograd, so values *and* gradients are checked against an independent
computation, never against the vectorised code itself.
"""

from __future__ import annotations

import math
import os
import shutil
import warnings

import pytest
import torch

from softmine.errors import ConfigError
from softmine.losses import (
    OSMCAAAuthorsLoss,
    OSMCAALoss,
    caa_attention,
    fused,
    weighted_contrastive_loss,
)

REL = 1e-6
F64 = torch.float64


def _rows(f: torch.Tensor) -> list[torch.Tensor]:
    return [f[i] / f[i].square().sum().sqrt() for i in range(f.shape[0])]


def _dist(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d2 = (u - v).square().sum()
    return d2, d2.sqrt() if float(d2.detach()) > 0 else d2 * 0.0


def loop_pair_loss(f, y, a, *, margin, sigma, lam, osm, detach, gauss_den=None):
    """Weighted contrastive loss by a double loop over ordered pairs i != j.

    ``gauss_den`` is the denominator of the positive Gaussian exp(-d^2 / den);
    the paper's is sigma^2.
    """
    den = sigma**2 if gauss_den is None else gauss_den
    x = _rows(f)
    y = y.tolist()
    zero = f.sum() * 0.0
    pn, pd, nn_, nd = zero, zero, zero, zero
    for i in range(len(y)):
        for j in range(len(y)):
            if i == j:
                continue
            d2, d = _dist(x[i], x[j])
            att = 1.0 if a is None else torch.minimum(a[i], a[j])
            hinge = torch.clamp(margin - d, min=0.0)
            if y[i] == y[j]:
                w = (torch.exp(-d2 / den) if osm else 1.0) * att
                w = w.detach() if detach and torch.is_tensor(w) else w
                pn, pd = pn + w * d2, pd + w
            else:
                w = (hinge if osm else 1.0) * att
                w = w.detach() if detach and torch.is_tensor(w) else w
                nn_, nd = nn_ + w * hinge**2, nd + w
    lp = 0.5 * pn / pd if float(pd.detach()) > 0 else zero
    ln = 0.5 * nn_ / nd if float(nd.detach()) > 0 else zero
    return (1 - lam) * lp + lam * ln


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).norm() / ref.norm().clamp_min(1e-300))


def _batch(seed: int, labels: list[int], dim: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(labels), dim, generator=g, dtype=F64), torch.tensor(labels)


BATCHES = {
    "pk": [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3],
    "uneven": [4, 0, 4, 1, 1, 7, 0, 4, 2],
    "no_positives": [0, 1, 2, 3, 4, 5, 6],
    "single_class": [3, 3, 3, 3, 3, 3],
}


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("use_attention", [True, False])
@pytest.mark.parametrize("osm", [True, False])
def test_value_and_gradient_match_float64_loop(
    batch: str, detach: bool, use_attention: bool, osm: bool
) -> None:
    f, y = _batch(0, BATCHES[batch])
    g = torch.Generator().manual_seed(1)
    a = torch.rand(len(y), generator=g, dtype=F64) * 0.9 + 0.05 if use_attention else None
    kw = dict(margin=1.2, sigma=0.8, lam=0.3, osm=osm)

    f1 = f.clone().requires_grad_()
    a1 = None if a is None else a.clone().requires_grad_()
    got = weighted_contrastive_loss(f1, y, a1, detach_weights=detach, **kw)
    f2 = f.clone().requires_grad_()
    a2 = None if a is None else a.clone().requires_grad_()
    ref = loop_pair_loss(f2, y, a2, detach=detach, **kw)

    assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=REL, abs=1e-300)
    ins1 = [f1] + ([a1] if a1 is not None else [])
    ins2 = [f2] + ([a2] if a2 is not None else [])
    grads1 = torch.autograd.grad(got, ins1, allow_unused=True)
    grads2 = torch.autograd.grad(ref, ins2, allow_unused=True)
    for g1, g2 in zip(grads1, grads2, strict=True):
        g1 = torch.zeros_like(ins1[0]) if g1 is None else g1
        g2 = torch.zeros_like(g1) if g2 is None else g2
        if float(g2.norm()) == 0.0:
            assert float(g1.norm()) < 1e-12
        else:
            assert _rel_err(g1, g2) < REL


def test_detached_weights_give_attention_no_gradient() -> None:
    f, y = _batch(2, BATCHES["pk"])
    a = torch.rand(len(y), dtype=F64, requires_grad=True)
    loss = weighted_contrastive_loss(f.requires_grad_(), y, a)
    (ga,) = torch.autograd.grad(loss, [a], allow_unused=True)
    assert ga is None or float(ga.abs().max()) == 0.0


def test_empty_terms_are_zero_not_nan() -> None:
    f, y = _batch(3, BATCHES["no_positives"])
    _, det = weighted_contrastive_loss(f, y, return_details=True)
    assert float(det["l_pos"]) == 0.0
    f, y = _batch(3, BATCHES["single_class"])
    _, det = weighted_contrastive_loss(f, y, return_details=True)
    assert float(det["l_neg"]) == 0.0
    # every negative outside the margin: L_N is 0 (OSM weights all 0)
    f = torch.tensor([[1.0, 0.0], [1.0, 0.01], [-1.0, 0.0], [-1.0, 0.01]], dtype=F64)
    _, det = weighted_contrastive_loss(f, torch.tensor([0, 0, 1, 1]), return_details=True)
    assert float(det["l_neg"]) == 0.0 and math.isfinite(float(det["l_pos"]))


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_identical_embeddings_hand_value_and_finite_gradient(detach: bool, dtype) -> None:
    # all d = 0: L_P = 0; every negative has hinge = margin and the same weight, so
    # L_N = margin^2 / 2 exactly.
    f = torch.ones(6, 4, dtype=dtype).requires_grad_()
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    a = torch.linspace(0.2, 0.9, 6, dtype=dtype).requires_grad_()
    loss = weighted_contrastive_loss(f, y, a, lam=0.5, detach_weights=detach)
    assert float(loss) == pytest.approx(0.5 * 0.5 * 1.2**2, rel=1e-6)
    loss.backward()
    assert torch.isfinite(f.grad).all()
    assert a.grad is None or torch.isfinite(a.grad).all()


def test_weights_detail_is_osm_times_min_attention() -> None:
    x = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], dtype=F64)
    y = torch.tensor([0, 0, 1])
    a = torch.tensor([0.5, 0.25, 1.0], dtype=F64)
    _, det = weighted_contrastive_loss(x, y, a, sigma=0.8, margin=1.2, return_details=True)
    w = det["weights"]
    d01_sq = 0.4**2 + 0.8**2  # positives 0-1
    d12 = math.sqrt(0.6**2 + 0.2**2)  # negative 1-2
    assert float(w[0, 1]) == pytest.approx(math.exp(-d01_sq / 0.64) * 0.25, rel=1e-12)
    assert float(w[1, 2]) == pytest.approx((1.2 - d12) * 0.25, rel=1e-12)
    assert float(w[0, 2]) == 0.0  # d = sqrt(2) > margin
    assert torch.all(w.diagonal() == 0)
    assert torch.equal(w, w.T)


def test_softmax_cosine_attention_hand_example() -> None:
    emb = torch.tensor([[1.0, 0.0]], dtype=F64)
    vecs = torch.tensor([[2.0, 0.0], [0.0, 3.0]], dtype=F64)  # normalised to e1, e2
    a = caa_attention(emb, torch.tensor([0]), vecs)
    assert float(a) == pytest.approx(math.e / (math.e + 1.0))


def test_gaussian_prob_attention_hand_example() -> None:
    emb = torch.tensor([[1.0, 2.0]], dtype=F64)
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64)
    b = torch.tensor([0.5, 0.0], dtype=F64)
    # logits (1.5, 2.0): p_0 = 1 / (1 + e^0.5)
    p = 1.0 / (1.0 + math.exp(0.5))
    a = caa_attention(emb, torch.tensor([0]), w, mode="gaussian_prob", bias=b)
    assert float(a) == pytest.approx(math.exp(-((p - 1) ** 2) / (2 * 0.68**2)), rel=1e-12)


def _loop_ce_attention(f, y, vecs, scale):
    """Cosine-softmax CE (mean) and attention p_i[y_i], one sample at a time."""
    x = _rows(f)
    c = [v / v.square().sum().sqrt() for v in vecs]
    ce, att = f.sum() * 0.0, []
    for i, yi in enumerate(y.tolist()):
        logits = torch.stack([scale * (x[i] * ck).sum() for ck in c])
        log_p = logits[yi] - torch.logsumexp(logits, 0)
        ce = ce - log_p / len(y)
        att.append(log_p.exp())
    return ce, torch.stack(att)


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("osm,caa", [(True, True), (False, True), (True, False), (False, False)])
def test_module_matches_loop_with_cross_entropy(osm: bool, caa: bool, detach: bool) -> None:
    f, y = _batch(4, BATCHES["uneven"], dim=6)
    loss_fn = OSMCAALoss(
        num_classes=8, embedding_dim=6, osm=osm, caa=caa, scale=2.0, detach_weights=detach
    ).double()
    with torch.no_grad():
        loss_fn.class_vectors.normal_(generator=torch.Generator().manual_seed(5))
    f1 = f.clone().requires_grad_()
    got, det = loss_fn(f1, y, return_details=True)
    got.backward()

    f2 = f.clone().requires_grad_()
    v2 = loss_fn.class_vectors.detach().clone().requires_grad_()
    ce, att = _loop_ce_attention(f2, y, v2, 2.0)
    a = (att.detach() if detach else att) if caa else None
    pair = loop_pair_loss(f2, y, a, margin=1.2, sigma=0.8, lam=0.5, osm=osm, detach=detach)
    ref = pair + ce
    ref.backward()
    assert float(got) == pytest.approx(float(ref), rel=REL)
    assert float(det["ce"]) == pytest.approx(float(ce), rel=REL)
    assert _rel_err(f1.grad, f2.grad) < REL
    assert _rel_err(loss_fn.class_vectors.grad, v2.grad) < REL
    assert ("attention" in det) == caa


def _module_and_loop_reference(seed: int):
    """An OSMCAALoss (scale 2, double) and the float64 loop's loss and gradients for one batch."""
    f, y = _batch(seed, BATCHES["pk"], dim=6)
    loss_fn = OSMCAALoss(num_classes=4, embedding_dim=6, scale=2.0).double()
    with torch.no_grad():
        loss_fn.class_vectors.normal_(generator=torch.Generator().manual_seed(seed + 1))
    f2 = f.clone().requires_grad_()
    v2 = loss_fn.class_vectors.detach().clone().requires_grad_()
    ce, att = _loop_ce_attention(f2, y, v2, 2.0)
    ref = ce + loop_pair_loss(
        f2, y, att.detach(), margin=1.2, sigma=0.8, lam=0.5, osm=True, detach=True
    )
    gf, gv = torch.autograd.grad(ref, [f2, v2])
    return loss_fn, f, y, float(ref.detach()), gf, gv


def test_gradient_scales_with_upstream_and_survives_retain_graph() -> None:
    loss_fn, f, y, ref, gf, gv = _module_and_loop_reference(11)
    f1 = f.clone().requires_grad_()
    scaled = 0.7 * loss_fn(f1, y)
    scaled.backward(retain_graph=True)
    scaled.backward()  # a second pass through the same graph accumulates the same gradient
    assert _rel_err(f1.grad, 1.4 * gf) < REL
    assert _rel_err(loss_fn.class_vectors.grad, 1.4 * gv) < REL


def test_gradient_when_only_one_input_needs_it() -> None:
    loss_fn, f, y, ref, gf, gv = _module_and_loop_reference(12)
    f1 = f.clone().requires_grad_()
    loss_fn.class_vectors.requires_grad_(False)  # frozen classifier
    loss_fn(f1, y).backward()
    assert _rel_err(f1.grad, gf) < REL and loss_fn.class_vectors.grad is None
    loss_fn.class_vectors.requires_grad_(True)
    loss_fn(f.clone(), y).backward()  # fixed embeddings: only the classifier learns
    assert _rel_err(loss_fn.class_vectors.grad, gv) < REL


def test_no_grad_value_and_no_double_backward() -> None:
    loss_fn, f, y, ref, _, _ = _module_and_loop_reference(13)
    with torch.no_grad():
        assert float(loss_fn(f, y)) == pytest.approx(ref, rel=REL)
    f1 = f.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="detach_weights=False"):
        torch.autograd.grad(loss_fn(f1, y), [f1], create_graph=True)


def test_mixed_precision_inputs_compute_in_the_wider_dtype() -> None:
    loss_fn, f, y, ref, gf, gv = _module_and_loop_reference(14)  # float64 throughout
    f1 = f.clone().requires_grad_()
    loss_fn.float()  # float32 class vectors, float64 embeddings
    with torch.no_grad():
        v64 = loss_fn.class_vectors.double()
    loss = loss_fn(f1, y)
    loss.backward()
    assert loss.dtype == F64 and loss_fn.class_vectors.grad.dtype == torch.float32
    # the reference with the same (float32-rounded) class vectors, all in float64
    ref_fn = OSMCAALoss(num_classes=4, embedding_dim=6, scale=2.0).double()
    with torch.no_grad():
        ref_fn.class_vectors.copy_(v64)
    f2 = f.clone().requires_grad_()
    ref_loss = ref_fn(f2, y)
    ref_loss.backward()
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-12)
    assert _rel_err(f1.grad, f2.grad) < 1e-12
    assert _rel_err(loss_fn.class_vectors.grad.double(), ref_fn.class_vectors.grad) < 1e-6


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None, reason="torch.compile on CPU needs g++"
)
def test_compiled_loss_matches_float64_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fused, "_COMPILE_FAILED", [])
    loss_fn, f, y, ref, gf, gv = _module_and_loop_reference(15)
    loss_fn.compile = True
    f1 = f.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a fallback is reported below
        loss = loss_fn(f1, y)
    loss.backward()
    assert float(loss) == pytest.approx(ref, rel=REL)
    assert _rel_err(f1.grad, gf) < REL
    assert _rel_err(loss_fn.class_vectors.grad, gv) < REL
    # the authors' form: no classifier inside the fused part, attention passed in
    authors = OSMCAAAuthorsLoss(num_classes=4, embedding_dim=6).double()
    eager_loss = authors(f, y)
    authors.compile = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert float(authors(f, y)) == pytest.approx(float(eager_loss), rel=1e-12)
    if fused._COMPILE_FAILED:  # checked the eager fallback only
        pytest.skip(f"torch.compile cannot compile here: {fused._COMPILE_FAILED[0][:300]}")


@pytest.mark.parametrize("stage", ["torch.compile", "first call"])
def test_compile_failure_warns_once_and_runs_eagerly(
    stage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch._dynamo.exc import TorchDynamoException

    def no_compiler(*args: object) -> None:
        raise TorchDynamoException("InvalidCxxCompiler: no working C++ compiler found")

    def unsupported() -> None:
        raise RuntimeError("Dynamo is not supported here: no C++ compiler for this Python")

    factory = unsupported if stage == "torch.compile" else (lambda: no_compiler)
    monkeypatch.setattr(fused, "_compiled_kernel", factory)
    monkeypatch.setattr(fused, "_COMPILE_FAILED", [])
    loss_fn, f, y, ref, gf, _ = _module_and_loop_reference(16)
    loss_fn.compile = True
    f1 = f.clone().requires_grad_()
    with pytest.warns(RuntimeWarning, match="compile failed.*C\\+\\+ compiler") as record:
        loss = loss_fn(f1, y)
        loss_fn(f, y)  # the second call goes straight to eager, without a warning
    assert len(record) == 1
    loss.backward()
    assert float(loss) == pytest.approx(ref, rel=REL)
    assert _rel_err(f1.grad, gf) < REL


def test_computation_errors_are_not_mistaken_for_compile_failures(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("index 9 is out of bounds")

    monkeypatch.setattr(fused, "_compiled_kernel", lambda: broken)
    monkeypatch.setattr(fused, "_COMPILE_FAILED", [])
    loss_fn, f, y, *_ = _module_and_loop_reference(17)
    loss_fn.compile = True
    with pytest.raises(RuntimeError, match="out of bounds"):
        loss_fn(f, y)
    assert not fused._COMPILE_FAILED


def test_module_without_classifier_has_no_ce() -> None:
    f, y = _batch(6, BATCHES["pk"])
    loss_fn = OSMCAALoss(num_classes=4, embedding_dim=5, caa=False, ce_weight=0.0).double()
    loss, det = loss_fn(f, y, return_details=True)
    assert "ce" not in det and "attention" not in det
    assert float(loss) == pytest.approx(float(weighted_contrastive_loss(f, y)), rel=1e-12)


def test_authors_form_matches_caffe_style_loop() -> None:
    """Default head (on the embedding): weighted CE + V5 pair loss, by loops in float64.

    Caffe's ContrastiveLoss backward divides the negatives' gradient by d + 1e-4; the loop's
    value has no such term, so the value is compared exactly and the gradient to 1e-3
    (tests/losses/test_authors_objective.py ports the backward itself, to 1e-6).
    """
    f, y = _batch(7, BATCHES["pk"], dim=6)
    loss_fn = OSMCAAAuthorsLoss(num_classes=4, embedding_dim=6).double()
    head = loss_fn.heads["classifier"].linear
    with torch.no_grad():
        head.weight.normal_(generator=torch.Generator().manual_seed(8))
        head.bias.normal_(generator=torch.Generator().manual_seed(9))
    f1 = f.clone().requires_grad_()
    got, det = loss_fn(f1, y, return_details=True)
    got.backward()

    f2 = f.clone().requires_grad_()
    w2 = head.weight.detach().clone().requires_grad_()
    b2 = head.bias.detach().clone().requires_grad_()
    ce, v, att = f2.sum() * 0.0, [], []
    log_ps = []
    for i, yi in enumerate(y.tolist()):
        logits = torch.stack([(f2[i] * w2[k]).sum() + b2[k] for k in range(4)])
        log_ps.append(logits[yi] - torch.logsumexp(logits, 0))
        p = math.exp(float(log_ps[-1]))
        att.append(math.exp(-((p - 1.0) ** 2) / (2 * 0.68**2)))
        v.append(math.exp(-((p - 0.5) ** 2) / (2 * 0.18**2)))
    for lp, vi in zip(log_ps, v, strict=True):
        ce = ce - vi / sum(v) * lp
    a = torch.tensor(att, dtype=F64)
    pair = loop_pair_loss(
        f2, y, a, margin=1.2, sigma=0.8, lam=0.5, osm=True, detach=True, gauss_den=2 * 0.8**2
    )
    n = len(y)
    ref = pair / (n * (n - 1) / 2) + ce
    ref.backward()
    assert float(got) == pytest.approx(float(ref), rel=REL)
    assert float(det["ce"]) == pytest.approx(float(ce), rel=REL)
    assert torch.allclose(det["attention"], a, rtol=1e-12)
    assert _rel_err(f1.grad, f2.grad) < 1e-3
    assert _rel_err(head.weight.grad, w2.grad) < REL
    assert _rel_err(head.bias.grad, b2.grad) < REL


def test_authors_form_reads_features_when_given() -> None:
    f, y = _batch(10, BATCHES["pk"], dim=6)
    feats = torch.randn(len(y), 9, dtype=F64, requires_grad=True)
    loss_fn = OSMCAAAuthorsLoss(
        num_classes=4,
        embedding_dim=6,
        heads={"h": {"feature": "pool5"}},
        attention_head="h",
        feature_dims={"pool5": 9},
    ).double()
    loss = loss_fn(f, y, features={"pool5": feats})
    loss.backward()
    assert feats.grad is not None and float(feats.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="pool5"):
        loss_fn(f, y)  # the head reads pool5, which was not given


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


@pytest.mark.parametrize(
    "kwargs",
    [
        {"margin": 0.0},
        {"sigma": -1.0},
        {"lam": 1.5},
        {"num_classes": None},
        {"ce_weight": 0.0},  # CAA with detached weights and nothing to train the vectors
        {"scale": 0.0},
        {"compile": True, "detach_weights": False},  # only the fused form compiles
    ],
)
def test_bad_hyperparameters_raise_config_error(kwargs: dict) -> None:
    args = {"num_classes": 3, "embedding_dim": 4, **kwargs}
    with pytest.raises(ConfigError):
        OSMCAALoss(**args)
