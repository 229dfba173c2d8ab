"""Online Soft Mining + Class-Aware Attention weighted contrastive loss.

Wang, Hua, Kodirov, Hu, Robertson. "Deep Metric Learning by Online Soft Mining
and Class-Aware Attention". AAAI 2019. https://arxiv.org/abs/1811.01459

For L2-normalised embeddings x_i and all ordered pairs i != j with distance
d_ij = ||x_i - x_j||:

* OSM weights: positives s_ij = exp(-d_ij^2 / sigma^2), negatives
  s_ij = max(0, margin - d_ij); all ones when OSM is off.
* CAA weights: a_ij = min(a_i, a_j) from per-sample attention a_i; ones when off.
* w_ij = s_ij * a_ij, detached by default (weights are mining scores).
* L_P = 1/2 sum_pos w d^2 / sum_pos w,  L_N = 1/2 sum_neg w max(0, margin - d)^2 / sum_neg w,
  L = (1 - lam) L_P + lam L_N.  An empty (or all-zero-weight) term is 0, never NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from softmine.errors import ConfigError

_EPS = 1e-12
ATTENTION_MODES = ("softmax_cosine", "gaussian_prob")


def _check_inputs(embeddings: Tensor, labels: Tensor) -> None:
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be (n, dim), got shape {tuple(embeddings.shape)}")
    if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"labels must be (n,) matching embeddings (n={embeddings.shape[0]}), "
            f"got shape {tuple(labels.shape)}"
        )


def check_loss_hparams(margin: float, sigma: float, lam: float) -> None:
    """Raise a :class:`ConfigError` naming the bad value and the fix."""
    if not margin > 0:
        raise ConfigError(f"loss.margin must be > 0 (got {margin}); the paper uses 1.2")
    if not sigma > 0:
        raise ConfigError(f"loss.sigma must be > 0 (got {sigma}); the paper uses 0.8")
    if not 0.0 <= lam <= 1.0:
        raise ConfigError(f"loss.lam must lie in [0, 1] (got {lam}); the paper uses 0.5")


def pairwise_sq_distances(x: Tensor) -> Tensor:
    """Squared Euclidean distances of the rows of ``x`` (n, n), clamped at 0, exact 0 on the diagonal."""
    sq = x.pow(2).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp_min(0.0)
    return d2 * (1.0 - torch.eye(x.shape[0], dtype=x.dtype, device=x.device))


def osm_weights(
    d2: Tensor, pos_mask: Tensor, neg_mask: Tensor, *, margin: float, sigma: float
) -> Tensor:
    """OSM pair weights: exp(-d^2/sigma^2) on positives, max(0, margin - d) on negatives, 0 elsewhere."""
    d = d2.clamp_min(_EPS).sqrt()
    pos = torch.exp(-d2 / (sigma * sigma))
    neg = (margin - d).clamp_min(0.0)
    return torch.where(pos_mask, pos, torch.where(neg_mask, neg, torch.zeros_like(d2)))


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
    """OSM (+ optional CAA) weighted contrastive loss of one mini-batch (paper form).

    Args:
        embeddings: (n, dim) features; L2-normalised here, so any scale works.
        labels: (n,) integer class labels.
        attention: per-sample class-aware attention a_i, shape (n,), or None for no CAA.
        margin: alpha, the negative margin on the unit sphere (0 < margin <= 2 is meaningful).
        sigma: OSM Gaussian width for positives, exp(-d^2 / sigma^2).
        lam: lambda, weight of the negative term; the positive term gets 1 - lam.
        osm: soft-mine pairs; False gives every pair weight 1 (plain contrastive).
        detach_weights: stop gradients through the weights (the paper's mining scores).
        return_details: also return a dict with ``l_pos``, ``l_neg`` and the (n, n) ``weights``.

    Returns:
        The scalar loss (float32, computed in at least float32 even under autocast).
    """
    _check_inputs(embeddings, labels)
    dtype = torch.promote_types(embeddings.dtype, torch.float32)
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        x = F.normalize(embeddings.to(dtype), dim=1)
        n = x.shape[0]
        d2 = pairwise_sq_distances(x)
        same = labels[:, None] == labels[None, :]
        off_diag = ~torch.eye(n, dtype=torch.bool, device=x.device)
        pos_mask = same & off_diag
        neg_mask = ~same

        if osm:
            w = osm_weights(d2, pos_mask, neg_mask, margin=margin, sigma=sigma)
        else:
            w = (pos_mask | neg_mask).to(dtype)
        if attention is not None:
            if attention.shape != (n,):
                raise ValueError(f"attention must have shape ({n},), got {tuple(attention.shape)}")
            a = attention.to(dtype)
            w = w * torch.minimum(a[:, None], a[None, :])
        if detach_weights:
            w = w.detach()

        d = d2.clamp_min(_EPS).sqrt()
        hinge = (margin - d).clamp_min(0.0)
        w_pos = w * pos_mask
        w_neg = w * neg_mask
        l_pos = 0.5 * (w_pos * d2).sum() / w_pos.sum().clamp_min(_EPS)
        l_neg = 0.5 * (w_neg * hinge.pow(2)).sum() / w_neg.sum().clamp_min(_EPS)
        loss = (1.0 - lam) * l_pos + lam * l_neg
    if return_details:
        return loss, {"l_pos": l_pos.detach(), "l_neg": l_neg.detach(), "weights": w.detach()}
    return loss


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
    _check_inputs(embeddings, labels)
    if class_vectors.dim() != 2 or class_vectors.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"class_vectors must be (num_classes, {embeddings.shape[1]}), "
            f"got {tuple(class_vectors.shape)}"
        )
    logits = class_logits(embeddings, class_vectors, mode=mode, scale=scale, bias=bias)
    p = logits.softmax(dim=1).gather(1, labels.long()[:, None]).squeeze(1)
    if mode == "softmax_cosine":
        return p
    return torch.exp(-(p - 1.0).pow(2) / (2.0 * gaussian_sigma**2))


def class_logits(
    embeddings: Tensor,
    class_vectors: Tensor,
    *,
    mode: str = "softmax_cosine",
    scale: float = 1.0,
    bias: Tensor | None = None,
) -> Tensor:
    """Classifier logits (n, num_classes): scaled cosine (paper) or plain linear (authors' code)."""
    if mode not in ATTENTION_MODES:
        raise ConfigError(f"unknown attention mode {mode!r}; choose one of {ATTENTION_MODES}")
    dtype = torch.promote_types(embeddings.dtype, torch.float32)
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        f = embeddings.to(dtype)
        w = class_vectors.to(dtype)
        if mode == "softmax_cosine":
            return scale * F.normalize(f, dim=1) @ F.normalize(w, dim=1).T
        logits = f @ w.T
        return logits if bias is None else logits + bias.to(dtype)


class OSMCAALoss(nn.Module):
    """OSM + CAA loss that owns its class vectors; returns the total training loss.

    total = weighted_contrastive_loss(...) + ce_weight * CE(scale * cos(x, c), y)

    The cross-entropy term trains the class vectors, since the (detached) attention
    alone gives them no gradient.

    Args:
        num_classes: number of training classes (labels must be 0..num_classes-1).
        embedding_dim: dimension of the embeddings.
        margin, sigma, lam: see :func:`weighted_contrastive_loss`.
        osm: soft mining on/off.  caa: class-aware attention on/off.
        ce_weight: weight of the classifier cross-entropy (ignored when CAA is off
            and ``ce_weight`` would only train unused vectors: it is still added if > 0).
        scale: multiplies the cosine logits (1 in the paper).
        detach_weights: stop gradients through OSM/CAA weights.
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
    ) -> None:
        super().__init__()
        check_loss_hparams(margin, sigma, lam)
        if num_classes is None or num_classes < 1:
            raise ConfigError(f"loss.num_classes must be >= 1 (got {num_classes})")
        self.margin, self.sigma, self.lam = margin, sigma, lam
        self.osm, self.caa = osm, caa
        self.ce_weight, self.scale = ce_weight, scale
        self.detach_weights = detach_weights
        self.class_vectors = nn.Parameter(torch.randn(num_classes, embedding_dim) * 0.01)

    def forward(
        self, embeddings: Tensor, labels: Tensor, return_details: bool = False
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        logits = class_logits(embeddings, self.class_vectors, scale=self.scale)
        attention = None
        if self.caa:
            p = logits.softmax(dim=1).gather(1, labels.long()[:, None]).squeeze(1)
            attention = p
        pair_loss, details = weighted_contrastive_loss(
            embeddings,
            labels,
            attention,
            margin=self.margin,
            sigma=self.sigma,
            lam=self.lam,
            osm=self.osm,
            detach_weights=self.detach_weights,
            return_details=True,
        )
        ce = F.cross_entropy(logits, labels.long()) if self.ce_weight > 0 else logits.new_zeros(())
        loss = pair_loss + self.ce_weight * ce
        if not return_details:
            return loss
        details["ce"] = ce.detach()
        if attention is not None:
            details["attention"] = attention.detach()
        return loss, details
