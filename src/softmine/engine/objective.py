"""The training objective as one module, so DDP synchronises model and loss parameters together;
and the model-objective contract: what the model offers against what the loss needs, checked once."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from softmine.config import build
from softmine.engine.distributed import gather_tensor, gather_with_grad, mean_over_ranks
from softmine.errors import ConfigError
from softmine.losses.base import LossNeeds, needs_of
from softmine.losses.heads import MissingFeatureError
from softmine.losses.memory import MEMORY_KEYS, CrossBatchMemory
from softmine.losses.memory import build_memory as _build_memory
from softmine.losses.pairwise import to_float32
from softmine.models.embedding_net import EmbeddingNet
from softmine.models.features import FeatureInfo

VIDEO_BACKBONES = "backbone=video_bninception or backbone=video_resnet50"


def offers_of(model: nn.Module) -> FeatureInfo:
    """What ``model`` declares it offers; a model of one's own (no :class:`EmbeddingNet`)
    declares nothing: only its output, the embeddings."""
    if isinstance(model, EmbeddingNet):
        return model.feature_info
    return FeatureInfo(name=type(model).__name__)


def _side(group: str, fallback: str) -> str:
    """``loss=osm_caa`` (the option Hydra composed this run from), else ``loss <fallback>``."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get(group)
        if choice:
            return f"{group}={choice}"
    return f"{group} {fallback}"


def _missing_feature(loss_side: str, feature: str, offers: FeatureInfo, head: str = "") -> str:
    """The one-line contract error for a feature the loss reads (its ``head``) and the model lacks."""
    read_by = f" ({head})" if head else ""
    fix = f"point {head}.feature at one of those, or " if head else ""
    return (
        f"{loss_side} needs feature {feature!r}{read_by} but {_side('backbone', offers.name)} "
        f"offers: {offers.describe()}; {fix}use a backbone that has it"
    )


def check_contract(model: nn.Module, loss: nn.Module) -> None:
    """The loss's declared needs (:class:`~softmine.losses.MetricLoss`) against what the model
    declares it offers (:class:`~softmine.models.FeatureInfo`): a one-line
    :class:`ConfigError` naming both sides at the first mismatch."""
    offers, needs = offers_of(model), needs_of(loss)
    loss_side = _side("loss", type(loss).__name__)
    if needs.per_frame and not offers.per_frame:
        raise ConfigError(
            f"{loss_side} needs features per frame (B, T, dim) but "
            f"{_side('backbone', offers.name)} is an image model, offering: {offers.describe()}; "
            f"use a video backbone ({VIDEO_BACKBONES})"
        )
    for feature in needs.requires:
        if feature not in offers.features:
            raise ConfigError(_missing_feature(loss_side, feature, offers))


def build_loss(node: DictConfig, model: nn.Module, **sizes: Any) -> nn.Module:
    """The loss of config ``node`` (``sizes``: what the run fills in), checked against ``model``.

    A head that reads a feature the model lacks fails while the loss is built (it cannot
    be sized); that, too, becomes the contract error naming the loss and the backbone.
    The cross-batch memory's keys (``loss.memory*``) are not the loss's: :func:`build_memory`
    reads them.
    """
    if any(k in node for k in MEMORY_KEYS):  # resolved first: ``${loss.x}`` reads the run's config
        resolved = OmegaConf.to_container(node, resolve=True)
        node = OmegaConf.create({k: v for k, v in resolved.items() if k not in MEMORY_KEYS})
    try:
        loss = build(node, "loss", **sizes)
    except MissingFeatureError as e:
        target = str(node.get("_target_", "")).rsplit(".", 1)[-1]
        raise ConfigError(
            _missing_feature(_side("loss", target), e.feature, offers_of(model), e.needed_by)
        ) from None
    check_contract(model, loss)
    return loss


