"""Video re-ID: one feature per tracklet, pooled over the features of its frames.

A tracklet's feature is the mean (default) or the element-wise max of its frame
features. Frames are embedded ``batch_size`` at a time and pooled as they come
(running sum / running max), so a 920-frame MARS tracklet never has to be in
memory, or on the GPU, all at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from softmine.errors import ConfigError, DataError

PoolMode = Literal["mean", "max"]
POOL_MODES = ("mean", "max")
Embed = Callable[[torch.Tensor], torch.Tensor]
#: A tracklet as video datasets list them: (frame paths, person id, camera id).
Tracklet = tuple[Sequence[str], int, int]


def _check_mode(mode: str) -> None:
    if mode not in POOL_MODES:
        raise ConfigError(f"unknown tracklet pooling {mode!r}; use one of {POOL_MODES}")


@contextmanager
def _inference(embed: Embed) -> Iterator[None]:
    """No gradients, and a model in eval mode (its previous mode restored afterwards)."""
    was_training = isinstance(embed, nn.Module) and embed.training
    if isinstance(embed, nn.Module):
        embed.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            embed.train()


def _batches(
    frames: torch.Tensor | Iterable[torch.Tensor], batch_size: int
) -> Iterable[torch.Tensor]:
    if isinstance(frames, torch.Tensor):
        return frames.split(batch_size)
    return frames


def _embed(embed: Embed, batch: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    feats = embed(batch.to(device) if device is not None else batch)
    if feats.ndim != 2 or feats.shape[0] != batch.shape[0]:
        raise ValueError(
            f"embed must map a batch of {batch.shape[0]} frames to ({batch.shape[0]}, d) "
            f"features, got shape {tuple(feats.shape)}"
        )
    return feats


def pool_tracklet_features(
    embed: Embed,
    frames: torch.Tensor | Iterable[torch.Tensor],
    batch_size: int = 64,
    mode: PoolMode = "mean",
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(d,) float32 feature of one tracklet: the mean or element-wise max of its frames' features.

    ``frames`` is a (T, ...) tensor, embedded ``batch_size`` frames at a time, or any
    iterable of (b, ...) frame batches the caller loads lazily. ``embed`` maps a (b, ...)
    batch to (b, d) features (a model or a function); a model runs in eval mode without
    gradients. Batches are moved to ``device`` when given.
    """
    _check_mode(mode)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    acc: torch.Tensor | None = None
    count = 0
    with _inference(embed):
        for batch in _batches(frames, batch_size):
            if len(batch) == 0:
                continue
            feats = _embed(embed, batch, device).double()
            if mode == "mean":
                part = feats.sum(0)
                acc = part if acc is None else acc + part
            else:
                part = feats.amax(0)
                acc = part if acc is None else torch.maximum(acc, part)
            count += feats.shape[0]
    if acc is None:
        raise DataError("the tracklet has no frames; every tracklet needs at least one")
    return (acc / count if mode == "mean" else acc).float()


class _Frames(Dataset):
    """All frames of all tracklets in order, each with the index of its tracklet."""

    def __init__(self, tracklets: Sequence[Tracklet], load_frame: Callable[[str], torch.Tensor]):
        self.paths = [p for frames, _, _ in tracklets for p in frames]
        self.owner = np.repeat(np.arange(len(tracklets)), [len(f) for f, _, _ in tracklets])
        self.load_frame = load_frame

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.load_frame(self.paths[i]), int(self.owner[i])


def extract_tracklet_features(
    embed: Embed,
    tracklets: Sequence[Tracklet],
    load_frame: Callable[[str], torch.Tensor],
    *,
    batch_size: int = 64,
    mode: PoolMode = "mean",
    device: torch.device | str | None = None,
    num_workers: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features float32 (n, d), pids int64 (n,), camids int64 (n,)) of ``n`` tracklets.

    ``tracklets`` are ``(frame paths, pid, camid)`` triples (the ``.tracklets`` of a video
    dataset); ``load_frame(path)`` returns one frame tensor (C, H, W), already transformed.
    All frames stream through one DataLoader in batches of ``batch_size`` that may span
    tracklets; each batch is embedded and added to its tracklets' running mean or max, so
    memory holds one batch of frames plus the (n, d) result whatever the tracklet lengths.
    """
    _check_mode(mode)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    empty = [i for i, (frames, _, _) in enumerate(tracklets) if len(frames) == 0]
    if empty:
        raise DataError(f"{len(empty)} tracklet(s) have no frames (first: index {empty[0]})")
    n = len(tracklets)
    pids = np.asarray([t[1] for t in tracklets], dtype=np.int64)
    camids = np.asarray([t[2] for t in tracklets], dtype=np.int64)
    loader = DataLoader(
        _Frames(tracklets, load_frame),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
    )
    acc: torch.Tensor | None = None
    counts = torch.zeros(n, dtype=torch.float64)
    with _inference(embed):
        for batch, owner in loader:
            feats = _embed(embed, batch, device).double()
            owner = owner.to(feats.device)
            if acc is None:
                fill = 0.0 if mode == "mean" else -float("inf")
                acc = torch.full(
                    (n, feats.shape[1]), fill, dtype=torch.float64, device=feats.device
                )
                counts = counts.to(feats.device)
            if mode == "mean":
                acc.index_add_(0, owner, feats)
            else:
                acc.scatter_reduce_(0, owner[:, None].expand_as(feats), feats, reduce="amax")
            counts.index_add_(0, owner, torch.ones_like(owner, dtype=torch.float64))
    if acc is None:
        raise DataError("no tracklets to embed")
    if mode == "mean":
        acc = acc / counts[:, None]
    return acc.float().cpu().numpy(), pids, camids
