"""Online Soft Mining + Class-Aware Attention weighted contrastive loss, paper form.

Wang, Hua, Kodirov, Hu, Robertson. "Deep Metric Learning by Online Soft Mining
and Class-Aware Attention". AAAI 2019. https://arxiv.org/abs/1811.01459
(The authors' released Caffe form is :mod:`softmine.losses.osm_caa_authors`.)

For L2-normalised embeddings x_i and all ordered pairs i != j with distance
d_ij = ||x_i - x_j||:

* OSM weights: positives s_ij = exp(-d_ij^2 / sigma^2), negatives
  s_ij = max(0, margin - d_ij); all ones when OSM is off.
* CAA weights: a_ij = min(a_i, a_j) from per-sample attention a_i; ones when off.
* w_ij = s_ij * a_ij, detached by default (weights are mining scores).
* L_P = 1/2 sum_pos w d^2 / sum_pos w,  L_N = 1/2 sum_neg w max(0, margin - d)^2 / sum_neg w,
  L = (1 - lam) L_P + lam L_N.  An empty (or all-zero-weight) term is 0, never NaN.

With detached weights (the default) loss and gradient are written out by hand
(:mod:`softmine.losses.fused`); attached weights use plain autograd
(:func:`_pair_terms`); all are tested against float64 loops.

With a cross-batch memory (``memory=References``, ``loss.memory=xbm``) j runs over the
batch and the stored samples, i over the batch (plain autograd, weights detached as
asked). A stored sample keeps the attention it had when it was stored: like its
embedding, it is what the model of that step said of it (the slow drift the memory
relies on, Wang et al. CVPR 2020), and recomputing it would cost an (m, num_classes)
product per step, more than the pairs themselves on data sets with many classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from softmine.errors import ConfigError
from softmine.losses.base import MetricLoss
from softmine.losses.fused import PairSetting, apply_fused
from softmine.losses.heads import gaussian, true_class_log_prob
from softmine.losses.pairwise import (
    EPS,
    References,
    check_inputs,
    common_float,
    full_precision,
    pair_masks,
    reference_rows,
    safe_sqrt,
    same_label,
    to_float32,
    unit_rows,
    unit_sq_distances,
)

ATTENTION_MODES = ("softmax_cosine", "gaussian_prob")


def check_loss_hparams(
    margin: float | None, sigma: float | None = None, lam: float | None = None
) -> None:
    """Raise a :class:`ConfigError` naming the bad value and the fix (None: not used, not checked)."""
    if margin is not None and not margin > 0:
        raise ConfigError(f"loss.margin must be > 0 (got {margin}); the paper uses 1.2")
    if sigma is not None and not sigma > 0:
        raise ConfigError(f"loss.sigma must be > 0 (got {sigma}); the paper uses 0.8")
    if lam is not None and not 0.0 <= lam <= 1.0:
        raise ConfigError(f"loss.lam must lie in [0, 1] (got {lam}); the paper uses 0.5")


def _pair_terms(
    x: Tensor,
    same: Tensor,
    attention: Tensor | None,
    margin: float,
    sigma: float,
    lam: float,
    osm: bool,
    refs: Tensor | None = None,
    ref_attention: Tensor | None = None,
    detach: bool = False,
) -> tuple[Tensor, ...]:
    """Loss pieces of unit rows ``x``: (loss, l_pos, l_neg, w).

    Plain autograd, used when the weights stay attached (and with a memory); the
    detached default runs :class:`_FusedOSMCAA`, which must give the same values.
    ``refs``: the columns (n + m, dim) of :func:`reference_rows` (None: ``x``), with
    their attention ``ref_attention``; ``detach``: no gradient through the weights.
    """
    d2 = unit_sq_distances(x, refs)
    d = safe_sqrt(d2)
    hinge = (margin - d).clamp_min(0.0)
    if osm:
        w = torch.where(same, torch.exp(d2 * (-1.0 / (sigma * sigma))), hinge)
    else:
        w = torch.ones_like(d2)
    if attention is not None:
        cols = attention if ref_attention is None else ref_attention
        w = w * torch.minimum(attention[:, None], cols[None, :])
    w = w * (1.0 - torch.eye(*d2.shape, dtype=x.dtype, device=x.device))
    if detach:
        w = w.detach()
    w_pos = torch.where(same, w, 0.0)
    w_neg = torch.where(same, 0.0, w)
    l_pos = 0.5 * _ratio((w_pos * d2).sum(), w_pos.sum())
    l_neg = 0.5 * _ratio((w_neg * hinge.square()).sum(), w_neg.sum())
    loss = (1.0 - lam) * l_pos + lam * l_neg
    return loss, l_pos, l_neg, w


def _memory_pairs(
    x: Tensor,
    labels: Tensor,
    attention: Tensor | None,
    memory: References,
    margin: float,
    sigma: float,
    lam: float,
    osm: bool,
    detach: bool,
) -> tuple[Tensor, ...]:
    """:func:`_pair_terms` of the batch ``x`` against the batch and ``memory``; a stored sample's
    attention is the one stored with it (``memory.fields["attention"]``)."""
    refs, ref_labels = reference_rows(x, labels, memory)
    same, _ = pair_masks(labels, ref_labels)
    ref_attention = None
    if attention is not None:
        if "attention" not in memory.fields:
            raise ValueError("with attention, the memory must hold its samples' attention")
        stored = memory.fields["attention"].to(attention.device, attention.dtype)
        ref_attention = torch.cat((attention.detach(), stored))
        if detach:
            attention = attention.detach()
    return _pair_terms(x, same, attention, margin, sigma, lam, osm, refs, ref_attention, detach)


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den, and 0 (with zero gradient, not a huge one) where den == 0."""
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, 1.0), 0.0)


