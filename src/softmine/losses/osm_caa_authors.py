"""OSM + CAA as the authors released it (Caffe), for images and for video tracklets.

Authors' code: https://github.com/XinshaoAmosWang/OSM_CAA_WeightedContrastiveLoss (commit
a8911b9). The pair loss is their ``DistanceWeightedValidPairLossV5`` layer
(``CaffeMex_V28/src/caffe/layers/distance_weighted_valid_pair_loss_V5_layer.cpp``) around
Caffe's ``ContrastiveLoss``; the classifiers are ``WeightedSoftmaxWithLoss`` heads
(``weighted_softmax_loss_layer.cpp``, see :mod:`softmine.losses.heads`); the wiring is
``CUB_V01/M_WIDE_ASiamese_V42_e1/train.prototxt`` (images) and
``MARS_V01/M_WIDE_WF_WIDE_ASiamese_V20_e2/train.prototxt`` (tracklets).

Pair loss, for L2-normalised embeddings and pairs i < j (d_ij = ||x_i - x_j||):

* positive weight exp(-d^2 / (2 sigma^2)) (Caffe's Gaussian; = the paper form with
  sigma * sqrt(2)); negative weight max(0, margin - d); pair attention min(a_i, a_j);
  weights detached; L = (1 - lam) L_P + lam L_N, each normalised by its own weight sum;
* ``divide_by_pairs``: the layer's gradient is Caffe's ``ContrastiveLoss`` backward, which
  divides by the number of pairs, so the effective pair loss is L / (n (n - 1) / 2);
* that backward divides the negatives' gradient by d + 1e-4 instead of d, and so does ours
  (:data:`CAFFE_DIST_EPS`); the value is the loss above.

Attention a_i = exp(-(p_i - 1)^2 / (2 attention_sigma^2)), p_i the true-class probability
of the ``attention_head`` classifier (``loss3`` on pool5 in the authors' nets).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from softmine.errors import ConfigError
from softmine.losses.base import MetricLoss
from softmine.losses.fused import PairSetting, apply_fused
from softmine.losses.heads import ClassifierHead, build_heads, gaussian
from softmine.losses.osm_caa import _check_sizes, check_loss_hparams
from softmine.losses.pairwise import check_inputs, full_precision, to_float32

DEFAULT_HEAD = "classifier"
#: Caffe's ContrastiveLoss backward scales the negatives' gradient by (margin - d) / (d + 1e-4)
CAFFE_DIST_EPS = 1e-4


def authors_pair_loss(
    embeddings: Tensor,
    labels: Tensor,
    attention: Tensor,
    *,
    margin: float,
    sigma: float,
    lam: float,
    divide_by_pairs: bool,
    compile: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """The V5 pair loss of ``embeddings`` (any scale; L2-normalised inside): (loss, (l_pos, l_neg), w).

    ``sigma`` in the Caffe convention exp(-d^2 / (2 sigma^2)); ``attention`` (n,) detached.
    """
    setting = PairSetting(margin, sigma * math.sqrt(2.0), lam, osm=True, grad_eps=CAFFE_DIST_EPS)
    loss, means, _, _, w = apply_fused(
        compile,
        to_float32(embeddings),
        None,
        attention.detach(),
        labels,
        setting,
        torch.is_grad_enabled(),
    )
    n = embeddings.shape[0]
    if divide_by_pairs and n > 1:
        loss = loss / (n * (n - 1) / 2)
    return loss, means, w


class _AuthorsBase(MetricLoss):
    """Hyperparameters and heads shared by the image and the video form."""

    returns_details = True
    classification_term = True  # its softmax heads (the attention reads one)

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        *,
        heads: Mapping[str, Mapping[str, Any]] | None = None,
        attention_head: str | None = None,
        feature_dims: Mapping[str, int] | None = None,
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
        """Arguments and defaults: as documented on :class:`OSMCAAAuthorsLoss`."""
        super().__init__()
        check_loss_hparams(margin, sigma, lam)
        _check_sizes(num_classes, embedding_dim)
        for name, value in (("attention_sigma", attention_sigma), ("ce_sigma", ce_sigma)):
            if not value > 0:
                raise ConfigError(f"loss.{name} must be > 0 (got {value})")
        if ce_weight < 0:
            raise ConfigError(f"loss.ce_weight must be >= 0 (got {ce_weight})")
        self.margin, self.sigma, self.lam = margin, sigma, lam
        self.attention_sigma, self.ce_mean, self.ce_sigma = attention_sigma, ce_mean, ce_sigma
        self.ce_weight, self.divide_by_pairs, self.compile = ce_weight, divide_by_pairs, compile
        dims = {"embedding": int(embedding_dim), **dict(feature_dims or {})}
        if heads is None:
            heads = {DEFAULT_HEAD: {"feature": "embedding", "weight": ce_weight}}
            attention_head = attention_head or DEFAULT_HEAD
        if not heads:
            raise ConfigError(
                "loss.heads must name at least one classifier head (the attention reads one)"
            )
        self.heads = build_heads(heads, int(num_classes), dims, ce_mean=ce_mean, ce_sigma=ce_sigma)
        if attention_head is None or attention_head not in self.heads:
            raise ConfigError(
                f"loss.attention_head={attention_head!r} must name one of the heads "
                f"{sorted(self.heads)} (the authors: loss3, the head on pool5)"
            )
        self.attention_head = str(attention_head)
        #: backbone features the heads read (the training objective hands them to ``forward``)
        self.requires = tuple(sorted({h.feature for h in self.heads.values()}))

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        return_details: bool = False,
        *,
        features: Mapping[str, Tensor] | None = None,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Total loss (and with ``return_details`` its parts); ``features``: see ``_loss``."""
        check_inputs(embeddings, labels)
        loss, details = self._loss(embeddings, labels.long(), features)
        return (loss, details) if return_details else loss

    def _loss(
        self, embeddings: Tensor, labels: Tensor, features: Mapping[str, Tensor] | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The total loss of int64 ``labels``, and its parts by name."""
        raise NotImplementedError

    def _pair_loss(
        self, embeddings: Tensor, labels: Tensor, attention: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """:func:`authors_pair_loss` with this loss's hyperparameters."""
        return authors_pair_loss(
            embeddings,
            labels,
            attention,
            margin=self.margin,
            sigma=self.sigma,
            lam=self.lam,
            divide_by_pairs=self.divide_by_pairs,
            compile=self.compile,
        )

    def _run_heads(
        self, feats: Mapping[str, Tensor], labels: Tensor, details: dict[str, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """Sum of the heads' weighted cross-entropies, and the attention head's p."""
        missing = sorted(set(self.requires) - set(feats))
        if missing:
            raise ValueError(
                f"the loss heads read the features {missing}, not given: call "
                "forward(embeddings, labels, features={name: tensor})"
            )
        total: Tensor | None = None
        p_att = None
        for name, head in self.heads.items():
            ce, p = head(feats[head.feature], labels)
            details[f"ce_{name}"] = ce.detach()
            term = head.weight * ce
            total = term if total is None else total + term
            if name == self.attention_head:
                p_att = p
        assert total is not None and p_att is not None
        details["ce"] = total.detach()
        return total, p_att


class OSMCAAAuthorsLoss(_AuthorsBase):
    """The authors' released image objective: classifier heads + attention-weighted V5 pair loss.

    total = sum_h weight_h * CE_h + pair loss of the embeddings with attention from the
    ``attention_head``'s probabilities (see the module doc).

    Args:
        num_classes: number of training classes (labels 0..num_classes-1).
        embedding_dim: dimension of the embeddings.
        heads: ``name -> {feature, weighting, weight, bias}``: classifier heads on named
            backbone features (see :mod:`softmine.losses.heads`). None: one Gaussian-weighted
            head ``classifier`` on ``embedding`` (the embedding before L2 normalisation, or the
            ``embeddings`` argument when no features are passed), loss weight ``ce_weight``.
            The authors' BN-Inception nets: ``loss1`` on ``inception_3c``, ``loss2`` on
            ``embedding``, ``loss3`` on ``pool5``.
        attention_head: the head whose true-class probability gives the attention
            (default with ``heads=None``: ``classifier``; authors: ``loss3``).
        feature_dims: sizes of the backbone's named features (filled by the trainer).
        margin: negative margin (1.2 in all the authors' prototxts).
        sigma: Caffe-convention Gaussian width of the positive weights (0.8 CUB/Cars,
            1.0 MARS, 0.6 LPW).
        lam: weight of the negative term (0.5 in the authors' layer).
        attention_sigma: width of the attention Gaussian around p = 1 (0.68).
        ce_mean, ce_sigma: centre and width of the heads' cross-entropy sample weights (0.5, 0.18).
        ce_weight: loss weight of the default head (``heads=None`` only).
        divide_by_pairs: scale the pair loss by 1 / (n (n-1) / 2) as the authors' code does.
        compile: run the fused pair loss through ``torch.compile``.
    """

    def _loss(
        self, embeddings: Tensor, labels: Tensor, features: Mapping[str, Tensor] | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss; ``features`` maps feature names to (n, dim) tensors the heads read.

        Without ``features`` (or without its ``embedding`` entry) the ``embedding``
        feature is ``embeddings`` itself.
        """
        feats = dict(features or {})
        feats.setdefault("embedding", embeddings)
        details: dict[str, Tensor] = {}
        with full_precision(embeddings):
            ce, p = self._run_heads(feats, labels, details)
            attention = gaussian(p, 1.0, self.attention_sigma)
            pair, means, w = self._pair_loss(embeddings, labels, attention)
            loss = pair + ce
        details.update(
            {"l_pos": means[0], "l_neg": means[1], "pair": pair.detach(), "attention": attention}
        )
        details["weights"] = w
        return loss, details


class OSMCAAAuthorsVideoLoss(_AuthorsBase):
    """The authors' released MARS / LPW objective on clips of T frames.

    From ``MARS_V01/M_WIDE_WF_WIDE_ASiamese_V20_e2/train.prototxt``, for a batch of B clips
    (the authors: 6 tracklets x 9 frames):

    1. frame heads (``heads``, e.g. ``loss1``/``loss2``/``loss3``) on every frame's named
       features, Gaussian-weighted cross-entropies over all B*T frames;
    2. frame attention a_t = exp(-(p_t - 1)^2 / (2 attention_sigma^2)) from the
       ``attention_head`` (``loss3``), detached, L1-normalised within each clip;
    3. tracklet feature = sum_t a_t f_t of the frame embeddings f_t before L2 normalisation
       (their ``BatchPool`` layers);
    4. a tracklet classifier (``tracklet_head``) on that un-normalised feature, weighted CE;
    5. the tracklet pair loss on the L2-normalised tracklet features, attention from the
       tracklet classifier, divided by its B(B-1)/2 pairs;
    6. the image-level pair loss on the L2-normalised frame embeddings with the frame
       attention, divided by its own BT(BT-1)/2 pairs (``image_pair_weight``; 0 turns it off).

    Features come from a video backbone's ``forward_features`` as (B, T, dim) tensors
    (``embedding``: frame embeddings before L2 normalisation).

    Args: as :class:`OSMCAAAuthorsLoss`, plus
        tracklet_head: ``{weighting, weight, bias}`` of the tracklet classifier (its feature
            is the pooled tracklet feature); None: no tracklet classifier, and the tracklet
            attention then comes from the mean frame attention of the clip.
        image_pair_weight: loss weight of the image-level pair loss (1 in the prototxt).
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        *,
        tracklet_head: Mapping[str, Any] | None = None,
        image_pair_weight: float = 1.0,
        sigma: float = 1.0,
        **options: Any,
    ) -> None:
        """``options``: the other arguments of :class:`OSMCAAAuthorsLoss`, with its defaults."""
        super().__init__(num_classes, embedding_dim, sigma=sigma, **options)
        if not float(image_pair_weight) >= 0:
            raise ConfigError(f"loss.image_pair_weight must be >= 0 (got {image_pair_weight})")
        self.image_pair_weight = float(image_pair_weight)
        self.tracklet_head: ClassifierHead | None = None
        if tracklet_head is not None:
            opts = {**dict(tracklet_head), "feature": "tracklet"}
            built = build_heads(
                {"tracklet": opts},
                int(num_classes),
                {"tracklet": int(embedding_dim)},
                ce_mean=self.ce_mean,
                ce_sigma=self.ce_sigma,
            )
            self.tracklet_head = built["tracklet"]
        self.requires = tuple(sorted({*self.requires, "embedding"}))  # the frames it pools

    #: the training objective hands this loss per-frame (B, T, dim) features
    per_frame = True

    def _loss(
        self, embeddings: Tensor, labels: Tensor, features: Mapping[str, Tensor] | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss of B clips; ``features`` maps names to (B, T, dim) frame features.

        ``embeddings`` (B, dim), the backbone's own pooled output, is only checked: the
        tracklet feature is pooled here with the frame attention.
        """
        if not features or "embedding" not in features:
            raise ValueError(
                "the video loss needs the frame features: forward(embeddings, labels, "
                "features={'embedding': (B, T, dim), ...}) from a video backbone"
            )
        frames = features["embedding"]
        if frames.dim() != 3 or frames.shape[0] != embeddings.shape[0]:
            raise ValueError(
                f"frame features must be (B={embeddings.shape[0]}, T, dim), got {tuple(frames.shape)}"
            )
        b, t = frames.shape[:2]
        frame_labels = labels.repeat_interleave(t)
        flat = {k: v.flatten(0, 1) for k, v in features.items() if v.dim() == 3}
        details: dict[str, Tensor] = {}
        with full_precision(frames):
            ce, p = self._run_heads(flat, frame_labels, details)
            a = gaussian(p, 1.0, self.attention_sigma).view(b, t)
            w = a / a.sum(dim=1, keepdim=True)
            tracklet = torch.einsum("bt,btd->bd", w.to(frames.dtype), frames)
            if self.tracklet_head is not None:
                ce_t, p_t = self.tracklet_head(tracklet, labels)
                details["ce_tracklet"] = ce_t.detach()
                ce = ce + self.tracklet_head.weight * ce_t
                details["ce"] = ce.detach()
                att_t = gaussian(p_t, 1.0, self.attention_sigma)
            else:
                att_t = a.mean(dim=1)
            pair, means, pw = self._pair_loss(tracklet, labels, att_t)
            loss = ce + pair
            if self.image_pair_weight > 0:
                image_pair, _, _ = self._pair_loss(flat["embedding"], frame_labels, a.flatten())
                loss = loss + self.image_pair_weight * image_pair
                details["image_pair"] = image_pair.detach()
        details.update(
            {
                "l_pos": means[0],
                "l_neg": means[1],
                "pair": pair.detach(),
                "attention": att_t.detach(),
                "frame_attention": a.detach(),
                "weights": pw,
            }
        )
        return loss, details


#: The names these had before issue 24 ("official", "released"): configs recorded by older runs
#: name them in ``_target_``, and user code may import them.
OSMCAAOfficialLoss = OSMCAAAuthorsLoss
OSMCAAOfficialVideoLoss = OSMCAAAuthorsVideoLoss
released_pair_loss = authors_pair_loss
