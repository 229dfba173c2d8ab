"""Lifted structured loss.

Oh Song, Xiang, Jegelka, Savarese. "Deep Metric Learning via Lifted Structured
Feature Embedding". CVPR 2016 (Eq. 4, the smooth upper bound).
"""

from __future__ import annotations

import torch
from torch import Tensor

from softmine.errors import ConfigError
from softmine.losses.base import MetricLoss
from softmine.losses.pairwise import (
    check_inputs,
    full_precision,
    safe_sqrt,
    same_label,
    unit_rows,
    unit_sq_distances,
)


def lifted_structure_loss(embeddings: Tensor, labels: Tensor, *, margin: float = 1.0) -> Tensor:
    """Lifted structured loss of one batch.

    With D the Euclidean distance of the normalised rows and P the positive pairs,
    J_ij = log( sum_{k: y_k != y_i} exp(margin - D_ik) + sum_{l: y_l != y_j} exp(margin - D_jl) ) + D_ij,
    L = 1 / (2 |P|) sum_{(i,j) in P} max(0, J_ij)^2.
    Over ordered pairs, as here, both |P| and the sum double, so the value is the
    paper's. Since D >= 0 the exponent is at most ``margin`` and is shifted by it, so
    nothing overflows. A pair whose two samples have no negative has J = -inf
    (contributes 0); a batch without positive pairs gives 0.

    Args:
        embeddings: (n, dim) features (normalised here).
        labels: (n,) integer labels.
        margin: alpha of the paper (1.0).

    Returns:
        Scalar loss in float32 (float64 for float64 input).
    """
    check_inputs(embeddings, labels)
    with full_precision(embeddings):
        dist = safe_sqrt(unit_sq_distances(unit_rows(embeddings)))
        n = dist.shape[0]
        same = same_label(labels)
        pos = same & ~torch.eye(n, dtype=torch.bool, device=dist.device)
        # e_i = sum over negatives of exp(-D_ik) = exp(-margin) * sum exp(margin - D_ik)
        e = torch.where(same, 0.0, torch.exp(-dist)).sum(dim=1)
        s = e[:, None] + e[None, :]
        ok = pos & (s > 0)
        j = margin + torch.log(torch.where(ok, s, 1.0)) + dist
        terms = torch.where(ok, j.clamp_min(0.0).square(), 0.0)
        return terms.sum() / (2.0 * pos.sum().clamp_min(1))


class LiftedStructureLoss(MetricLoss):
    """Module form of :func:`lifted_structure_loss` (config ``loss=lifted``)."""

    def __init__(self, margin: float = 1.0) -> None:
        super().__init__()
        if not margin > 0:
            raise ConfigError(f"loss.margin must be > 0 (got {margin}); the paper uses 1.0")
        self.margin = margin

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return lifted_structure_loss(embeddings, labels, margin=self.margin)
