"""Circle loss, the form with pair-wise labels on a batch.

Sun, Cheng, Zhang, Zhang, Zheng, Wang, Wei. "Circle Loss: A Unified Perspective of Pair
Similarity Optimization". CVPR 2020 (Eq. 6 with the margins of Eq. 8).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from softmine.errors import ConfigError
from softmine.losses.base import MetricLoss
from softmine.losses.pairwise import check_inputs, full_precision, same_label, unit_rows


def _masked_logsumexp(z: Tensor, mask: Tensor, rows: Tensor) -> Tensor:
    """Row-wise log sum_{j: mask_ij} exp(z_ij) for the ``rows`` that have an entry; 0 elsewhere."""
    z = torch.where(mask, z, -torch.inf)
    z = torch.where(rows[:, None], z, 0.0)  # an empty row would give -inf and a NaN gradient
    return torch.where(rows, torch.logsumexp(z, dim=1), 0.0)


def circle_loss(
    embeddings: Tensor, labels: Tensor, *, m: float = 0.4, gamma: float = 80.0
) -> Tensor:
    """Circle loss of one batch, each sample an anchor against the rest of the batch.

    With s_ij = cos(x_i, x_j), for anchor i its positives P_i = {j != i: y_j = y_i} and
    negatives N_i = {j: y_j != y_i} (Eq. 6 of the paper, with Eq. 8's O_p = 1 + m,
    O_n = -m, Delta_p = 1 - m, Delta_n = m):

    L_i = log(1 + sum_{j in N_i} exp(gamma a_n (s_ij - m)) * sum_{j in P_i} exp(-gamma a_p (s_ij - 1 + m))),
    a_p = max(0, 1 + m - s_ij),  a_n = max(0, s_ij + m),

    L = mean of L_i over the anchors with at least one positive and one negative (0 if
    none). The weights a_p, a_n are not differentiated (detached), as in the authors'
    released code and pytorch-metric-learning's ``CircleLoss``, which this equals.

    Args:
        embeddings: (n, dim) features (normalised here).
        labels: (n,) integer labels.
        m: relaxation margin (0.4 for fine-grained image retrieval in the paper's experiments, Sec. 4;
            0.25 for face recognition and re-identification).
        gamma: scale (80 for fine-grained image retrieval, Sec. 4; 256 faces, 128 re-id).

    Returns:
        Scalar loss in float32 (float64 for float64 input).
    """
    check_inputs(embeddings, labels)
    with full_precision(embeddings):
        x = unit_rows(embeddings)
        sim = x @ x.T
        same = same_label(labels)
        pos = same & ~torch.eye(len(x), dtype=torch.bool, device=x.device)
        neg = ~same
        a_p = (1.0 + m - sim.detach()).clamp_min(0.0)
        a_n = (sim.detach() + m).clamp_min(0.0)
        valid = pos.any(dim=1) & neg.any(dim=1)
        lse_p = _masked_logsumexp(-gamma * a_p * (sim - (1.0 - m)), pos, valid)
        lse_n = _masked_logsumexp(gamma * a_n * (sim - m), neg, valid)
        per_anchor = torch.where(valid, F.softplus(lse_p + lse_n), 0.0)
        return per_anchor.sum() / valid.sum().clamp_min(1)


class CircleLoss(MetricLoss):
    """Module form of :func:`circle_loss` (config ``loss=circle``).

    Args:
        m: relaxation margin (0.4, the paper's fine-grained retrieval setting).
        gamma: scale (80, the same setting).
    """

    def __init__(self, m: float = 0.4, gamma: float = 80.0) -> None:
        super().__init__()
        if not 0.0 <= m < 1.0:
            raise ConfigError(f"loss.m must lie in [0, 1) (got {m}); the paper uses 0.25 or 0.4")
        if not gamma > 0:
            raise ConfigError(f"loss.gamma must be > 0 (got {gamma}); the paper uses 80 to 256")
        self.m, self.gamma = float(m), float(gamma)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return circle_loss(embeddings, labels, m=self.m, gamma=self.gamma)
