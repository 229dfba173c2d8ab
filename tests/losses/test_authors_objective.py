"""The authors' three-head objective against a float64 port of their released Caffe layers.

The port follows the C++ of XinshaoAmosWang/OSM_CAA_WeightedContrastiveLoss (a8911b9) line by
line, with explicit backward passes (no autograd): ``InnerProduct`` -> ``Softmax`` ->
``ExtractProb`` -> ``Gaussian`` (with its 1/(sqrt(2 pi) sigma) factor) -> ``Normalization``
(L1) -> ``WeightedSoftmaxWithLoss`` for each head, and ``Normalization`` (L2) ->
``DistanceWeightedValidPairLossV5`` around ``ContrastiveLoss`` (gradient / number of pairs,
negatives / (d + 1e-4)) for the pair loss; the layers' wiring is that of
``CUB_V01/M_WIDE_ASiamese_V42_e1/train.prototxt`` (heads loss1/loss2/loss3, attention from loss3).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from softmine.losses import OSMCAAAuthorsLoss, OSMCAAAuthorsVideoLoss

FLT_MIN = 1.1754943508222875e-38
DIMS = {"inception_3c": 7, "embedding": 6, "pool5": 5}
HEADS = {
    "loss1": {"feature": "inception_3c"},
    "loss2": {"feature": "embedding"},
    "loss3": {"feature": "pool5"},
}


def caffe_gaussian(x: np.ndarray, sigma: float, mean: float) -> np.ndarray:
    """``GaussianLayer::gaussianfunc`` (gaussian_layer.hpp), normalising factor included."""
    return np.exp(-0.5 * ((x - mean) / sigma) ** 2) / math.sqrt(2 * math.pi * sigma**2)


def weighted_softmax_head(f, w, b, labels):
    """One head: forward loss, p (true-class prob), gradients to f, W and b (loss_weight 1)."""
    logits = f @ w.T + b
    prob = np.exp(logits - logits.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    n = len(labels)
    p = prob[np.arange(n), labels]
    g = caffe_gaussian(p, 0.18, 0.5)  # gaussian/probK
    v = g / (np.abs(g).sum() + 1e-12)  # l1_norm/probK (NormalizationLayer, L1)
    loss = -(v * np.log(np.maximum(p, FLT_MIN))).sum()
    diff = prob.copy()
    diff[np.arange(n), labels] -= 1.0
    diff *= v[:, None]
    return loss, p, diff @ w, diff.T @ f, diff.sum(0)


def l2_normalization(f):
    """NormalizationLayer (L2): forward, and its backward as a function of the top diff."""
    norm = np.sqrt((f**2).sum(1) + 1e-12)
    x = f / norm[:, None]

    def backward(dx):
        a = (x * dx).sum(1, keepdims=True)
        return (dx - a * x) / norm[:, None]

    return x, backward


def v5_pair_loss(x, labels, attention, *, margin, sigma, lam=0.5):
    """DistanceWeightedValidPairLossV5 backward (top diff 1) and the objective it is the gradient of."""
    n = len(labels)
    pairs = [(i, j) for i in range(n - 1) for j in range(i + 1, n)]
    num = len(pairs)
    dist = np.array([np.linalg.norm(x[i] - x[j]) for i, j in pairs])
    same = np.array([labels[i] == labels[j] for i, j in pairs])
    score = np.array([min(attention[i], attention[j]) for i, j in pairs])
    w_pos = caffe_gaussian(dist, sigma, 0.0) * score
    hinge = np.maximum(0.0, margin - dist)
    w_neg = hinge * score
    s_pos = w_pos[same].sum() + 1e-12
    s_neg = w_neg[~same].sum() + 1e-12
    grad = np.zeros_like(x)
    for k, (i, j) in enumerate(pairs):
        diff = x[i] - x[j]
        alpha = 1.0 / num  # ContrastiveLoss: top diff / bottom num
        if same[k]:
            g = alpha * diff
            ps = 0.5 * w_pos[k] / s_pos
        else:
            g = -alpha * hinge[k] / (dist[k] + 1e-4) * diff if hinge[k] > 0 else 0.0 * diff
            ps = 0.5 * w_neg[k] / s_neg
        grad[i] += ps * g
        grad[j] -= ps * g
    l_pos = 0.5 * (w_pos[same] * dist[same] ** 2).sum() / s_pos
    l_neg = 0.5 * (w_neg[~same] * hinge[~same] ** 2).sum() / s_neg
    return ((1 - lam) * l_pos + lam * l_neg) / num, grad


def _setup(seed: int, labels: list[int], num_classes: int = 4):
    rng = np.random.default_rng(seed)
    feats = {k: rng.normal(size=(len(labels), d)) for k, d in DIMS.items()}
    params = {
        h: (rng.normal(size=(num_classes, DIMS[o["feature"]])) * 0.7, rng.normal(size=num_classes))
        for h, o in HEADS.items()
    }
    return feats, params, np.array(labels)


@pytest.mark.parametrize(
    "labels", [[0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3], [2, 0, 2, 1, 1, 3, 0, 2, 3, 1]]
)
def test_three_head_objective_matches_the_released_layers(labels: list[int]) -> None:
    feats, params, y = _setup(3, labels)
    # --- the Caffe port
    value, grads, p = 0.0, {k: np.zeros_like(v) for k, v in feats.items()}, {}
    head_grads = {}
    for h, opts in HEADS.items():
        w, b = params[h]
        loss, p[h], df, dw, db = weighted_softmax_head(feats[opts["feature"]], w, b, y)
        value += loss
        grads[opts["feature"]] += df
        head_grads[h] = (dw, db)
    attention = caffe_gaussian(p["loss3"], 0.68, 1.0)  # attention/prob3
    x, l2_back = l2_normalization(feats["embedding"])  # middle_I_feature/L2Norm
    pair_value, dx = v5_pair_loss(x, y, attention, margin=1.2, sigma=0.8)
    value += pair_value
    grads["embedding"] += l2_back(dx)

    # --- softmine
    loss_fn = OSMCAAAuthorsLoss(
        num_classes=4, embedding_dim=6, heads=HEADS, attention_head="loss3", feature_dims=DIMS
    ).double()
    with torch.no_grad():
        for h, (w, b) in params.items():
            loss_fn.heads[h].linear.weight.copy_(torch.from_numpy(w))
            loss_fn.heads[h].linear.bias.copy_(torch.from_numpy(b))
    t = {k: torch.from_numpy(v).requires_grad_() for k, v in feats.items()}
    got, details = loss_fn(t["embedding"], torch.from_numpy(y), True, features=t)
    got.backward()

    assert float(got) == pytest.approx(value, rel=1e-9)
    for k in DIMS:
        np.testing.assert_allclose(t[k].grad.numpy(), grads[k], rtol=1e-6, atol=1e-12)
    for h, (dw, db) in head_grads.items():
        np.testing.assert_allclose(
            loss_fn.heads[h].linear.weight.grad.numpy(), dw, rtol=1e-6, atol=1e-12
        )
        np.testing.assert_allclose(
            loss_fn.heads[h].linear.bias.grad.numpy(), db, rtol=1e-6, atol=1e-12
        )
    # the pieces the train log shows: three cross-entropies and a non-constant attention
    assert {"ce_loss1", "ce_loss2", "ce_loss3", "ce", "pair", "attention"} <= set(details)
    caffe_factor = caffe_gaussian(1.0, 0.68, 1.0)  # 1 / (sqrt(2 pi) 0.68): normalised away
    np.testing.assert_allclose(details["attention"].numpy(), attention / caffe_factor, rtol=1e-9)
    assert float(details["attention"].std()) > 0


def test_heads_need_their_features_and_a_known_attention_head() -> None:
    from softmine.errors import ConfigError

    with pytest.raises(ConfigError, match="not a feature of this backbone"):
        OSMCAAAuthorsLoss(4, 6, heads={"h": {"feature": "pool5"}}, attention_head="h")
    with pytest.raises(ConfigError, match="attention_head"):
        OSMCAAAuthorsLoss(4, 6, heads=HEADS, attention_head="loss9", feature_dims=DIMS)
    with pytest.raises(ConfigError, match="unknown key"):
        OSMCAAAuthorsLoss(4, 6, heads={"h": {"feature": "embedding", "lr": 2}}, attention_head="h")
    loss_fn = OSMCAAAuthorsLoss(4, 6, heads=HEADS, attention_head="loss3", feature_dims=DIMS)
    with pytest.raises(ValueError, match="pool5"):
        loss_fn(torch.randn(4, 6), torch.tensor([0, 0, 1, 1]))


def test_default_head_reads_the_embedding() -> None:
    """heads=None: one Gaussian-weighted head on the embedding, attention from it."""
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    f = torch.randn(8, 6, dtype=torch.float64)
    loss_fn = OSMCAAAuthorsLoss(4, 6).double()
    assert loss_fn.requires == ("embedding",)
    a = loss_fn(f, y)
    b = loss_fn(torch.randn(8, 6, dtype=torch.float64), y, features={"embedding": f})
    assert float(a) != pytest.approx(float(b))  # the head reads the features, not the argument
    c = loss_fn(f, y, features={"embedding": f})
    assert float(a) == pytest.approx(float(c), rel=1e-12)


def test_video_objective_matches_the_released_mars_layers() -> None:
    """MARS prototxt: frame heads, attention-pooled tracklets, tracklet head, two pair losses."""
    rng = np.random.default_rng(5)
    b, t, c = 6, 3, 4
    labels = np.array([0, 1, 2, 0, 1, 2])
    frame_labels = np.repeat(labels, t)
    feats = {k: rng.normal(size=(b * t, d)) for k, d in DIMS.items()}
    params = {
        h: (rng.normal(size=(c, DIMS[o["feature"]])) * 0.7, rng.normal(size=c))
        for h, o in HEADS.items()
    }
    tw, tb = rng.normal(size=(c, DIMS["embedding"])) * 0.7, rng.normal(size=c)
    value, grads, p = 0.0, {k: np.zeros_like(v) for k, v in feats.items()}, {}
    for h, opts in HEADS.items():
        loss, p[h], df, _, _ = weighted_softmax_head(
            feats[opts["feature"]], *params[h], frame_labels
        )
        value += loss
        grads[opts["feature"]] += df
    att = caffe_gaussian(p["loss3"], 0.68, 1.0)  # attention/prob3
    w = att.reshape(b, t) / (
        np.abs(att.reshape(b, t)).sum(1, keepdims=True) + 1e-12
    )  # attention_k/l1_norm
    f = feats["embedding"].reshape(b, t, -1)
    tracklet = (w[..., None] * f).sum(1)  # BatchPool with weights (no gradient to the weights)
    loss4, p4, dtrack, _, _ = weighted_softmax_head(tracklet, tw, tb, labels)
    value += loss4
    att4 = caffe_gaussian(p4, 0.68, 1.0)
    xt, back_t = l2_normalization(tracklet)
    v_t, dxt = v5_pair_loss(xt, labels, att4, margin=1.2, sigma=1.0)
    value += v_t
    dtrack = dtrack + back_t(dxt)
    grads["embedding"] += (w[..., None] * dtrack[:, None, :]).reshape(b * t, -1)
    xi, back_i = l2_normalization(feats["embedding"])
    v_i, dxi = v5_pair_loss(xi, frame_labels, att, margin=1.2, sigma=1.0)
    value += v_i
    grads["embedding"] += back_i(dxi)

    loss_fn = OSMCAAAuthorsVideoLoss(
        c, 6, heads=HEADS, attention_head="loss3", feature_dims=DIMS, tracklet_head={}
    ).double()
    with torch.no_grad():
        for h, (wt, bt) in params.items():
            loss_fn.heads[h].linear.weight.copy_(torch.from_numpy(wt))
            loss_fn.heads[h].linear.bias.copy_(torch.from_numpy(bt))
        loss_fn.tracklet_head.linear.weight.copy_(torch.from_numpy(tw))
        loss_fn.tracklet_head.linear.bias.copy_(torch.from_numpy(tb))
    tens = {k: torch.from_numpy(v.reshape(b, t, -1)).requires_grad_() for k, v in feats.items()}
    emb = torch.nn.functional.normalize(tens["embedding"].mean(1), dim=1)
    got = loss_fn(emb, torch.from_numpy(labels), features=tens)
    got.backward()
    assert float(got) == pytest.approx(value, rel=1e-9)
    for k in DIMS:
        np.testing.assert_allclose(
            tens[k].grad.numpy().reshape(b * t, -1), grads[k], rtol=1e-6, atol=1e-12
        )
