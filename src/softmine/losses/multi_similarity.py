"""Multi-similarity loss with its pair mining.

Wang, Han, Huang, Dong, Scott. "Multi-Similarity Loss with General Pair Weighting
for Deep Metric Learning". CVPR 2019.
"""

from __future__ import annotations

import torch
from torch import Tensor

from softmine.errors import ConfigError
from softmine.losses.base import MetricLoss
from softmine.losses.pairwise import (
    References,
    check_inputs,
    full_precision,
    masked_log1p_sum_exp,
    pair_masks,
    reference_rows,
    unit_rows,
)


def multi_similarity_loss(
    embeddings: Tensor,
    labels: Tensor,
    *,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 0.5,
    epsilon: float = 0.1,
    memory: References | None = None,
) -> Tensor:
    """Multi-similarity loss with MS mining (Eq. 11 and Sec. 3.3 of the paper).

    S_ik = cos(x_i, x_k). For anchor i, mining keeps the negatives with
    S_ik + epsilon > min_{positive p} S_ip and the positives (k != i) with
    S_ik - epsilon < max_{negative} S_ik. Then
    L = 1/n sum_i [ 1/alpha log(1 + sum_{kept pos} exp(-alpha (S_ik - base)))
                  + 1/beta  log(1 + sum_{kept neg} exp( beta  (S_ik - base))) ],
    where an anchor left without a kept positive or a kept negative contributes 0
    (as in the authors' code, which divides by the batch size n). Mining is a
    selection without gradient.

    Defaults alpha = 2, beta = 50, epsilon = 0.1 are the paper's; base (lambda) = 0.5 is
    the authors' code and pytorch-metric-learning's default (the paper states 1).

    Args:
        embeddings: (n, dim) features (normalised here).
        labels: (n,) integer labels.
        alpha, beta: scales of the positive and negative terms.
        base: the similarity margin lambda.
        epsilon: mining margin.
        memory: a cross-batch memory: k then runs over the batch and the stored samples
            (:func:`~softmine.losses.pairwise.reference_rows`), i over the batch.

    Returns:
        Scalar loss in float32 (float64 for float64 input).
    """
    check_inputs(embeddings, labels)
    with full_precision(embeddings):
        x = unit_rows(embeddings)
        refs, ref_labels = reference_rows(x, labels, memory)
        sim = x @ refs.T
        n = sim.shape[0]
        same, eye = pair_masks(labels, ref_labels)
        pos = same & ~eye
        with torch.no_grad():
            min_pos = torch.where(pos, sim, torch.inf).amin(dim=1, keepdim=True)
            max_neg = torch.where(same, -torch.inf, sim).amax(dim=1, keepdim=True)
            keep_neg = ~same & (sim + epsilon > min_pos)
            keep_pos = pos & (sim - epsilon < max_neg)
            valid = keep_pos.any(dim=1) & keep_neg.any(dim=1)
        pos_term = masked_log1p_sum_exp(-alpha * (sim - base), keep_pos) / alpha
        neg_term = masked_log1p_sum_exp(beta * (sim - base), keep_neg) / beta
        return torch.where(valid, pos_term + neg_term, 0.0).sum() / max(n, 1)


class MultiSimilarityLoss(MetricLoss):
    """Module form of :func:`multi_similarity_loss` (config ``loss=multi_similarity``)."""

    takes_memory = True

    def __init__(
        self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5, epsilon: float = 0.1
    ) -> None:
        super().__init__()
        for name, value in (("alpha", alpha), ("beta", beta)):
            if not value > 0:
                raise ConfigError(f"loss.{name} must be > 0 (got {value})")
        if epsilon < 0:
            raise ConfigError(f"loss.epsilon must be >= 0 (got {epsilon}); the paper uses 0.1")
        self.alpha, self.beta, self.base, self.epsilon = alpha, beta, base, epsilon

    def forward(
        self, embeddings: Tensor, labels: Tensor, memory: References | None = None
    ) -> Tensor:
        return multi_similarity_loss(
            embeddings,
            labels,
            alpha=self.alpha,
            beta=self.beta,
            base=self.base,
            epsilon=self.epsilon,
            memory=memory,
        )
