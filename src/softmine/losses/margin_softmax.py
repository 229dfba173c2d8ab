"""Margin softmax losses with learnable class vectors: CosFace, ArcFace and Sub-center ArcFace.

* CosFace (Large Margin Cosine Loss): Wang, Wang, Zhou, Ji, Gong, Zhou, Li, Liu.
  "CosFace: Large Margin Cosine Loss for Deep Face Recognition". CVPR 2018.
* ArcFace (Additive Angular Margin Loss): Deng, Guo, Xue, Zafeiriou. "ArcFace: Additive
  Angular Margin Loss for Deep Face Recognition". CVPR 2019
  (code: github.com/deepinsight/insightface, ``ArcFace`` in ``recognition/arcface_torch/losses.py``).
* Sub-center ArcFace: Deng, Guo, Liu, Gong, Zafeiriou. "Sub-center ArcFace: Boosting Face
  Recognition by Large-Scale Noisy Web Faces". ECCV 2020.

All three are the cross-entropy of scaled cosines ``s * cos(theta_k)`` between the
normalised embedding and the normalised class vectors, with a margin on the target
class only: ``cos(theta_y) - m`` (CosFace) or ``cos(theta_y + m)`` (ArcFace). The
(n, classes) logits come from one matrix product; nothing per pair of samples is formed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from softmine.errors import ConfigError
from softmine.losses.base import MetricLoss
from softmine.losses.pairwise import EPS, check_inputs, common_float, full_precision, unit_rows


def class_cosines(embeddings: Tensor, class_weights: Tensor, sub_centers: int = 1) -> Tensor:
    """(n, C) cosines of the embeddings with the classes, the best of each class's sub-centers.

    Args:
        embeddings: (n, dim) features (normalised here).
        class_weights: (C * sub_centers, dim) class vectors (normalised here); class c's
            sub-centers are rows ``c * sub_centers ... (c + 1) * sub_centers - 1``.
        sub_centers: vectors per class (1: one vector, the plain classifier).

    Call inside :func:`~softmine.losses.pairwise.full_precision`.
    """
    k = int(sub_centers)
    if (
        embeddings.dim() != 2
        or class_weights.dim() != 2
        or class_weights.shape[1] != embeddings.shape[1]
        or k < 1
        or class_weights.shape[0] % k
    ):
        raise ValueError(
            f"class_weights must be (num_classes * {k}, {embeddings.shape[1]}), "
            f"got {tuple(class_weights.shape)}"
        )
    e, w = common_float(embeddings, class_weights)
    cos = unit_rows(e) @ F.normalize(w, dim=1, eps=EPS).T
    return cos if k == 1 else cos.view(cos.shape[0], -1, k).amax(dim=2)


def target_offset(cos: Tensor, labels: Tensor, value: float) -> Tensor:
    """(n, C) zeros with ``value`` at each row's label: the margin of the target logits.

    A scatter rather than ``one_hot``, which reads the labels' range back from the device.
    """
    return torch.zeros_like(cos).scatter(1, labels.long()[:, None], value)


def cosface_loss(
    embeddings: Tensor,
    labels: Tensor,
    class_weights: Tensor,
    *,
    scale: float = 64.0,
    margin: float = 0.35,
) -> Tensor:
    """Large Margin Cosine Loss (CosFace, Eq. 4 of the paper), mean over the batch.

    L_i = -log( e^{s (cos theta_{y_i} - m)} / (e^{s (cos theta_{y_i} - m)} + sum_{k != y_i} e^{s cos theta_k}) ),
    theta_k the angle between the normalised embedding and the normalised class vector k.

    Args:
        embeddings: (n, dim) features (normalised here).
        labels: (n,) integer labels in 0..C-1.
        class_weights: (C, dim) class vectors (normalised here).
        scale: s (64 in the paper's experiments).
        margin: m (0.35, the same).

    Returns:
        Scalar loss in float32 (float64 for float64 input).
    """
    check_inputs(embeddings, labels)
    with full_precision(embeddings):
        cos = class_cosines(embeddings, class_weights)
        logits = cos - target_offset(cos, labels, margin)
        return F.cross_entropy(scale * logits, labels.long())


def arcface_loss(
    embeddings: Tensor,
    labels: Tensor,
    class_weights: Tensor,
    *,
    scale: float = 64.0,
    margin: float = 0.5,
    sub_centers: int = 1,
) -> Tensor:
    """Additive Angular Margin Loss (ArcFace, Eq. 3 of the paper), mean over the batch.

    L_i = -log( e^{s cos(theta_{y_i} + m)} / (e^{s cos(theta_{y_i} + m)} + sum_{k != y_i} e^{s cos theta_k}) ).

    Where theta_y + m would pass pi (cos theta_y < cos(pi - m)) the target logit is
    ``cos theta_y - m sin m`` instead, which keeps it decreasing in theta_y: the rule
    of the authors' code (insightface, ``easy_margin`` off) and of pytorch-metric-learning.
    cos(theta + m) is computed as cos theta cos m - sin theta sin m with
    sin theta = sqrt(max(1 - cos^2 theta, 1e-12)): exact except within 1e-6 rad of
    theta = 0 (off by at most 1e-6 sin m there), where the gradient stays finite
    (through arccos, as pytorch-metric-learning computes it, it is infinite at theta = 0).

    With ``sub_centers`` = K > 1 this is Sub-center ArcFace (Eq. 1 of Deng et al.,
    ECCV 2020): each class has K vectors and cos theta_k is the best of class k's K
    cosines, for the target class and for the others.

    Args:
        embeddings: (n, dim) features (normalised here).
        labels: (n,) integer labels in 0..C-1.
        class_weights: (C * sub_centers, dim) class vectors (normalised here).
        scale: s (64 in the paper's experiments).
        margin: m in radians (0.5 in the paper's experiments).
        sub_centers: K, vectors per class (1: ArcFace; 3 in Sub-center ArcFace).

    Returns:
        Scalar loss in float32 (float64 for float64 input).
    """
    check_inputs(embeddings, labels)
    with full_precision(embeddings):
        cos = class_cosines(embeddings, class_weights, sub_centers)
        y = labels.long()
        target = cos.gather(1, y[:, None])
        sin = (1.0 - target.square()).clamp_min(EPS).sqrt()
        shifted = target * math.cos(margin) - sin * math.sin(margin)
        fallback = target - margin * math.sin(margin)
        target = torch.where(target >= math.cos(math.pi - margin), shifted, fallback)
        logits = cos.scatter(1, y[:, None], target)
        return F.cross_entropy(scale * logits, y)


def _check_sizes(num_classes: int | None, embedding_dim: int | None) -> tuple[int, int]:
    if num_classes is None or int(num_classes) < 1:
        raise ConfigError(f"loss.num_classes must be >= 1 (got {num_classes})")
    if embedding_dim is None or int(embedding_dim) < 1:
        raise ConfigError(f"loss.embedding_dim must be >= 1 (got {embedding_dim})")
    return int(num_classes), int(embedding_dim)


def _check_scale_margin(scale: float, margin: float, paper: str) -> None:
    if not scale > 0:
        raise ConfigError(f"loss.scale must be > 0 (got {scale}); {paper}")
    if not margin >= 0:
        raise ConfigError(f"loss.margin must be >= 0 (got {margin}); {paper}")


def _class_vectors(rows: int, dim: int) -> nn.Parameter:
    """Class vectors drawn as the authors' code does: N(0, 0.01^2) (insightface ``partial_fc``)."""
    return nn.Parameter(torch.empty(rows, dim).normal_(0.0, 0.01))


class CosFaceLoss(MetricLoss):
    """Module form of :func:`cosface_loss` with its own class vectors (config ``loss=cosface``).

    Args:
        num_classes: number of training classes (labels 0..num_classes-1).
        embedding_dim: dimension of the embeddings.
        scale: s (64, the paper's experiments).
        margin: m (0.35, the same).
    """

    classification_term = True  # a cross-entropy over the class vectors

    def __init__(
        self, num_classes: int, embedding_dim: int, scale: float = 64.0, margin: float = 0.35
    ) -> None:
        super().__init__()
        c, d = _check_sizes(num_classes, embedding_dim)
        _check_scale_margin(scale, margin, "the paper uses s = 64, m = 0.35")
        self.scale, self.margin = float(scale), float(margin)
        self.class_weights = _class_vectors(c, d)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return cosface_loss(
            embeddings, labels, self.class_weights, scale=self.scale, margin=self.margin
        )


class ArcFaceLoss(MetricLoss):
    """Module form of :func:`arcface_loss` with its own class vectors (config ``loss=arcface``,
    and ``loss=subcenter_arcface`` with ``sub_centers`` > 1).

    Args:
        num_classes: number of training classes (labels 0..num_classes-1).
        embedding_dim: dimension of the embeddings.
        scale: s (64, the paper's experiments).
        margin: m in radians (0.5, the paper's experiments).
        sub_centers: K vectors per class (1: ArcFace; 3: Sub-center ArcFace, ECCV 2020).
    """

    classification_term = True  # a cross-entropy over the class vectors

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        scale: float = 64.0,
        margin: float = 0.5,
        sub_centers: int = 1,
    ) -> None:
        super().__init__()
        c, d = _check_sizes(num_classes, embedding_dim)
        _check_scale_margin(scale, margin, "the paper uses s = 64, m = 0.5")
        if not margin < math.pi:
            raise ConfigError(f"loss.margin is an angle in radians below pi (got {margin})")
        if int(sub_centers) != sub_centers or int(sub_centers) < 1:
            raise ConfigError(f"loss.sub_centers must be an integer >= 1 (got {sub_centers})")
        self.scale, self.margin, self.sub_centers = float(scale), float(margin), int(sub_centers)
        self.class_weights = _class_vectors(c * self.sub_centers, d)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return arcface_loss(
            embeddings,
            labels,
            self.class_weights,
            scale=self.scale,
            margin=self.margin,
            sub_centers=self.sub_centers,
        )


class SubCenterArcFaceLoss(ArcFaceLoss):
    """Sub-center ArcFace (config ``loss=subcenter_arcface``): :class:`ArcFaceLoss` with K = 3
    vectors per class, the paper's choice (Deng et al., ECCV 2020, its experiments' study of K).

    The paper's second stage (after training, drop the non-dominant sub-centers and the
    samples far from the dominant one, then retrain) cleans a noisy training set; it is
    not part of the loss and not done here.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        scale: float = 64.0,
        margin: float = 0.5,
        sub_centers: int = 3,
    ) -> None:
        super().__init__(num_classes, embedding_dim, scale, margin, sub_centers)