def build_memory(
    node: DictConfig, loss: nn.Module, device: torch.device | None = None
) -> CrossBatchMemory | None:
    """The cross-batch memory ``loss.memory`` asks for (None for null), on ``device``; a
    one-line error naming the loss when it has no pairs to join (a proxy or classifier loss)."""
    target = str(node.get("_target_", "")).rsplit(".", 1)[-1]
    return _build_memory(node, loss, _side("loss", target or type(loss).__name__), device)


class Objective(nn.Module):
    """batch -> embeddings -> (global batch) -> loss, plus the video frame-classifier loss.

    Under torch.distributed the embeddings and labels of all ranks are gathered
    (differentiably) before the loss, so every rank computes the loss of the whole
    global batch. The video frame cross-entropy is a mean over this rank's frames;
    its value is averaged over ranks (the global batch's value, the same on every
    rank), and DDP's gradient averaging gives the global batch's gradient.

    What flows where is declared, not probed (see :func:`check_contract`): a loss that
    reads named model features lists them in ``requires``
    (:class:`~softmine.losses.MetricLoss`); the objective then runs
    ``model.forward_features`` and hands those features (gathered like the embeddings,
    half precision promoted to float32) to ``loss_fn(..., features=...)``. A video
    model's features (its :class:`~softmine.models.FeatureInfo` says ``per_frame``) come
    per frame, (B, T, dim); a loss that declares ``per_frame`` gets them so, any other
    loss gets tracklet-level ones: ``embedding`` is the pooled tracklet feature before L2
    normalisation and every other feature is averaged over the frames.

    Args:
        model: the embedding network; a video model is called with the labels so it can
            pool frames with class-aware attention, and its ``frame_loss`` is added.
        loss_fn: a metric-learning loss ``(embeddings, labels) -> loss``; one that
            declares ``returns_details`` is called with ``return_details=True``.
        autocast_dtype: bf16 / fp16 autocast for the model forward (the losses
            compute in float32 themselves), or None.
        memory: a cross-batch memory (``loss.memory=xbm``): in training, the loss of the
            batch against the batch and the memory joins the batch loss, and the batch is
            enqueued (:class:`~softmine.losses.memory.CrossBatchMemory`).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        autocast_dtype: torch.dtype | None = None,
        memory: CrossBatchMemory | None = None,
    ):
        super().__init__()
        self.model, self.loss_fn, self.memory = model, loss_fn, memory
        self.autocast_dtype = autocast_dtype
        self.offers: FeatureInfo = offers_of(model)
        self.needs: LossNeeds = needs_of(loss_fn)

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        ctx = (
            torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else nullcontext()
        )
        model_details: dict[str, Tensor] = {}
        kwargs: dict[str, dict[str, Tensor]] = {}
        with ctx:
            if self.needs.requires:
                args = (x, y) if self.offers.per_frame else (x,)
                emb, model_details = self.model.forward_features(*args)
                feats = {k: model_details[k] for k in self.needs.requires}
                if self.offers.per_frame and not self.needs.per_frame:
                    feats = {
                        k: model_details["tracklet"] if k == "embedding" else v.mean(dim=1)
                        for k, v in feats.items()
                    }
                kwargs["features"] = {k: gather_with_grad(to_float32(v)) for k, v in feats.items()}
            elif self.offers.per_frame:
                emb, model_details = self.model(x, y, return_details=True)
            else:
                emb = self.model(x)
        emb_all = gather_with_grad(to_float32(emb))  # half from autocast -> float32; float64 kept
        y_all = gather_tensor(y)
        if self.needs.returns_details:
            loss, details = self.loss_fn(emb_all, y_all, return_details=True, **kwargs)
        else:
            loss, details = self.loss_fn(emb_all, y_all, **kwargs), {}
        if self.memory is not None and self.training and torch.is_grad_enabled():
            loss, details = self.memory(self.loss_fn, loss, details, emb_all, y_all)
        details = dict(details)
        details["labels"] = y_all
        if self.offers.frame_loss:
            frame_ce = mean_over_ranks(self.model.frame_loss(model_details, y))
            loss = loss + frame_ce
            details["frame_ce"] = frame_ce.detach()
        return loss, details
