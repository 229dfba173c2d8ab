"""Shared pieces of the pair-based losses: float32 inputs, unit-sphere distances, label masks.

Every loss in :mod:`softmine.losses` works on the (n, n) matrix of pairwise
quantities built from one Gram matrix ``x @ x.T``; no (n, n, dim) tensor is
ever formed. All of them compute in at least float32, also under autocast.

A pair loss given a cross-batch memory (:class:`References`) works on the (n, n + m)
matrix instead: the batch's rows are the anchors, the columns are the batch (detached)
followed by the m stored samples (:func:`reference_rows`, :func:`pair_masks`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-12
"""Floor of every denominator (weight sums, norms); a term whose weights sum to 0 is 0."""

TINY_SQ_DIST = 1e-12
"""Squared distances at or below this count as 0 (d < 1e-6 is rounding noise of the Gram form)."""


def check_inputs(embeddings: Tensor, labels: Tensor) -> None:
    """Raise ``ValueError`` unless ``embeddings`` is (n, dim) and ``labels`` is (n,)."""
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be (n, dim), got shape {tuple(embeddings.shape)}")
    if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"labels must be (n,) matching embeddings (n={embeddings.shape[0]}), "
            f"got shape {tuple(labels.shape)}"
        )


def full_precision(t: Tensor) -> AbstractContextManager:
    """A context that turns autocast off on ``t``'s device, so the loss runs in the dtype we choose.

    A no-op context when autocast is not on (entering autocast costs a few microseconds).
    """
    device = t.device.type
    if device in ("cpu", "cuda") and not torch.is_autocast_enabled(device):
        return nullcontext()
    return torch.autocast(device_type=device, enabled=False)


def to_float32(t: Tensor) -> Tensor:
    """``t`` in float32, or float64 if it already is (half and bfloat16 are promoted)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def common_float(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """The tensors in one floating dtype: the widest of theirs, at least float32 (None stays None).

    So float64 embeddings meet float32 class vectors (or the reverse) in float64
    rather than failing in a matmul; gradients flow back in each input's own dtype.
    """
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def unit_rows(embeddings: Tensor) -> Tensor:
    """Rows L2-normalised in at least float32 (call inside :func:`full_precision`)."""
    return F.normalize(to_float32(embeddings), dim=1, eps=EPS)


def same_label(labels: Tensor, ref_labels: Tensor | None = None) -> Tensor:
    """(n, n) bool, True where y_i == y_j, diagonal included; (n, m) against ``ref_labels``."""
    return labels[:, None] == (labels if ref_labels is None else ref_labels)[None, :]


def unit_sq_distances(x: Tensor, refs: Tensor | None = None) -> Tensor:
    """Squared distances (n, n) between unit rows: ``2 - 2 x_i . x_j``, set to 0 at or below
    :data:`TINY_SQ_DIST` (so also never negative); (n, m) to the unit rows ``refs``.

    Exact on the sphere; through the normalisation's backward its gradient equals
    that of ``||x_i - x_j||^2``. Entries on the diagonal are rounding noise (~0).
    """
    gram = x @ (x if refs is None else refs).T
    return torch.threshold(torch.rsub(gram, 2.0, alpha=2.0), TINY_SQ_DIST, 0.0)


@dataclass(frozen=True)
class References:
    """Samples of earlier batches a pair loss compares the batch with (a cross-batch memory).

    Attributes:
        embeddings: (m, dim) stored embeddings (any scale: the losses normalise them).
        labels: (m,) their labels.
        fields: per-sample values stored with them, (m,) each, named as the loss
            declares in ``memory_fields`` (OSM+CAA: ``attention``).
    """

    embeddings: Tensor
    labels: Tensor
    fields: dict[str, Tensor] = field(default_factory=dict)


def reference_rows(x: Tensor, labels: Tensor, memory: References | None) -> tuple[Tensor, Tensor]:
    """The columns of a loss's pair matrices and their labels, for the unit rows ``x``.

    Without memory: ``x`` and ``labels`` themselves (the (n, n) matrices). With memory:
    the batch, detached, then the stored samples normalised, (n + m, dim), so the pair
    matrices are (n, n + m) with the batch as anchors; column i < n is anchor i's own
    copy (:func:`pair_masks` leaves it out). The memory term's gradient reaches the
    model through the anchors only, as in the authors' code, whose memory holds a
    detached copy of the batch (Wang et al., CVPR 2020, research-xbm trainer.py).
    """
    if memory is None:
        return x, labels
    stored = F.normalize(memory.embeddings.to(x.device, x.dtype), dim=1, eps=EPS)
    ref_labels = torch.cat((labels, memory.labels.to(labels.device, labels.dtype)))
    return torch.cat((x.detach(), stored)), ref_labels


def pair_masks(labels: Tensor, ref_labels: Tensor) -> tuple[Tensor, Tensor]:
    """(same, self) for anchors ``labels`` (n,) against ``ref_labels`` (n + m,), both (n, n + m)
    bool: same label (self pairs included), and the self pairs (i, i) of the first n columns."""
    n, m = labels.shape[0], ref_labels.shape[0]
    return same_label(labels, ref_labels), torch.eye(n, m, dtype=torch.bool, device=labels.device)


def safe_sqrt(d2: Tensor) -> Tensor:
    """``sqrt(d2)``, exactly 0 (with zero gradient) where ``d2 <= TINY_SQ_DIST``, never NaN.

    Same values as ``d2.sqrt()`` of :func:`unit_sq_distances` output, with a finite gradient.
    """
    big = d2 > TINY_SQ_DIST
    return torch.where(big, d2.clamp_min(TINY_SQ_DIST).sqrt(), 0.0)


def masked_log1p_sum_exp(z: Tensor, mask: Tensor) -> Tensor:
    """Row-wise ``log(1 + sum_{j: mask_ij} exp(z_ij))``, stable, finite for empty rows (gives 0).

    Args:
        z: (n, m) logits.
        mask: (n, m) bool; entries outside the mask get no value and no gradient.
    """
    neg_inf = torch.tensor(float("-inf"), dtype=z.dtype, device=z.device)
    zm = torch.where(mask, z, neg_inf)
    m = zm.amax(dim=1, keepdim=True).clamp_min(0.0).detach()
    s = torch.exp(-m).squeeze(1) + torch.exp(zm - m).sum(dim=1)
    return m.squeeze(1) + torch.log(s)
