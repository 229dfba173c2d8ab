"""SoftTriple loss: a softmax over classes, each class a soft mixture of K centers.

Qian, Shang, Sun, Hu, Li, Jin. "SoftTriple Loss: Deep Metric Learning Without Triplet
Sampling". ICCV 2019 (code: github.com/idstcv/SoftTriple, ``loss/SoftTriple.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from softmine.errors import ConfigError
from softmine.losses.base import MetricLoss
from softmine.losses.margin_softmax import target_offset
from softmine.losses.pairwise import EPS, check_inputs, common_float, full_precision, unit_rows

REG_EPS = 1e-5
"""Added under the square root of the center regulariser (the authors' code: ``2.0 + 1e-5``)."""


def softtriple_loss(
    embeddings: Tensor,
    labels: Tensor,
    centers: Tensor,
    *,
    centers_per_class: int = 10,
    la: float = 20.0,
    gamma: float = 0.1,
    tau: float = 0.2,
    margin: float = 0.01,
    reg_eps: float = REG_EPS,
) -> Tensor:
    """SoftTriple loss (Eq. 10 of the paper) plus its center regulariser (Eq. 12), batch mean.

    With unit x_i and unit centers w_c^k (K per class):
    S_ic = sum_k softmax_k(x_i . w_c^k / gamma) * (x_i . w_c^k),
    L_i = -log( e^{la (S_iy - margin)} / (e^{la (S_iy - margin)} + sum_{c != y} e^{la S_ic}) ),
    R = sum_c sum_{k < k'} sqrt(2 + reg_eps - 2 w_c^k . w_c^k') / (C K (K - 1)),
    L = mean_i L_i + tau * R  (R only when K > 1).

    Args:
        embeddings: (n, dim) features (normalised here).
        labels: (n,) integer labels in 0..C-1.
        centers: (C * K, dim) centers (normalised here); class c's are rows c*K ... c*K + K - 1.
        centers_per_class: K (10 in the paper).
        la: lambda, the scale of the class similarities (20).
        gamma: the softmax temperature over a class's centers (0.1).
        tau: weight of the regulariser that merges a class's redundant centers (0.2).
        margin: delta, the margin on the target class (0.01).
        reg_eps: added under the regulariser's square root (the authors' 1e-5; it keeps the
            gradient finite when two centers meet).

    Returns:
        Scalar loss in float32 (float64 for float64 input).
    """
    check_inputs(embeddings, labels)
    k = int(centers_per_class)
    if centers.dim() != 2 or centers.shape[1] != embeddings.shape[1] or centers.shape[0] % k:
        raise ValueError(
            f"centers must be (num_classes * {k}, {embeddings.shape[1]}), "
            f"got {tuple(centers.shape)}"
        )
    with full_precision(embeddings):
        e, w = common_float(embeddings, centers)
        w = F.normalize(w, dim=1, eps=EPS)
        sim = (unit_rows(e) @ w.T).view(len(e), -1, k)  # (n, C, K)
        class_sim = (F.softmax(sim / gamma, dim=2) * sim).sum(dim=2)
        logits = la * (class_sim - target_offset(class_sim, labels, margin))
        loss = F.cross_entropy(logits, labels.long())
        if tau > 0 and k > 1:
            per_class = w.view(-1, k, w.shape[1])
            gram = per_class @ per_class.transpose(1, 2)  # (C, K, K)
            upper = torch.ones(k, k, dtype=torch.bool, device=w.device).triu(1)
            dist = (2.0 + reg_eps - 2.0 * gram[:, upper]).sqrt()
            loss = loss + tau * dist.sum() / (per_class.shape[0] * k * (k - 1))
        return loss


class SoftTripleLoss(MetricLoss):
    """Module form of :func:`softtriple_loss` with its own centers (config ``loss=softtriple``).

    The centers start as the authors' do, ``kaiming_uniform_(a=sqrt(5))`` on their
    (dim, C * K) matrix, i.e. uniform in +-1/sqrt(C * K). The authors train them at 100x
    the network's learning rate (centers 0.01, network 1e-4): give them their rate with
    ``optimizer.param_groups=[{pattern: loss.centers, lr_mult: 100}]``.

    Args:
        num_classes: number of training classes (labels 0..num_classes-1).
        embedding_dim: dimension of the embeddings.
        centers_per_class: K (10).
        la: lambda (20).
        gamma: softmax temperature over a class's centers (0.1).
        tau: weight of the center regulariser (0.2).
        margin: delta (0.01).
    """

    classification_term = True  # a cross-entropy over the classes' soft similarities

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        centers_per_class: int = 10,
        la: float = 20.0,
        gamma: float = 0.1,
        tau: float = 0.2,
        margin: float = 0.01,
    ) -> None:
        super().__init__()
        if num_classes is None or int(num_classes) < 1:
            raise ConfigError(f"loss.num_classes must be >= 1 (got {num_classes})")
        if embedding_dim is None or int(embedding_dim) < 1:
            raise ConfigError(f"loss.embedding_dim must be >= 1 (got {embedding_dim})")
        if int(centers_per_class) != centers_per_class or int(centers_per_class) < 1:
            raise ConfigError(
                f"loss.centers_per_class must be an integer >= 1 (got {centers_per_class})"
            )
        for name, value in (("la", la), ("gamma", gamma)):
            if not value > 0:
                raise ConfigError(f"loss.{name} must be > 0 (got {value}); paper: la 20, gamma 0.1")
        if not tau >= 0 or not margin >= 0:
            raise ConfigError(f"loss.tau and loss.margin must be >= 0 (got {tau}, {margin})")
        self.centers_per_class = int(centers_per_class)
        self.la, self.gamma = float(la), float(gamma)
        self.tau, self.margin = float(tau), float(margin)
        rows = int(num_classes) * self.centers_per_class
        bound = 1.0 / math.sqrt(rows)
        self.centers = nn.Parameter(torch.empty(rows, int(embedding_dim)).uniform_(-bound, bound))

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return softtriple_loss(
            embeddings,
            labels,
            self.centers,
            centers_per_class=self.centers_per_class,
            la=self.la,
            gamma=self.gamma,
            tau=self.tau,
            margin=self.margin,
        )
