"""Classifier heads a loss attaches to named features of the backbone, and their cross-entropies.

The authors' released Caffe code keeps GoogLeNet-BN's three classifiers, each on
another feature (``loss1`` after ``inception_3c``, ``loss2`` on the embedding branch
after ``inception_4e``, ``loss3`` on ``pool5``), each trained by a cross-entropy
weighted per sample (``WeightedSoftmaxWithLoss`` fed by ``ExtractProb`` ->
``Gaussian`` -> ``Normalization`` (L1) layers, ``CUB_V01/M_WIDE_ASiamese_V42_e1/train.prototxt``),
and take the class-aware attention from one of them (``loss3``). A
:class:`ClassifierHead` is one such classifier; :func:`build_heads` makes a set of
them from a config mapping ``name -> {feature, weighting, weight}``, sized from the
backbone's ``feature_dims``.

The Caffe ``Gaussian`` layer multiplies by 1 / (sqrt(2 pi) sigma); every use of it
in the released code is normalised afterwards (the L1 ``Normalization``, the pair
weights' own sums, the tracklet pooling), so :func:`gaussian` leaves that constant out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from softmine.errors import ConfigError
from softmine.losses.pairwise import EPS, common_float, full_precision

HEAD_WEIGHTINGS = ("gaussian", "plain")
_HEAD_KEYS = {"feature", "weighting", "weight", "bias"}


def gaussian(t: Tensor, mean: float, sigma: float) -> Tensor:
    """exp(-(t - mean)^2 / (2 sigma^2)), the unnormalised Gaussian of the authors' Caffe layers."""
    return torch.exp((t - mean).square() * (-0.5 / (sigma * sigma)))


def true_class_log_prob(logits: Tensor, labels: Tensor) -> Tensor:
    """log softmax(logits)[i, y_i], shape (n,)."""
    return logits.log_softmax(dim=1).gather(1, labels.long()[:, None]).squeeze(1)


def weighted_cross_entropy(
    logits: Tensor,
    labels: Tensor,
    *,
    weighting: str = "gaussian",
    mean: float = 0.5,
    sigma: float = 0.18,
) -> tuple[Tensor, Tensor]:
    """Cross-entropy of a batch, and the (detached) true-class probabilities p_i.

    ``gaussian`` (the authors' ``WeightedSoftmaxWithLoss``): -sum_i v_i log p_i with
    v_i = g_i / sum_j g_j, g_i = exp(-(p_i - mean)^2 / (2 sigma^2)), v detached (Caffe
    propagates nothing to the weights); samples the classifier already gets right
    (p near 1) or hopelessly wrong (p near 0) count little. ``plain``: the mean
    -1/n sum_i log p_i (Caffe's ``SoftmaxWithLoss``).

    Computed in at least float32.
    """
    if weighting not in HEAD_WEIGHTINGS:
        raise ConfigError(f"head weighting must be one of {HEAD_WEIGHTINGS} (got {weighting!r})")
    with full_precision(logits):
        (z,) = common_float(logits)
        log_p = true_class_log_prob(z, labels)
        p = log_p.detach().exp()
        if weighting == "plain":
            return -log_p.mean(), p
        g = gaussian(p, mean, sigma)
        return -(g * log_p).sum() / g.sum().clamp_min(EPS), p


def caffe_xavier_(weight: Tensor) -> Tensor:
    """Caffe's ``xavier`` filler (the prototxts' default): U(-a, a), a = sqrt(3 / fan_in).

    Not PyTorch's ``xavier_uniform_``, which averages fan-in and fan-out
    (``CaffeMex_V28/include/caffe/filler.hpp``, ``XavierFiller``, variance_norm FAN_IN).
    """
    fan_in = weight[0].numel()
    bound = math.sqrt(3.0 / fan_in)
    with torch.no_grad():
        return weight.uniform_(-bound, bound)


