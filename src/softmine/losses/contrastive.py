"""Contrastive loss with binary hard mining (baseline of the OSM+CAA paper).

Loss: Hadsell, Chopra, LeCun. "Dimensionality Reduction by Learning an Invariant
Mapping". CVPR 2006. Mining: the binary hard mining that Wang et al. (AAAI 2019,
https://arxiv.org/abs/1811.01459) contrast with their soft mining: a positive pair
(i, j) is kept when it is farther apart than the closest negative of its anchor i,
a negative pair when it lies inside the margin. Every kept pair has weight 1.
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
    pair_masks,
    reference_rows,
    safe_sqrt,
    unit_rows,
    unit_sq_distances,
)


def contrastive_hard_loss(
    embeddings: Tensor,
    labels: Tensor,
    *,
    margin: float = 1.2,
    lam: float = 0.5,
    memory: References | None = None,
) -> Tensor:
    """Contrastive loss over the binary-mined pairs of one batch.

    On L2-normalised rows, over ordered pairs i != j with d_ij = ||x_i - x_j||:
    P = {(i, j): y_i = y_j, d_ij > min_{k: y_k != y_i} d_ik},  N = {(i, j): y_i != y_j, d_ij < margin},
    L = (1 - lam) * 1/2 mean_P d^2 + lam * 1/2 mean_N (margin - d)^2; an empty set gives 0.
    The mining is a selection (no gradient); an anchor without negatives keeps no positive.

    Args:
        embeddings: (n, dim) features (normalised here).
        labels: (n,) integer labels.
        margin: negatives closer than this are penalised.
        lam: weight of the negative term.
        memory: a cross-batch memory: j then runs over the batch and the stored samples
            (:func:`~softmine.losses.pairwise.reference_rows`), i over the batch.

    Returns:
        Scalar loss in float32 (float64 for float64 input).
    """
    check_inputs(embeddings, labels)
    with full_precision(embeddings):
        x = unit_rows(embeddings)
        refs, ref_labels = reference_rows(x, labels, memory)
        d2 = unit_sq_distances(x, refs)
        d = safe_sqrt(d2)
        same, eye = pair_masks(labels, ref_labels)
        hinge = (margin - d).clamp_min(0.0)
        with torch.no_grad():
            closest_neg = torch.where(same, torch.inf, d).amin(dim=1, keepdim=True)
            keep_pos = same & ~eye & (d > closest_neg)
            keep_neg = ~same & (hinge > 0)
        l_pos = 0.5 * _masked_mean(d2, keep_pos)
        l_neg = 0.5 * _masked_mean(hinge.square(), keep_neg)
        return (1.0 - lam) * l_pos + lam * l_neg


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask``; 0 (not NaN) for an empty mask."""
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp_min(1)


class ContrastiveHardLoss(MetricLoss):
    """Module form of :func:`contrastive_hard_loss` (config ``loss=contrastive_hard``)."""

    takes_memory = True

    def __init__(self, margin: float = 1.2, lam: float = 0.5) -> None:
        super().__init__()
        if not margin > 0:
            raise ConfigError(f"loss.margin must be > 0 (got {margin})")
        if not 0.0 <= lam <= 1.0:
            raise ConfigError(f"loss.lam must lie in [0, 1] (got {lam})")
        self.margin, self.lam = margin, lam

    def forward(
        self, embeddings: Tensor, labels: Tensor, memory: References | None = None
    ) -> Tensor:
        return contrastive_hard_loss(
            embeddings, labels, margin=self.margin, lam=self.lam, memory=memory
        )