def weighted_contrastive_loss(
    embeddings: Tensor,
    labels: Tensor,
    attention: Tensor | None = None,
    *,
    margin: float = 1.2,
    sigma: float = 0.8,
    lam: float = 0.5,
    osm: bool = True,
    detach_weights: bool = True,
    return_details: bool = False,
    memory: References | None = None,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """OSM (+ optional CAA) weighted contrastive loss of one mini-batch (paper form, Eq. 1-6).

    Args:
        embeddings: (n, dim) features; L2-normalised here, so any scale works.
        labels: (n,) integer class labels.
        attention: per-sample class-aware attention a_i, shape (n,), or None for no CAA.
            Pair attention is min(a_i, a_j).
        margin: alpha, the negative margin on the unit sphere (0 < margin <= 2 is meaningful).
        sigma: OSM Gaussian width for positives, exp(-d^2 / sigma^2).
        lam: lambda, weight of the negative term; the positive term gets 1 - lam.
        osm: soft-mine pairs; False gives every pair weight 1 (plain contrastive).
        detach_weights: no gradient through the weights (OSM scores and attention),
            as mining scores in the paper; False lets it flow through both.
        return_details: also return ``{"l_pos", "l_neg", "weights"}`` (weights: (n, n)
            w_ij, 0 on the diagonal), all detached.
        memory: a cross-batch memory: j then runs over the batch and the stored samples
            (:func:`~softmine.losses.pairwise.reference_rows`), whose attention is
            ``memory.fields["attention"]`` when ``attention`` is given; weights (n, n + m).

    Returns:
        The scalar loss, computed in float32 (float64 for float64 input), also under autocast.
    """
    check_inputs(embeddings, labels)
    n = embeddings.shape[0]
    if attention is not None and attention.shape != (n,):
        raise ValueError(f"attention must have shape ({n},), got {tuple(attention.shape)}")
    with full_precision(embeddings):
        if memory is not None:
            a = None if attention is None else to_float32(attention)
            loss, l_pos, l_neg, w = _memory_pairs(
                unit_rows(embeddings), labels, a, memory, margin, sigma, lam, osm, detach_weights
            )
        elif detach_weights:
            a = None if attention is None else to_float32(attention.detach())
            e = to_float32(embeddings)
            setting = PairSetting(margin, sigma, lam, osm)
            loss, means, _, _, w = apply_fused(
                False, e, None, a, labels, setting, torch.is_grad_enabled()
            )
            l_pos, l_neg = means
        else:
            a = None if attention is None else to_float32(attention)
            x = unit_rows(embeddings)
            loss, l_pos, l_neg, w = _pair_terms(x, same_label(labels), a, margin, sigma, lam, osm)
    if return_details:
        return loss, {"l_pos": l_pos.detach(), "l_neg": l_neg.detach(), "weights": w.detach()}
    return loss


def class_logits(
    embeddings: Tensor,
    class_vectors: Tensor,
    *,
    mode: str = "softmax_cosine",
    scale: float = 1.0,
    bias: Tensor | None = None,
) -> Tensor:
    """Classifier logits (n, num_classes) in at least float32.

    ``softmax_cosine`` (paper): scale * cos(f_i, c_k). ``gaussian_prob`` (authors'
    code): the plain linear layer f_i . W_k + b_k.
    """
    if mode not in ATTENTION_MODES:
        raise ConfigError(f"unknown attention mode {mode!r}; choose one of {ATTENTION_MODES}")
    with full_precision(embeddings):
        e, w, b = common_float(embeddings, class_vectors, bias)
        if mode == "softmax_cosine":
            return _cosine_logits(unit_rows(e), w, scale)
        return F.linear(e, w, b)


def _cosine_logits(x: Tensor, class_vectors: Tensor, scale: float) -> Tensor:
    logits = x @ F.normalize(class_vectors, dim=1, eps=EPS).T
    return logits if scale == 1.0 else logits * scale


def caa_attention(
    embeddings: Tensor,
    labels: Tensor,
    class_vectors: Tensor,
    *,
    mode: str = "softmax_cosine",
    scale: float = 1.0,
    bias: Tensor | None = None,
    gaussian_sigma: float = 0.68,
) -> Tensor:
    """Per-sample class-aware attention a_i, shape (n,), in [0, 1].

    Modes:
        ``softmax_cosine`` (paper): a_i = softmax_k(scale * x_i . c_k)[y_i] with x and the
            class vectors c_k L2-normalised.
        ``gaussian_prob`` (authors' released code): p_i = softmax_k(f_i . W_k + b_k)[y_i]
            from a plain linear classifier, a_i = exp(-(p_i - 1)^2 / (2 gaussian_sigma^2)).
    """
    check_inputs(embeddings, labels)
    if class_vectors.dim() != 2 or class_vectors.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"class_vectors must be (num_classes, {embeddings.shape[1]}), "
            f"got {tuple(class_vectors.shape)}"
        )
    logits = class_logits(embeddings, class_vectors, mode=mode, scale=scale, bias=bias)
    p = true_class_log_prob(logits, labels).exp()
    if mode == "softmax_cosine":
        return p
    return gaussian(p, 1.0, gaussian_sigma)


