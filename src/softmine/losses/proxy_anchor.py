"""Proxy-Anchor loss: each class proxy is an anchor pulling its batch samples, pushing the rest.

Kim, Kim, Cho, Kwak. "Proxy Anchor Loss for Deep Metric Learning". CVPR 2020
(code: github.com/tjddus9597/Proxy-Anchor-CVPR2020, ``losses.Proxy_Anchor``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from softmine.errors import ConfigError
from softmine.losses.base import MetricLoss
from softmine.losses.pairwise import (
    EPS,
    check_inputs,
    common_float,
    full_precision,
    masked_log1p_sum_exp,
    unit_rows,
)


def proxy_anchor_loss(
    embeddings: Tensor,
    labels: Tensor,
    proxies: Tensor,
    *,
    alpha: float = 32.0,
    delta: float = 0.1,
) -> Tensor:
    """Proxy-Anchor loss (Eq. 4 of the paper).

    With s(x, p) the cosine similarity of an embedding and a proxy, P all C proxies,
    P+ the proxies of the classes present in the batch, X_p+ the batch samples of
    proxy p's class and X_p- the others:

    L = 1/|P+| sum_{p in P+} log(1 + sum_{x in X_p+} exp(-alpha (s(x, p) - delta)))
      + 1/|P|  sum_{p in P}  log(1 + sum_{x in X_p-} exp( alpha (s(x, p) + delta)))

    Every sample of the batch enters the gradient of every proxy's term, weighted by
    its relative hardness (the softmax inside the log-sum-exp). Computed stably as a
    masked log-sum-exp over the (n, C) similarity matrix.

    Args:
        embeddings: (n, dim) features (normalised here).
        labels: (n,) integer labels in 0..C-1.
        proxies: (C, dim) one proxy per class (normalised here).
        alpha: scale (32 in the paper).
        delta: margin (0.1 in the paper).

    Returns:
        Scalar loss in float32 (float64 for float64 input).
    """
    check_inputs(embeddings, labels)
    if proxies.dim() != 2 or proxies.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"proxies must be (num_classes, {embeddings.shape[1]}), got {tuple(proxies.shape)}"
        )
    with full_precision(embeddings):
        e, p = common_float(embeddings, proxies)
        sim = (unit_rows(e) @ F.normalize(p, dim=1, eps=EPS).T).T  # (C, n): proxy rows
        own = labels.long()[None, :] == torch.arange(len(p), device=labels.device)[:, None]
        pos = masked_log1p_sum_exp(-alpha * (sim - delta), own)  # 0 for proxies not in the batch
        neg = masked_log1p_sum_exp(alpha * (sim + delta), ~own)
        present = own.any(dim=1).sum().clamp_min(1)
        return pos.sum() / present + neg.sum() / len(p)


class ProxyAnchorLoss(MetricLoss):
    """Module form of :func:`proxy_anchor_loss` with its own proxies (config ``loss=proxy_anchor``).

    The proxies start as the authors' do, ``kaiming_normal_(mode="fan_out")`` (standard
    deviation sqrt(2 / num_classes)). The paper trains them 100x faster than the network:
    give them their rate with ``optimizer.param_groups=[{pattern: loss.proxies, lr_mult: 100}]``
    (the modern_* experiments do).

    Args:
        num_classes: number of training classes (labels 0..num_classes-1).
        embedding_dim: dimension of the embeddings.
        alpha: scale (32).
        delta: margin (0.1).
    """

    def __init__(
        self, num_classes: int, embedding_dim: int, alpha: float = 32.0, delta: float = 0.1
    ) -> None:
        super().__init__()
        if num_classes is None or int(num_classes) < 1:
            raise ConfigError(f"loss.num_classes must be >= 1 (got {num_classes})")
        if embedding_dim is None or int(embedding_dim) < 1:
            raise ConfigError(f"loss.embedding_dim must be >= 1 (got {embedding_dim})")
        if not alpha > 0:
            raise ConfigError(f"loss.alpha must be > 0 (got {alpha}); the paper uses 32")
        if not delta >= 0:
            raise ConfigError(f"loss.delta must be >= 0 (got {delta}); the paper uses 0.1")
        self.alpha, self.delta = float(alpha), float(delta)
        proxies = torch.empty(int(num_classes), int(embedding_dim))
        nn.init.kaiming_normal_(proxies, mode="fan_out")
        self.proxies = nn.Parameter(proxies)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return proxy_anchor_loss(
            embeddings, labels, self.proxies, alpha=self.alpha, delta=self.delta
        )
