"""Online Soft Mining + Class-Aware Attention weighted contrastive loss, paper and released forms.

Wang, Hua, Kodirov, Hu, Robertson. "Deep Metric Learning by Online Soft Mining
and Class-Aware Attention". AAAI 2019. https://arxiv.org/abs/1811.01459
Authors' Caffe code: https://github.com/XinshaoAmosWang/OSM_CAA_WeightedContrastiveLoss

For L2-normalised embeddings x_i and all ordered pairs i != j with distance
d_ij = ||x_i - x_j||:

* OSM weights: positives s_ij = exp(-d_ij^2 / sigma^2), negatives
  s_ij = max(0, margin - d_ij); all ones when OSM is off.
* CAA weights: a_ij = min(a_i, a_j) from per-sample attention a_i; ones when off.
* w_ij = s_ij * a_ij, detached by default (weights are mining scores).
* L_P = 1/2 sum_pos w d^2 / sum_pos w,  L_N = 1/2 sum_neg w max(0, margin - d)^2 / sum_neg w,
  L = (1 - lam) L_P + lam L_N.  An empty (or all-zero-weight) term is 0, never NaN.

With detached weights (the default) loss and gradient are written out by hand
(:class:`_FusedOSMCAA`): one matmul gives the Gram matrix and the class logits,
the gradient is one more matmul (plus one for the class vectors), formed during
the forward pass, and no autograd graph is built for the (n, n) intermediates.
``compile=True`` runs that computation through torch.compile. Attached weights
use plain autograd (:func:`_pair_terms`); all are tested against float64 loops.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from softmine.errors import ConfigError
from softmine.losses.pairwise import (
    EPS,
    TINY_SQ_DIST,
    check_inputs,
    common_float,
    full_precision,
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
) -> tuple[Tensor, ...]:
    """Loss pieces of unit rows ``x``: (loss, l_pos, l_neg, w).

    Plain autograd, used when the weights stay attached; the detached default runs
    :class:`_FusedOSMCAA`, which must give the same values.
    """
    d2 = unit_sq_distances(x)
    d = safe_sqrt(d2)
    hinge = (margin - d).clamp_min(0.0)
    if osm:
        w = torch.where(same, torch.exp(d2 * (-1.0 / (sigma * sigma))), hinge)
    else:
        w = torch.ones_like(d2)
    if attention is not None:
        w = w * torch.minimum(attention[:, None], attention[None, :])
    w = w * (1.0 - torch.eye(x.shape[0], dtype=x.dtype, device=x.device))
    w_pos = torch.where(same, w, 0.0)
    w_neg = torch.where(same, 0.0, w)
    l_pos = 0.5 * _ratio((w_pos * d2).sum(), w_pos.sum())
    l_neg = 0.5 * _ratio((w_neg * hinge.square()).sum(), w_neg.sum())
    loss = (1.0 - lam) * l_pos + lam * l_neg
    return loss, l_pos, l_neg, w


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den, and 0 (with zero gradient, not a huge one) where den == 0."""
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, 1.0), 0.0)


@dataclass(frozen=True)
class _Setting:
    """Hyperparameters of one call of :class:`_FusedOSMCAA`."""

    margin: float
    sigma: float
    lam: float
    osm: bool
    caa: bool = False
    ce_weight: float = 0.0
    scale: float = 1.0