class OSMCAALoss(MetricLoss):
    """OSM + CAA loss, paper form, owning its class vectors; returns the total training loss.

    total = weighted_contrastive_loss(x, y, a) + ce_weight * CE(scale * cos(x, c), y),
    with a_i = softmax_k(scale * cos(x_i, c_k))[y_i] when ``caa`` is on.

    The cross-entropy term trains the class vectors, since the (detached) attention
    alone gives them no gradient. Logits and attention come from one log-softmax.

    Args:
        num_classes: number of training classes (labels must be 0..num_classes-1).
        embedding_dim: dimension of the embeddings.
        margin, sigma, lam: see :func:`weighted_contrastive_loss`.
        osm: soft mining on/off.  caa: class-aware attention on/off.
        ce_weight: weight of the classifier cross-entropy; 0 skips it (and, with CAA
            off, the classifier entirely). CAA with detached weights needs it > 0.
        scale: multiplies the cosine logits (1 in the paper).
        detach_weights: stop gradients through OSM/CAA weights.
        compile: run the fused (detached-weight) computation through ``torch.compile``,
            which fuses its elementwise work: about 1.0x instead of 1.3x the time of a
            plain contrastive loss at n = 56 on one CPU thread (``scripts/bench/loss.py``).
            The first call compiles (about 15 s on a CPU with an empty compiler cache;
            needs a C++ compiler there, Triton on a GPU); if compiling fails the loss
            warns once and runs eagerly.
    """

    returns_details = True
    classification_term = "ce_weight"  # + ce_weight * CE over the class vectors
    takes_memory = True

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        *,
        margin: float = 1.2,
        sigma: float = 0.8,
        lam: float = 0.5,
        osm: bool = True,
        caa: bool = True,
        ce_weight: float = 1.0,
        scale: float = 1.0,
        detach_weights: bool = True,
        compile: bool = False,
    ) -> None:
        super().__init__()
        check_loss_hparams(margin, sigma, lam)
        _check_sizes(num_classes, embedding_dim)
        if ce_weight < 0:
            raise ConfigError(f"loss.ce_weight must be >= 0 (got {ce_weight})")
        if caa and ce_weight == 0 and detach_weights:
            raise ConfigError(
                "loss.caa=true with detached weights needs loss.ce_weight > 0: the "
                "cross-entropy is what trains the class vectors the attention is read from"
            )
        if not scale > 0:
            raise ConfigError(f"loss.scale must be > 0 (got {scale}); the paper uses 1")
        if compile and not detach_weights:
            raise ConfigError(
                "loss.compile=true compiles the fused form, which needs detached weights: "
                "set loss.detach_weights=true or loss.compile=false"
            )
        self.margin, self.sigma, self.lam = margin, sigma, lam
        self.osm, self.caa = osm, caa
        self.ce_weight, self.scale = ce_weight, scale
        self.detach_weights = detach_weights
        self.compile = compile
        self.class_vectors = nn.Parameter(torch.randn(num_classes, embedding_dim) * 0.01)
        # the memory stores each sample's attention with its embedding (see the module doc)
        self.memory_fields = ("attention",) if caa else ()

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        return_details: bool = False,
        memory: References | None = None,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Total loss of a batch; with ``return_details`` also ``{l_pos, l_neg, ce, attention, weights}``.

        ``attention`` is present only when CAA is on, ``ce`` only when ce_weight > 0.
        With ``memory``: the memory term, the pair loss of the batch against the batch and
        the stored samples (attention from the class vectors for the batch, stored for the
        memory); no cross-entropy, which the batch term holds once.
        """
        check_inputs(embeddings, labels)
        labels = labels.long()
        with full_precision(embeddings):
            e, vectors = common_float(embeddings, self.class_vectors)
            if memory is not None:
                return self._memory_term(e, vectors, labels, memory)
            if self.detach_weights:
                setting = PairSetting(
                    self.margin,
                    self.sigma,
                    self.lam,
                    self.osm,
                    self.caa,
                    self.ce_weight,
                    self.scale,
                )
                loss, means, ce, attention, w = apply_fused(
                    self.compile,
                    e,
                    vectors if self.ce_weight > 0 else None,
                    None,
                    labels,
                    setting,
                    torch.is_grad_enabled(),
                )
                if not return_details:
                    return loss
                l_pos, l_neg = means
            else:
                loss, l_pos, l_neg, ce, attention, w = self._attached(e, vectors, labels)
        if not return_details:
            return loss
        details = {"l_pos": l_pos.detach(), "l_neg": l_neg.detach(), "weights": w.detach()}
        if ce is not None:
            details["ce"] = ce.detach()
        if attention is not None:
            details["attention"] = attention.detach()
        return loss, details

    def _memory_term(
        self, e: Tensor, vectors: Tensor, labels: Tensor, memory: References
    ) -> Tensor:
        """The pair loss of the batch against the batch and ``memory`` (see :meth:`forward`)."""
        x = unit_rows(e)
        attention = None
        if self.caa:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.detach_weights):
                logits = _cosine_logits(x, vectors, self.scale)
                attention = true_class_log_prob(logits, labels).exp()
        args = (self.margin, self.sigma, self.lam, self.osm, self.detach_weights)
        return _memory_pairs(x, labels, attention, memory, *args)[0]

    def _attached(self, e: Tensor, vectors: Tensor, labels: Tensor) -> tuple[Tensor | None, ...]:
        """Plain-autograd form: gradients also flow through the OSM weights and the attention."""
        x = unit_rows(e)
        attention = ce = None
        if self.caa or self.ce_weight > 0:
            log_p = true_class_log_prob(_cosine_logits(x, vectors, self.scale), labels)
            if self.ce_weight > 0:
                ce = -log_p.mean()
            if self.caa:
                attention = log_p.exp()
        loss, l_pos, l_neg, w = _pair_terms(
            x, same_label(labels), attention, self.margin, self.sigma, self.lam, self.osm
        )
        if ce is not None:
            loss = loss + self.ce_weight * ce
        return loss, l_pos, l_neg, ce, attention, w


def _check_sizes(num_classes: int | None, embedding_dim: int | None) -> None:
    if num_classes is None or int(num_classes) < 1:
        raise ConfigError(f"loss.num_classes must be >= 1 (got {num_classes})")
    if embedding_dim is None or int(embedding_dim) < 1:
        raise ConfigError(f"loss.embedding_dim must be >= 1 (got {embedding_dim})")
