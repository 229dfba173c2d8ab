"""The training objective as one module, so DDP synchronises model and loss parameters together."""

from __future__ import annotations

import inspect
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from softmine.engine.distributed import gather_tensor, gather_with_grad, mean_over_ranks
from softmine.losses.pairwise import to_float32


class Objective(nn.Module):
    """batch -> embeddings -> (global batch) -> loss, plus the video frame-classifier loss.

    Under torch.distributed the embeddings and labels of all ranks are gathered
    (differentiably) before the loss, so every rank computes the loss of the whole
    global batch. The video frame cross-entropy is a mean over this rank's frames;
    its value is averaged over ranks (the global batch's value, the same on every
    rank), and DDP's gradient averaging gives the global batch's gradient.

    A loss with classifier heads on named backbone features declares them in
    ``loss_fn.feature_names``; the objective then runs ``model.forward_features`` and
    hands those features (gathered like the embeddings, half precision promoted to
    float32) to ``loss_fn(..., features=...)``. A video model's features are per frame,
    (B, T, dim); a loss that declares ``frame_features = True`` gets them so, any other
    loss gets tracklet-level ones: ``embedding`` is the pooled tracklet feature before L2
    normalisation and every other feature is averaged over the frames.

    Args:
        model: the embedding network; a video model (with ``frame_loss``) is called
            with the labels so it can pool frames with class-aware attention.
        loss_fn: a metric-learning loss ``(embeddings, labels) -> loss``, optionally
            accepting ``return_details=True``.
        autocast_dtype: bf16 / fp16 autocast for the model forward (the losses
            compute in float32 themselves), or None.
    """

    def __init__(
        self, model: nn.Module, loss_fn: nn.Module, autocast_dtype: torch.dtype | None = None
    ):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn
        self.autocast_dtype = autocast_dtype
        self.video = hasattr(model, "frame_loss")
        self.loss_details = "return_details" in inspect.signature(loss_fn.forward).parameters
        self.feature_names = sorted(getattr(loss_fn, "feature_names", ()) or ())
        self.frame_features = bool(getattr(loss_fn, "frame_features", False))

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        ctx = (
            torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else nullcontext()
        )
        model_details: dict[str, Tensor] = {}
        kwargs: dict[str, dict[str, Tensor]] = {}
        with ctx:
            if self.feature_names:
                args = (x, y) if self.video else (x,)
                emb, model_details = self.model.forward_features(*args)
                feats = {k: model_details[k] for k in self.feature_names}
                if self.video and not self.frame_features:
                    feats = {
                        k: model_details["tracklet"] if k == "embedding" else v.mean(dim=1)
                        for k, v in feats.items()
                    }
                kwargs["features"] = {k: gather_with_grad(to_float32(v)) for k, v in feats.items()}
            elif self.video:
                emb, model_details = self.model(x, y, return_details=True)
            else:
                emb = self.model(x)
        emb_all = gather_with_grad(to_float32(emb))  # half from autocast -> float32; float64 kept
        y_all = gather_tensor(y)
        if self.loss_details:
            loss, details = self.loss_fn(emb_all, y_all, return_details=True, **kwargs)
        else:
            loss, details = self.loss_fn(emb_all, y_all, **kwargs), {}
        details = dict(details)
        details["labels"] = y_all
        if self.video:
            frame_ce = mean_over_ranks(self.model.frame_loss(model_details, y))
            loss = loss + frame_ce
            details["frame_ce"] = frame_ce.detach()
        return loss, details
