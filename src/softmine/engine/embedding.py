"""Compute embeddings of a whole dataset with a model, in batches, without gradients."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from softmine.data.device_transforms import PaddedImages
from softmine.runs.signals import ignore_interrupts


def to_model_input(
    x: torch.Tensor | PaddedImages,
    device: torch.device | str | None,
    device_transform: Callable[[Any], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Move a batch to ``device``, apply ``device_transform`` there; uint8 images become floats in [0, 1].

    The conversion happens after the copy, on the device, so workers collate and
    copy 4x fewer bytes. ``device_transform`` (the dataset's, e.g.
    :class:`~softmine.data.device_transforms.DeviceResizedCrop`) augments the
    moved batch, such as the :class:`PaddedImages` of whole cached images.
    """
    if device is not None:
        x = x.to(device, non_blocking=True)
    if device_transform is not None:
        x = device_transform(x)
    if not x.is_floating_point():
        x = x.float().div_(255.0)
    return x


@torch.no_grad()
def extract_embeddings(
    model: nn.Module,
    dataset: Dataset,
    *,
    device: torch.device,
    batch_size: int = 256,
    num_workers: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings float32 (n, d), labels int64 (n,)) of every item, in dataset order."""
    was_training = model.training
    model.eval()
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        worker_init_fn=ignore_interrupts,
    )
    feats, labels = [], []
    for x, y in loader:
        feats.append(model(to_model_input(x, device)).float().cpu())
        labels.append(torch.as_tensor(y))
    model.train(was_training)
    return torch.cat(feats).numpy(), torch.cat(labels).numpy().astype(np.int64)


@torch.no_grad()
def extract_reid_embeddings(
    model: nn.Module,
    dataset: Dataset,
    *,
    device: torch.device,
    frame_batch_size: int = 64,
    num_workers: int = 0,
    batch_size: int = 256,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(embeddings (n, d), pids (n,), camids (n,)) of a re-ID query or gallery set.

    Items are ``(input, pid, camid)``. Image sets (no ``tracklets`` attribute) are
    embedded by ``model`` in batches of ``batch_size``. Video clips, (T, C, H, W) or
    chunked (N, T, C, H, W) whole tracklets, are embedded frame by frame in batches of
    ``frame_batch_size`` and pooled over the real frames of the tracklet (chunk padding
    dropped) with the model's test-time pooling (mean or max), then L2-normalised: a
    920-frame tracklet never has to fit at once.
    """
    import torch.nn.functional as F

    from softmine.evaluation.video import pool_tracklet_features

    indices = dataset.indices if isinstance(dataset, Subset) else range(len(dataset))
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    tracklets = getattr(base, "tracklets", None)
    if tracklets is None:
        return _embed_image_triples(model, dataset, device, batch_size, num_workers)
    was_training = model.training
    model.eval()
    frame_fn = getattr(model, "frame_embeddings", None)
    mode = getattr(model, "eval_pooling", "mean")
    if mode not in ("mean", "max"):
        mode = "mean"
    indices = dataset.indices if isinstance(dataset, Subset) else range(len(dataset))
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    tracklets = getattr(base, "tracklets", None)
    loader = DataLoader(
        dataset,
        batch_size=1,
        shuffle=False,
        num_workers=num_workers,
        worker_init_fn=ignore_interrupts,
    )
    feats, pids, camids = [], [], []
    for i, (x, pid, camid) in zip(indices, loader, strict=True):
        x = x[0]
        if x.dim() == 3:  # one image
            feats.append(model(to_model_input(x[None], device)).float().cpu()[0])
        else:
            frames = x.flatten(0, 1) if x.dim() == 5 else x
            if tracklets is not None and x.dim() == 5:
                frames = frames[: len(tracklets[i][0])]
            fn = frame_fn if frame_fn is not None else model
            pooled = pool_tracklet_features(
                lambda f, fn=fn: fn(to_model_input(f, device)), frames, frame_batch_size, mode
            )
            feats.append(F.normalize(pooled, dim=0).cpu())
        pids.append(int(pid))
        camids.append(int(camid))
    model.train(was_training)
    return (
        torch.stack(feats).numpy(),
        np.asarray(pids, dtype=np.int64),
        np.asarray(camids, dtype=np.int64),
    )


def _embed_image_triples(
    model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int, num_workers: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(embeddings, pids, camids) of a set of ``(image, pid, camid)`` items, in batches."""
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    feats, pids, camids = [], [], []
    for x, pid, camid in loader:
        feats.append(model(to_model_input(x, device)).float().cpu())
        pids.append(torch.as_tensor(pid))
        camids.append(torch.as_tensor(camid))
    model.train(was_training)
    return (
        torch.cat(feats).numpy(),
        torch.cat(pids).numpy().astype(np.int64),
        torch.cat(camids).numpy().astype(np.int64),
    )


def raw_inputs(dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Flattened raw inputs and labels of every item: the 'raw pixels' baseline."""
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    x = torch.stack([torch.as_tensor(v) for v in xs]).flatten(1).float().numpy()
    return x, np.asarray(ys, dtype=np.int64)