class ClassifierHead(nn.Module):
    """A linear classifier on one named feature, trained by a (weighted) cross-entropy.

    Args:
        in_features: size of the feature it reads.
        num_classes: training classes.
        feature: name of the feature (a key of the backbone's ``feature_dims``).
        weighting: ``gaussian`` (authors) or ``plain``; see :func:`weighted_cross_entropy`.
        weight: loss weight of its cross-entropy (Caffe ``loss_weight``; 1 in every prototxt).
        bias: a bias term (the authors' classifiers have one, zero-initialised).
        ce_mean, ce_sigma: centre and width of the Gaussian sample weights (0.5, 0.18).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        feature: str = "embedding",
        weighting: str = "gaussian",
        weight: float = 1.0,
        bias: bool = True,
        ce_mean: float = 0.5,
        ce_sigma: float = 0.18,
    ) -> None:
        super().__init__()
        if weighting not in HEAD_WEIGHTINGS:
            raise ConfigError(
                f"loss head weighting must be one of {HEAD_WEIGHTINGS} (got {weighting!r})"
            )
        if not float(weight) >= 0:
            raise ConfigError(f"loss head weight must be >= 0 (got {weight})")
        if not ce_sigma > 0:
            raise ConfigError(f"loss.ce_sigma must be > 0 (got {ce_sigma})")
        self.feature, self.weighting, self.weight = str(feature), weighting, float(weight)
        self.ce_mean, self.ce_sigma = float(ce_mean), float(ce_sigma)
        self.linear = nn.Linear(int(in_features), int(num_classes), bias=bool(bias))
        caffe_xavier_(self.linear.weight)
        if self.linear.bias is not None:
            nn.init.zeros_(self.linear.bias)

    def logits(self, features: Tensor) -> Tensor:
        """(n, num_classes) class scores in at least float32."""
        with full_precision(features):
            f, w, b = common_float(features, self.linear.weight, self.linear.bias)
            return F.linear(f, w, b)

    def forward(self, features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(cross-entropy, before ``weight``; true-class probabilities p, detached)."""
        if features.dim() != 2 or features.shape[1] != self.linear.in_features:
            raise ValueError(
                f"the head on `{self.feature}` reads ({features.shape[0]}, "
                f"{self.linear.in_features}) features, got {tuple(features.shape)}"
            )
        return weighted_cross_entropy(
            self.logits(features),
            labels,
            weighting=self.weighting,
            mean=self.ce_mean,
            sigma=self.ce_sigma,
        )


class MissingFeatureError(ConfigError):
    """A head reads a feature the backbone does not offer; names the head (``needed_by``) and the feature.

    The run's builder (:func:`softmine.engine.objective.build_loss`) turns it into the
    one-line model-objective contract error that names the loss and the backbone.
    """

    def __init__(self, message: str, *, needed_by: str, feature: str) -> None:
        super().__init__(message)
        self.needed_by, self.feature = needed_by, feature


def build_heads(
    spec: Mapping[str, Mapping[str, Any]],
    num_classes: int,
    feature_dims: Mapping[str, int],
    *,
    ce_mean: float = 0.5,
    ce_sigma: float = 0.18,
) -> nn.ModuleDict:
    """Heads from a config mapping ``name -> {feature, weighting, weight, bias}``.

    Each head's input size is ``feature_dims[feature]``; an unknown feature is a
    :class:`MissingFeatureError`, an unknown key a :class:`ConfigError`, each listing
    what is available.
    """
    heads = nn.ModuleDict()
    for name, opts in spec.items():
        opts = dict(opts or {})
        unknown = set(opts) - _HEAD_KEYS
        if unknown:
            raise ConfigError(
                f"loss.heads.{name} has unknown key(s) {sorted(unknown)}; "
                f"a head takes {sorted(_HEAD_KEYS)}"
            )
        feature = str(opts.get("feature", "embedding"))
        if feature not in feature_dims:
            raise MissingFeatureError(
                f"loss.heads.{name}.feature={feature!r} is not a feature of this backbone; "
                f"it hands out {sorted(feature_dims)}",
                needed_by=f"loss.heads.{name}",
                feature=feature,
            )
        heads[str(name)] = ClassifierHead(
            feature_dims[feature],
            num_classes,
            feature=feature,
            weighting=str(opts.get("weighting", "gaussian")),
            weight=float(opts.get("weight", 1.0)),
            bias=bool(opts.get("bias", True)),
            ce_mean=ce_mean,
            ce_sigma=ce_sigma,
        )
    return heads