@functools.lru_cache(maxsize=64)
def _constant(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small constant tensor, built once per (values, dtype, device); never written to."""
    return torch.tensor(values, dtype=dtype, device=device)


def _fused_terms(
    emb: Tensor,
    class_vectors: Tensor | None,
    attention: Tensor | None,
    labels: Tensor,
    cfg: _Setting,
    consts: Tensor,
    want_grad: bool,
    want_grad_c: bool,
) -> tuple[Tensor | None, ...]:
    """The computation of :class:`_FusedOSMCAA`, as a plain function (so it can be compiled).

    ``consts`` = (1 - lam, lam, -2 (1 - lam), 2 lam). Returns loss, (l_pos, l_neg), ce,
    attention, w, and the gradients to ``emb`` and ``class_vectors`` (None unless wanted).
    """
    n = emb.shape[0]
    z = emb if class_vectors is None else torch.cat((emb, class_vectors))
    cos = emb @ z.T  # (n, n + k) raw products, made cosines in place
    inv = torch.linalg.vector_norm(z, dim=1).clamp_min_(EPS).reciprocal_()  # 1 / |z_j|
    inv_rows = inv[:n, None]
    cos.mul_(inv_rows).mul_(inv)
    lab = labels[:, None]
    log_p = p_y = ce = None
    if class_vectors is not None:
        logits = cos[:, n:] if cfg.scale == 1.0 else cos[:, n:] * cfg.scale
        log_p = logits.log_softmax(dim=1)
        ce = F.nll_loss(log_p, labels)
        p_y = log_p.gather(1, lab).exp_()
        if cfg.caa:
            attention = p_y.view(n)

    same = lab == labels
    d2 = torch.threshold_(torch.rsub(cos[:, :n], 2.0, alpha=2.0), TINY_SQ_DIST, 0.0)
    d = d2.sqrt()
    hinge = torch.rsub(d, cfg.margin).clamp_min_(0.0)
    if cfg.osm:
        w = d2.mul(-1.0 / (cfg.sigma * cfg.sigma)).exp_()
        torch.where(same, w, hinge, out=w)
    else:
        w = torch.ones_like(d2)
    if attention is not None:
        w.mul_(torch.minimum(attention[:, None], attention))
    w.fill_diagonal_(0.0)
    w_pos = torch.where(same, w, 0.0)
    w_neg = w - w_pos
    s_pos, s_neg = w_pos.sum(), w_neg.sum()
    wh_neg = w_neg.mul_(hinge)  # w h on negatives, reused by the gradient
    sums = torch.stack(
        (
            torch.vdot(w_pos.view(-1), d2.view(-1)),
            torch.vdot(wh_neg.view(-1), hinge.view(-1)),
            s_pos,
            s_neg,
        )
    )
    inv_s = sums[2:].clamp_min_(EPS).reciprocal_()  # (1 / S_P, 1 / S_N)
    means = sums[:2].mul_(inv_s).mul_(0.5)  # (l_pos, l_neg)
    loss = torch.vdot(means, consts[:2])
    if ce is not None:
        loss = loss.add_(ce, alpha=cfg.ce_weight)

    grad_e = grad_c = None
    if want_grad:
        # pair block of A: -2 (1-lam) w / S_P on positives, 2 lam w h / (d S_N) on negatives
        coef = inv_s * consts[2:]
        whd_neg = wh_neg.div_(d).nan_to_num_(0.0, 0.0, 0.0)  # w h / d, 0 where d = 0
        a = w_pos.mul_(coef[0]).addcmul_(whd_neg, coef[1])
        if log_p is not None:  # class block: G = ce_weight * scale * (softmax - onehot) / n
            g = log_p.exp_().scatter_(1, lab, p_y - 1.0).mul_(cfg.ce_weight * cfg.scale / n)
            # (c_k . dL/dc_k) / |C_k|^2, for the class vectors' normalisation backward
            c_dot = torch.linalg.vecdot(g, cos[:, n:], dim=0).mul_(inv[n:].square())
            a = torch.cat((a, g), dim=1)
        # x_i . dL/dx_i = sum_j a_ij cos_ij; a_ii = 0 (w_ii = 0), so the projection
        # -x_i (x_i . dL/dx_i) becomes a_ii; then 1/|E_i| on rows, 1/|z_j| on columns
        a.diagonal().sub_(torch.linalg.vecdot(a, cos))
        a.mul_(inv_rows).mul_(inv)
        grad_e = a @ z
        if log_p is not None and want_grad_c:
            g = a[:, n:]  # scaled like the rest of a: G_ik / (|E_i| |C_k|)
            grad_c = torch.mm(g.T, emb).addcmul_(class_vectors, c_dot[:, None], value=-1.0)
    return loss, means, ce, attention, w, grad_e, grad_c


class _FusedOSMCAA(torch.autograd.Function):
    """Detached-weight OSM(+CAA)(+CE) loss of raw embeddings, forward and gradient by hand.

    Inputs: embeddings E (n, dim); class vectors C (K, dim) or None (no classifier);
    attention (n,) or None (used when there is no classifier to read it from);
    labels (n,); a :class:`_Setting`; ``want_grad`` (False under ``torch.no_grad``,
    where no gradient work is done); the kernel, :func:`_fused_terms` or a compiled copy.

    Forward: one matmul E @ [E; C]^T gives the raw Gram matrix and class scores;
    scaling its rows by 1/|E_i| and its columns by [1/|E|; 1/|C|] gives the cosines
    (Gram matrix of the unit rows x, and the cosine logits) without normalising an
    (n, dim) or (K, dim) tensor. The pair loss, the CE and the attention follow
    elementwise on (n, n + K).

    Gradient, formed in the forward pass while its inputs are in cache (the backward
    only multiplies it by the incoming scalar): with the weights w fixed,
    dL/dd2_ij = (1-lam)/(2 S_P) w_ij on positives and -lam/(2 S_N) w_ij h_ij / d_ij on
    negatives (h = max(0, margin - d); 0 where d = 0), and d2_ij = 2 - 2 x_i . x_j, so
    dL/dx = A [x; c] with A = [-4 M, G] (M symmetric, G = ce_weight * scale *
    (softmax - onehot) / n) and dL/dc = G^T x. The normalisation backward
    dL/dE_i = (g_i - x_i (x_i . g_i)) / |E_i| needs x_i . g_i = sum_j A_ij cos_ij, an
    (n, n + K) product, so it folds into A (its diagonal, then the same row and column
    scales) and the whole embedding gradient is one matmul A' @ [E; C]. The class
    vectors get dL/dC = A'_c^T E - (c . g) / |C|^2 * C: one matmul and one fused update.

    Outputs: loss and, without gradient, (l_pos, l_neg) as one (2,) tensor, ce (or
    None), attention (or None), w (n, n).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        emb: Tensor,
        class_vectors: Tensor | None,
        attention: Tensor | None,
        labels: Tensor,
        cfg: _Setting,
        want_grad: bool,
        kernel: Callable[..., tuple[Tensor | None, ...]],
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor]:
        ctx.set_materialize_grads(False)  # no zero-filled grads for the logging outputs
        need_e, need_c = ctx.needs_input_grad[:2]
        consts = _constant(
            (1.0 - cfg.lam, cfg.lam, -2.0 * (1.0 - cfg.lam), 2.0 * cfg.lam), emb.dtype, emb.device
        )
        grad = want_grad and (need_e or need_c)
        loss, means, ce, attention, w, grad_e, grad_c = kernel(
            emb, class_vectors, attention, labels, cfg, consts, grad, grad and need_c
        )
        ctx.has_grad_c = grad_c is not None
        if grad_e is not None:
            ctx.save_for_backward(*(t for t in (grad_e, grad_c) if t is not None))
        ctx.mark_non_differentiable(*(t for t in (means, ce, attention, w) if t is not None))
        return loss, means, ce, attention, w

    @staticmethod
    def backward(ctx, g_loss: Tensor | None, *_: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if torch.is_grad_enabled():  # create_graph=True: the saved gradient has no graph
            raise RuntimeError(
                "the OSM loss with detached weights gives first derivatives only; "
                "for create_graph=True use detach_weights=False (plain autograd)"
            )
        if g_loss is None:  # only the (non-differentiable) logging outputs were used
            return (None,) * 7
        saved = ctx.saved_tensors
        grad_e = saved[0] * g_loss
        grad_c = saved[1] * g_loss if ctx.has_grad_c else None
        return grad_e, grad_c, None, None, None, None, None


_COMPILE_FAILED: list[str] = []
"""Set (to the error) once torch.compile failed in this process; later calls run eagerly."""


@functools.cache
def _compiled_kernel() -> Callable[..., tuple[Tensor | None, ...]]:
    """:func:`_fused_terms` through ``torch.compile`` (built once per process, lazily)."""
    return torch.compile(_fused_terms)


def _apply_fused(
    compile: bool, *args: object
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor]:
    """``_FusedOSMCAA.apply(*args)``; with ``compile`` through the compiled kernel.

    If torch.compile cannot compile (no C++ compiler on a CPU machine, no Triton on a
    GPU one, a Python version Dynamo does not support) the loss warns once and runs
    eagerly: same values, eager speed. Errors of the computation itself propagate.
    """
    if compile and not _COMPILE_FAILED:
        from torch._dynamo.exc import TorchDynamoException

        try:
            kernel = _compiled_kernel()
        except RuntimeError as err:  # torch.compile unavailable in this interpreter
            _fall_back_to_eager(err)
        else:
            try:
                return _FusedOSMCAA.apply(*args, kernel)
            except TorchDynamoException as err:  # tracing or code generation failed
                _fall_back_to_eager(err)
    return _FusedOSMCAA.apply(*args, _fused_terms)


def _fall_back_to_eager(err: Exception) -> None:
    _COMPILE_FAILED.append(f"{type(err).__name__}: {err}")
    warnings.warn(
        "loss.compile=true: torch.compile failed, so the loss runs eagerly "
        f"(same values, eager speed); set loss.compile=false to silence this. {err}",
        RuntimeWarning,
        stacklevel=4,
    )


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

    Returns:
        The scalar loss, computed in float32 (float64 for float64 input), also under autocast.
    """
    check_inputs(embeddings, labels)
    n = embeddings.shape[0]
    if attention is not None and attention.shape != (n,):
        raise ValueError(f"attention must have shape ({n},), got {tuple(attention.shape)}")
    with full_precision(embeddings):
        if detach_weights:
            a = None if attention is None else to_float32(attention.detach())
            e = to_float32(embeddings)
            setting = _Setting(margin, sigma, lam, osm)
            loss, means, _, _, w = _apply_fused(
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


def gaussian(t: Tensor, mean: float, sigma: float) -> Tensor:
    """exp(-(t - mean)^2 / (2 sigma^2)), the unnormalised Gaussian of the authors' Caffe layers."""
    return torch.exp((t - mean).square() * (-0.5 / (sigma * sigma)))


def true_class_log_prob(logits: Tensor, labels: Tensor) -> Tensor:
    """log softmax(logits)[i, y_i], shape (n,)."""
    return logits.log_softmax(dim=1).gather(1, labels.long()[:, None]).squeeze(1)


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


class OSMCAALoss(nn.Module):
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

    def forward(
        self, embeddings: Tensor, labels: Tensor, return_details: bool = False
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Total loss of a batch; with ``return_details`` also ``{l_pos, l_neg, ce, attention, weights}``.

        ``attention`` is present only when CAA is on, ``ce`` only when ce_weight > 0.
        """
        check_inputs(embeddings, labels)
        labels = labels.long()
        with full_precision(embeddings):
            e, vectors = common_float(embeddings, self.class_vectors)
            if self.detach_weights:
                setting = _Setting(
                    self.margin,
                    self.sigma,
                    self.lam,
                    self.osm,
                    self.caa,
                    self.ce_weight,
                    self.scale,
                )
                loss, means, ce, attention, w = _apply_fused(
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


class OSMCAAOfficialLoss(nn.Module):
    """OSM + CAA as in the authors' released Caffe code (CUB/Cars/MARS/LPW prototxts).

    * positive weight exp(-d^2 / (2 sigma^2)) (Caffe's Gaussian; = the paper form with
      sigma * sqrt(2)); negative weight max(0, margin - d); pair attention min(a_i, a_j);
      weights detached; L = (1 - lam) L_P + lam L_N, each normalised by its own weight sum;
    * attention a_i = exp(-(p_i - 1)^2 / (2 attention_sigma^2)), p_i = softmax(W f_i + b)[y_i]
      from a separate linear classifier with bias;
    * that classifier is trained by a sample-weighted cross-entropy
      -sum_i v_i log p_i, v_i = g_i / sum_j g_j, g_i = exp(-(p_i - ce_mean)^2 / (2 ce_sigma^2)),
      v detached, with loss weight ``ce_weight``;
    * ``divide_by_pairs``: the released layer wraps Caffe's ContrastiveLoss, whose backward
      divides by the number of pairs, so the effective pair loss is L / (n (n - 1) / 2).

    Deviation: the authors feed the classifier the backbone feature (GoogLeNet pool5).
    Our models hand the loss only the embedding, so by default the classifier reads the
    embedding; pass ``features=`` to ``forward`` (and set ``feature_dim``) to use another tensor.

    Args:
        num_classes: number of training classes (labels 0..num_classes-1).
        embedding_dim: dimension of the embeddings.
        feature_dim: input size of the classifier; None = embedding_dim.
        margin: negative margin (1.2 in all released prototxts).
        sigma: Caffe-convention Gaussian width of the positive weights (0.8 CUB/Cars,
            1.0 MARS, 0.6 LPW).
        lam: weight of the negative term (0.5 in the released layer).
        attention_sigma: width of the attention Gaussian around p = 1 (0.68).
        ce_mean, ce_sigma: centre and width of the cross-entropy sample weights (0.5, 0.18).
        ce_weight: loss weight of the weighted cross-entropy (1).
        divide_by_pairs: scale the pair loss by 1 / (n (n-1) / 2) as the released code does.
        compile: run the fused pair loss through ``torch.compile`` (see :class:`OSMCAALoss`).
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        *,
        feature_dim: int | None = None,
        margin: float = 1.2,
        sigma: float = 0.8,
        lam: float = 0.5,
        attention_sigma: float = 0.68,
        ce_mean: float = 0.5,
        ce_sigma: float = 0.18,
        ce_weight: float = 1.0,
        divide_by_pairs: bool = True,
        compile: bool = False,
    ) -> None:
        super().__init__()
        check_loss_hparams(margin, sigma, lam)
        _check_sizes(num_classes, embedding_dim)
        for name, value in (("attention_sigma", attention_sigma), ("ce_sigma", ce_sigma)):
            if not value > 0:
                raise ConfigError(f"loss.{name} must be > 0 (got {value})")
        if ce_weight < 0:
            raise ConfigError(f"loss.ce_weight must be >= 0 (got {ce_weight})")
        in_features = embedding_dim if feature_dim is None else feature_dim
        if int(in_features) < 1:
            raise ConfigError(f"loss.feature_dim must be >= 1 (got {feature_dim})")
        self.margin, self.sigma, self.lam = margin, sigma, lam
        self.attention_sigma, self.ce_mean, self.ce_sigma = attention_sigma, ce_mean, ce_sigma
        self.ce_weight, self.divide_by_pairs = ce_weight, divide_by_pairs
        self.compile = compile
        self.classifier = nn.Linear(int(in_features), num_classes, bias=True)
        nn.init.xavier_uniform_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        return_details: bool = False,
        *,
        features: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Total loss; ``features`` (n, feature_dim) feeds the classifier instead of the embedding."""
        check_inputs(embeddings, labels)
        f = embeddings if features is None else features
        if f.dim() != 2 or f.shape[0] != embeddings.shape[0]:
            raise ValueError(
                f"features must be ({embeddings.shape[0]}, dim), got shape {tuple(f.shape)}"
            )
        if f.shape[1] != self.classifier.in_features:
            raise ValueError(
                f"the classifier reads {self.classifier.in_features} features, got {f.shape[1]}: "
                "set loss.feature_dim to the size of the tensor passed as `features`"
            )
        labels = labels.long()
        with full_precision(embeddings):
            logits = F.linear(*common_float(f, self.classifier.weight, self.classifier.bias))
            log_p = true_class_log_prob(logits, labels)
            p = log_p.detach().exp()
            attention = gaussian(p, 1.0, self.attention_sigma)
            v = gaussian(p, self.ce_mean, self.ce_sigma)
            ce = -(v * log_p).sum() / v.sum()
            setting = _Setting(self.margin, self.sigma * math.sqrt(2.0), self.lam, osm=True)
            loss, means, _, _, w = _apply_fused(
                self.compile,
                to_float32(embeddings),
                None,
                attention,
                labels,
                setting,
                torch.is_grad_enabled(),
            )
            n = embeddings.shape[0]
            if self.divide_by_pairs and n > 1:
                loss = loss / (n * (n - 1) / 2)
            loss = loss + self.ce_weight * ce
        if not return_details:
            return loss
        return loss, {
            "l_pos": means[0],
            "l_neg": means[1],
            "ce": ce.detach(),
            "attention": attention,
            "weights": w,
        }


def _check_sizes(num_classes: int | None, embedding_dim: int | None) -> None:
    if num_classes is None or int(num_classes) < 1:
        raise ConfigError(f"loss.num_classes must be >= 1 (got {num_classes})")
    if embedding_dim is None or int(embedding_dim) < 1:
        raise ConfigError(f"loss.embedding_dim must be >= 1 (got {embedding_dim})")
