"""The fused OSM (+CAA) (+cross-entropy) pair loss: forward and gradient written out by hand.

Shared by the paper form (:mod:`softmine.losses.osm_caa`) and the authors' released
form (:mod:`softmine.losses.osm_caa_authors`). With detached weights the loss and its
gradient are computed together (:class:`_FusedOSMCAA`): one matmul gives the Gram
matrix and the class logits, the gradient is one more matmul (plus one for the class
vectors), formed during the forward pass, and no autograd graph is built for the
(n, n) intermediates. ``compile=True`` runs the computation through torch.compile.
Tested against float64 loops over pairs in ``tests/losses/test_osm_caa_loss.py``.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from softmine.losses.pairwise import EPS, TINY_SQ_DIST


@dataclass(frozen=True)
class PairSetting:
    """Hyperparameters of one call of :class:`_FusedOSMCAA`."""

    margin: float
    sigma: float
    lam: float
    osm: bool
    caa: bool = False
    ce_weight: float = 0.0
    scale: float = 1.0
    #: d + grad_eps in the negatives' gradient h / d: 0 is the exact gradient; the authors'
    #: Caffe ContrastiveLoss backward divides by dist + 1e-4 (contrastive_loss_layer.cpp)
    grad_eps: float = 0.0


@functools.lru_cache(maxsize=64)
def _constant(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small constant tensor, built once per (values, dtype, device); never written to."""
    return torch.tensor(values, dtype=dtype, device=device)


def _fused_terms(
    emb: Tensor,
    class_vectors: Tensor | None,
    attention: Tensor | None,
    labels: Tensor,
    cfg: PairSetting,
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
        if cfg.grad_eps:
            whd_neg = wh_neg.div_(d + cfg.grad_eps)  # w h / (d + eps), as Caffe's backward
        else:
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
    labels (n,); a :class:`PairSetting`; ``want_grad`` (False under ``torch.no_grad``,
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
        cfg: PairSetting,
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


def apply_fused(
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
