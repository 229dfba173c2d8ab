"""Triplet losses with semi-hard and batch-hard mining inside the mini-batch.

* Semi-hard: Schroff, Kalenichenko, Philbin. "FaceNet: A Unified Embedding for
  Face Recognition and Clustering". CVPR 2015.
* Batch-hard: Hermans, Beyer, Leibe. "In Defense of the Triplet Loss for Person
  Re-Identification". arXiv:1703.07737, 2017.

Both work on the (n, n) distance matrix of the L2-normalised batch; the
semi-hard negative of every (anchor, positive) pair is found with one row-wise
sort and a batched binary search, so no (n, n, n) tensor is formed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


def _distances(
    embeddings: Tensor, labels: Tensor, memory: References | None, squared: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Distances (n, n + m) of the batch to the references, and :func:`pair_masks`' (same, self)."""
    x = unit_rows(embeddings)
    refs, ref_labels = reference_rows(x, labels, memory)
    d2 = unit_sq_distances(x, refs)
    return (d2 if squared else safe_sqrt(d2)), *pair_masks(labels, ref_labels)


def triplet_semihard_loss(
    embeddings: Tensor,
    labels: Tensor,
    *,
    margin: float = 0.2,
    squared: bool = True,
    memory: References | None = None,
) -> Tensor:
    """Triplet loss with online semi-hard negatives (FaceNet), averaged over positive pairs.

    For every ordered positive pair (a, p), a != p, whose anchor has a negative, the
    negative is the closest one farther than the positive, argmin {D_an : D_an > D_ap};
    if no negative is farther, the farthest negative max_n D_an (the rule of TensorFlow's
    ``triplet_semihard_loss``). Loss = mean over those pairs of max(0, D_ap - D_an + margin).
    D is the squared Euclidean distance of the normalised rows (FaceNet), or the
    distance itself with ``squared=False``. A batch without such a pair gives 0.

    Args:
        embeddings: (n, dim) features (normalised here).
        labels: (n,) integer labels.
        margin: alpha of FaceNet (0.2 there, with squared distances).
        squared: use squared distances.
        memory: a cross-batch memory: positives and negatives then come from the batch
            and the stored samples (:func:`~softmine.losses.pairwise.reference_rows`).

    Returns:
        Scalar loss in float32 (float64 for float64 input).
    """
    check_inputs(embeddings, labels)
    with full_precision(embeddings):
        dist, same, eye = _distances(embeddings, labels, memory, squared)
        cols = dist.shape[1]
        neg_sorted, _ = torch.where(same, torch.inf, dist).sort(dim=1)
        num_neg = (~same).sum(dim=1, keepdim=True)
        with torch.no_grad():
            first_farther = torch.searchsorted(neg_sorted.detach(), dist.detach(), right=True)
        has_farther = first_farther < num_neg
        farther = neg_sorted.gather(1, first_farther.clamp_max(cols - 1))
        farthest = neg_sorted.gather(1, (num_neg - 1).clamp_min(0)).expand_as(dist)
        d_an = torch.where(has_farther, farther, farthest)
        valid = same & ~eye & (num_neg > 0)
        losses = torch.where(valid, (dist - d_an + margin).clamp_min(0.0), 0.0)
        return losses.sum() / valid.sum().clamp_min(1)


def triplet_batchhard_loss(
    embeddings: Tensor,
    labels: Tensor,
    *,
    margin: float = 0.2,
    soft: bool = False,
    memory: References | None = None,
) -> Tensor:
    """Batch-hard triplet loss: per anchor, its farthest positive against its closest negative.

    L = mean over anchors a that have a positive and a negative of
    max(0, margin + max_p D_ap - min_n D_an)  (or softplus(max_p D_ap - min_n D_an) with
    ``soft``), with D the Euclidean distance of the normalised rows. 0 if no anchor qualifies.

    Args:
        embeddings: (n, dim) features (normalised here).
        labels: (n,) integer labels.
        margin: hinge margin (ignored with ``soft``).
        soft: the soft-margin variant of Hermans et al.
        memory: a cross-batch memory: positives and negatives then come from the batch
            and the stored samples (:func:`~softmine.losses.pairwise.reference_rows`).

    Returns:
        Scalar loss in float32 (float64 for float64 input).
    """
    check_inputs(embeddings, labels)
    with full_precision(embeddings):
        dist, same, eye = _distances(embeddings, labels, memory, squared=False)
        pos = same & ~eye
        hardest_pos = torch.where(pos, dist, -torch.inf).amax(dim=1)
        hardest_neg = torch.where(same, torch.inf, dist).amin(dim=1)
        valid = pos.any(dim=1) & ~same.all(dim=1)
        gap = torch.where(valid, hardest_pos - hardest_neg, 0.0)
        per_anchor = F.softplus(gap) if soft else (gap + margin).clamp_min(0.0)
        return torch.where(valid, per_anchor, 0.0).sum() / valid.sum().clamp_min(1)


class TripletSemiHardLoss(MetricLoss):
    """Module form of :func:`triplet_semihard_loss` (config ``loss=triplet_semihard``)."""

    takes_memory = True

    def __init__(self, margin: float = 0.2, squared: bool = True) -> None:
        super().__init__()
        if not margin > 0:
            raise ConfigError(f"loss.margin must be > 0 (got {margin}); FaceNet uses 0.2")
        self.margin, self.squared = margin, squared

    def forward(
        self, embeddings: Tensor, labels: Tensor, memory: References | None = None
    ) -> Tensor:
        return triplet_semihard_loss(
            embeddings, labels, margin=self.margin, squared=self.squared, memory=memory
        )


class TripletBatchHardLoss(MetricLoss):
    """Module form of :func:`triplet_batchhard_loss` (config ``loss=triplet_batchhard``)."""

    takes_memory = True

    def __init__(self, margin: float = 0.2, soft: bool = False) -> None:
        super().__init__()
        if not soft and not margin > 0:
            raise ConfigError(f"loss.margin must be > 0 (got {margin}), or set loss.soft=true")
        self.margin, self.soft = margin, soft

    def forward(
        self, embeddings: Tensor, labels: Tensor, memory: References | None = None
    ) -> Tensor:
        return triplet_batchhard_loss(
            embeddings, labels, margin=self.margin, soft=self.soft, memory=memory
        )
