"""Video (tracklet) embeddings: a frame network, temporal pooling over the clip, L2 normalisation.

Follows the authors' MARS / LPW Caffe code (``MARS_V01/.../train.prototxt``): every
frame of a tracklet goes through the image network; a frame classifier gives each
frame the probability p_t of the tracklet's true identity; the frame's class-aware
attention is a_t = exp(-(p_t - 1)^2 / (2 * 0.68^2)) (their ``Gaussian`` layer), not
back-propagated; the weights are L1-normalised within the tracklet
(w_t = a_t / sum_t a_t) and the tracklet feature is sum_t w_t f_t over the frame
embeddings f_t (before L2 normalisation). The tracklet-level OSM + CAA loss is then
computed on the L2-normalised tracklet features. At test time no label is known and
the authors average the frames (``process_tracklet_ave_global.m``), which is
``eval_pooling="mean"`` here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from softmine.errors import ConfigError
from softmine.models.embedding_net import EmbeddingNet

POOLING_MODES = ("mean", "max", "attention")
ATTENTION_FORMS = ("gaussian", "prob")


def frame_attention(
    logits: Tensor,
    labels: Tensor | None = None,
    *,
    form: str = "gaussian",
    sigma: float = 0.68,
) -> Tensor:
    """Class-aware attention of every frame, shape (B, T), in (0, 1].

    Args:
        logits: (B, T, C) frame classifier scores.
        labels: (B,) clip labels: p_t is the softmax probability of the clip's own
            class (training). None: p_t is the largest class probability, a label-free
            stand-in for test time.
        form: ``gaussian`` (authors' code): a_t = exp(-(p_t - 1)^2 / (2 sigma^2));
            ``prob`` (paper's CAA): a_t = p_t.
        sigma: width of the Gaussian form (0.68 in the authors' prototxt).

    Computed in float32 at least, also under autocast.
    """
    if logits.dim() != 3:
        raise ValueError(f"frame logits must be (B, T, C), got shape {tuple(logits.shape)}")
    if form not in ATTENTION_FORMS:
        raise ConfigError(f"attention form must be one of {ATTENTION_FORMS} (got {form!r})")
    p = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=-1)
    if labels is None:
        p_t = p.amax(dim=-1)
    else:
        if labels.shape != (logits.shape[0],):
            raise ValueError(
                f"labels must be ({logits.shape[0]},), one per clip, got {tuple(labels.shape)}"
            )
        index = labels.long().view(-1, 1, 1).expand(-1, logits.shape[1], 1)
        p_t = p.gather(-1, index).squeeze(-1)
    if form == "prob":
        return p_t
    return torch.exp(-(p_t - 1.0).pow(2) / (2.0 * sigma * sigma))


def temporal_pool(
    frames: Tensor,
    mode: str = "mean",
    attention: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Pool (B, T, D) frame features over time into (B, D).

    Modes:
        ``mean``: (1/T) sum_t f_t.  ``max``: max_t f_t per dimension.
        ``attention``: sum_t w_t f_t with w_t = a_t / sum_t a_t, ``attention`` a (B, T).

    ``mask`` (B, T) bool marks real frames of padded clips; padding is left out of all
    three (each clip needs at least one real frame).
    """
    if frames.dim() != 3:
        raise ValueError(f"frames must be (B, T, D), got shape {tuple(frames.shape)}")
    if mode not in POOLING_MODES:
        raise ConfigError(f"temporal pooling must be one of {POOLING_MODES} (got {mode!r})")
    if mask is not None and mask.shape != frames.shape[:2]:
        raise ValueError(f"mask must be {tuple(frames.shape[:2])}, got {tuple(mask.shape)}")
    if mode == "max":
        if mask is not None:
            frames = frames.masked_fill(~mask[..., None], float("-inf"))
        return frames.amax(dim=1)
    if mode == "mean":
        w = torch.ones(frames.shape[:2], dtype=frames.dtype, device=frames.device)
    else:
        if attention is None or attention.shape != frames.shape[:2]:
            got = None if attention is None else tuple(attention.shape)
            raise ValueError(
                f"attention pooling needs attention of shape {tuple(frames.shape[:2])}, got {got}"
            )
        w = attention.to(frames.dtype)
    if mask is not None:
        w = w * mask.to(w.dtype)
    w = w / w.sum(dim=1, keepdim=True)
    return torch.einsum("bt,btd->bd", w, frames)


class VideoEmbeddingNet(EmbeddingNet):
    """Clips (B, T, C, H, W) -> (B, embedding_dim) tracklet embeddings.

    The frame network is the :class:`EmbeddingNet` this class extends (same trunk,
    head and options, so image weights load into it); its frame embeddings (before L2
    normalisation) are pooled over time, then L2-normalised.

    Args:
        trunk, embedding_dim, head_bn, normalize: as in :class:`EmbeddingNet`.
        pooling: temporal pooling in training: ``mean`` | ``max`` | ``attention``.
        eval_pooling: pooling in eval mode, when labels are unknown (authors: ``mean``).
            ``attention`` there weights frames by their largest class probability.
        num_classes: size of the model's own linear frame classifier, needed for
            ``attention`` pooling (None: no classifier; pass ``classifier=`` to
            ``forward`` instead). It learns only from :meth:`frame_loss`, which the
            training loop must add to the loss.
        attention_form: ``gaussian`` (authors) or ``prob`` (paper); see :func:`frame_attention`.
        attention_sigma: width of the Gaussian form.
        detach_attention: no gradient through the pooling weights (authors).
        **kwargs: keyword options of :class:`EmbeddingNet` (``head_relu``, ``frozen_bn``,
            ``input_norm``, ``dropout``, ``name``, ``pretrained``).
    """

    per_frame = True

    def __init__(
        self,
        trunk: nn.Module,
        embedding_dim: int = 128,
        head_bn: bool = False,
        normalize: bool = True,
        *,
        pooling: str = "mean",
        eval_pooling: str = "mean",
        num_classes: int | None = None,
        attention_form: str = "gaussian",
        attention_sigma: float = 0.68,
        detach_attention: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(trunk, embedding_dim, head_bn, normalize, **kwargs)
        for key, mode in (("pooling", pooling), ("eval_pooling", eval_pooling)):
            if mode not in POOLING_MODES:
                raise ConfigError(f"backbone.{key} must be one of {POOLING_MODES} (got {mode!r})")
        if attention_form not in ATTENTION_FORMS:
            raise ConfigError(
                f"backbone.attention_form must be one of {ATTENTION_FORMS} (got {attention_form!r})"
            )
        if not attention_sigma > 0:
            raise ConfigError(f"backbone.attention_sigma must be > 0 (got {attention_sigma})")
        if num_classes is not None and (isinstance(num_classes, bool) or int(num_classes) < 1):
            raise ConfigError(f"backbone.num_classes must be >= 1 or null (got {num_classes!r})")
        self.feature_dims["tracklet"] = self.embedding_dim
        self.pooling, self.eval_pooling = pooling, eval_pooling
        self.attention_form, self.attention_sigma = attention_form, float(attention_sigma)
        self.detach_attention = detach_attention
        uses_attention = "attention" in (pooling, eval_pooling)
        self.frame_classifier = (
            nn.Linear(self.embedding_dim, int(num_classes))
            if uses_attention and num_classes is not None
            else None
        )

    def forward(
        self,
        x: Tensor,
        labels: Tensor | None = None,
        *,
        mask: Tensor | None = None,
        classifier: Callable[[Tensor], Tensor] | None = None,
        return_details: bool = False,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Embed a batch of clips.

        Args:
            x: (B, T, C, H, W) clips.
            labels: (B,) clip labels; required for ``attention`` pooling in training.
            mask: (B, T) bool, real frames of padded clips (None: all real).
            classifier: maps (n, D) frame embeddings to (n, C) class scores for the
                attention, e.g. ``lambda f: class_logits(f, loss.class_vectors)``;
                default: the model's own ``frame_classifier``.
            return_details: also return ``frame_embeddings`` (B, T, D, L2-normalised
                if ``normalize``), ``frame_weights`` (B, T; mean and attention pooling),
                and ``frame_logits`` (B, T, C) when a classifier ran.

        Returns:
            (B, embedding_dim) tracklet embeddings (and the details dict).
        """
        self._check_clips(x)
        b, t = x.shape[:2]
        f = self.embed(self.trunk_features(x.flatten(0, 1))).view(b, t, -1)
        pooled, details = self._pool(f, labels, mask, classifier)
        out = F.normalize(pooled, dim=1) if self.normalize else pooled
        if not return_details:
            return out
        details["frame_embeddings"] = F.normalize(f, dim=2) if self.normalize else f
        return out, details

    def forward_features(
        self,
        x: Tensor,
        labels: Tensor | None = None,
        *,
        mask: Tensor | None = None,
        classifier: Callable[[Tensor], Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Tracklet embeddings (as :meth:`forward`) and named features for loss heads.

        Every named feature of the frame network (``embedding``, ``trunk``, the trunk's
        own, see :meth:`EmbeddingNet.forward_features`) comes per frame as (B, T, dim);
        ``tracklet`` is the pooled feature before L2 normalisation (B, dim), and
        ``frame_logits`` / ``frame_weights`` are there when the pooling made them.
        """
        self._check_clips(x)
        b, t = x.shape[:2]
        _, frame_feats = super().forward_features(x.flatten(0, 1))
        feats = {k: v.reshape(b, t, *v.shape[1:]) for k, v in frame_feats.items()}
        pooled, details = self._pool(feats["embedding"], labels, mask, classifier)
        feats.update(details)
        feats["tracklet"] = pooled
        return (F.normalize(pooled, dim=1) if self.normalize else pooled), feats

    @staticmethod
    def _check_clips(x: Tensor) -> None:
        if x.dim() != 5:
            raise ValueError(
                f"VideoEmbeddingNet expects clips (B, T, C, H, W), got shape {tuple(x.shape)}; "
                "single images go to an image backbone (EmbeddingNet)"
            )

    def _pool(
        self,
        f: Tensor,
        labels: Tensor | None,
        mask: Tensor | None,
        classifier: Callable[[Tensor], Tensor] | None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Pool (B, T, D) frame embeddings with this mode's pooling; (pooled, details)."""
        b, t = f.shape[:2]
        mode = self.pooling if self.training else self.eval_pooling
        details: dict[str, Tensor] = {}
        attention = None
        clf = classifier if classifier is not None else self.frame_classifier
        if mode == "attention":
            if clf is None:
                raise ConfigError(
                    "attention pooling needs class scores per frame: set backbone.num_classes "
                    "(the model's own frame classifier) or pass classifier= to forward"
                )
            if self.training and labels is None:
                raise ValueError(
                    "attention pooling in training needs the clip labels: call model(x, labels)"
                )
            logits = clf(f.flatten(0, 1)).view(b, t, -1)
            details["frame_logits"] = logits
            attention = frame_attention(
                logits, labels, form=self.attention_form, sigma=self.attention_sigma
            )
            if self.detach_attention:
                attention = attention.detach()
        elif self.training and self.frame_classifier is not None and classifier is None:
            details["frame_logits"] = self.frame_classifier(f.flatten(0, 1)).view(b, t, -1)
        pooled = temporal_pool(f, mode, attention, mask)
        if mode != "max":
            w = torch.ones_like(f[..., 0]) if attention is None else attention.to(f.dtype)
            if mask is not None:
                w = w * mask.to(w.dtype)
            details["frame_weights"] = w / w.sum(dim=1, keepdim=True)
        return pooled, details

    def frame_embeddings(self, frames: Tensor) -> Tensor:
        """(n, D) embeddings of n single frames (n, C, H, W), before pooling and L2 normalisation.

        Test-time evaluation pools these over all frames of a tracklet (in batches of
        frames), then normalises, as :meth:`forward` does for one clip.
        """
        return self.embed(self.trunk_features(frames))

    def frame_loss(self, details: dict[str, Tensor], labels: Tensor) -> Tensor:
        """Cross-entropy of the frame classifier against the clip labels of its frames.

        The authors' ``loss3`` term (they weight it per frame; this is the plain form).
        It is what trains the frame classifier behind the attention; returns 0 when no
        classifier ran.
        """
        logits = details.get("frame_logits")
        if logits is None:
            return torch.zeros((), device=labels.device)
        b, t, c = logits.shape
        return F.cross_entropy(logits.reshape(b * t, c).float(), labels.long().repeat_interleave(t))
