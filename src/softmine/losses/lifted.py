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
    References,
    check_inputs,
    full_precision,
    pair_masks,
    reference_rows,
    safe_sqrt,
    unit_rows,
    unit_sq_distances,
)


def lifted_structure_loss(
    embeddings: Tensor, labels: Tensor, *, margin: float = 1.0, memory: References | None = None
) -> Tensor:
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
        memory: a cross-batch memory: j then runs over the batch and the stored samples
            (:func:`~softmine.losses.pairwise.reference_rows`), i over the batch; a
            reference j's negatives are then the anchors of other labels (the column of
            the (n, n + m) matrix, as the row gives anchor i's), since the memory's own
            pairs are never formed. Without memory both are the batch's negatives.

    Returns:
        Scalar loss in float32 (float64 for float64 input).
    """
    check_inputs(embeddings, labels)
    with full_precision(embeddings):
        x = unit_rows(embeddings)
        refs, ref_labels = reference_rows(x, labels, memory)
        dist = safe_sqrt(unit_sq_distances(x, refs))
        same, eye = pair_masks(labels, ref_labels)
        pos = same & ~eye
        # e_i = sum over negatives of exp(-D_ik) = exp(-margin) * sum exp(margin - D_ik)
        neg_exp = torch.where(same, 0.0, torch.exp(-dist))
        e = neg_exp.sum(dim=1)
        e_ref = e if memory is None else neg_exp.sum(dim=0)
        s = e[:, None] + e_ref[None, :]
        ok = pos & (s > 0)
        j = margin + torch.log(torch.where(ok, s, 1.0)) + dist
        terms = torch.where(ok, j.clamp_min(0.0).square(), 0.0)
        return terms.sum() / (2.0 * pos.sum().clamp_min(1))


class LiftedStructureLoss(MetricLoss):
    """Module form of :func:`lifted_structure_loss` (config ``loss=lifted``)."""

    takes_memory = True

    def __init__(self, margin: float = 1.0) -> None:
        super().__init__()
        if not margin > 0:
            raise ConfigError(f"loss.margin must be > 0 (got {margin}); the paper uses 1.0")
        self.margin = margin

    def forward(
        self, embeddings: Tensor, labels: Tensor, memory: References | None = None
    ) -> Tensor:
        return lifted_structure_loss(embeddings, labels, margin=self.margin, memory=memory)
