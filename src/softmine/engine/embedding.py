"""Run a model over a dataset to get embeddings: the one path every caller takes.

:func:`embed_batches` runs a model over a loader (any iterable of batches): eval
mode (the previous mode restored afterwards), no gradients, optional autocast
precision, optional mirror-image averaging, and optional pooling of frame
features into one feature per tracklet. Everything else here builds a loader
for it: :func:`extract_embeddings` (evaluation during training, validation,
end-of-run plots), :func:`extract_reid_embeddings` (re-ID query and gallery
sets, images or video tracklets), :func:`pool_tracklet_features` and
:func:`extract_tracklet_features` (video re-ID); ``softmine-embed``
(:mod:`softmine.inference.extract`) calls it directly.

Tracklet pooling: a tracklet's feature is the mean (default) or the element-wise
max of its frame features. Frames are embedded a batch at a time and pooled as
they come (running sum / running max, in float64), so a 920-frame MARS tracklet
never has to be in memory, or on the GPU, all at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from softmine.data.device_transforms import PaddedImages
from softmine.errors import ConfigError, DataError
from softmine.runs.signals import ignore_interrupts

PoolMode = Literal["mean", "max"]
POOL_MODES = ("mean", "max")
Embed = Callable[[torch.Tensor], torch.Tensor]
#: A tracklet as video datasets list them: (frame paths, person id, camera id).
Tracklet = tuple[Sequence[str], int, int]


class Embedded(NamedTuple):
    """What :func:`embed_batches` returns: float32 (n, d) embeddings and the batches' other fields."""

    embeddings: np.ndarray
    fields: tuple[np.ndarray, ...]


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


@contextmanager
def inference(model: nn.Module | Embed) -> Iterator[None]:
    """No gradients, and a model in eval mode; its previous mode is restored afterwards, errors included."""
    was_training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            model.train()


@contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """Mixed-precision autocast on ``device`` when ``dtype`` is set; nothing for float32."""
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def check_pool_mode(mode: str) -> None:
    """A :class:`ConfigError` unless ``mode`` is one of :data:`POOL_MODES`."""
    if mode not in POOL_MODES:
        raise ConfigError(f"unknown tracklet pooling {mode!r}; use one of {POOL_MODES}")


def embed_batches(
    model: nn.Module | Embed,
    batches: Iterable[Any],
    *,
    device: torch.device | str | None = None,
    precision: torch.dtype | None = None,
    flip: bool = False,
    normalize: bool = False,
    pool: PoolMode | None = None,
    forward: Embed | None = None,
    device_transform: Callable[[Any], torch.Tensor] | None = None,
) -> Embedded:
    """Run ``model`` over ``batches``: the embeddings (float32, on the CPU) and the batches' other fields.

    A batch is an input tensor, or a sequence ``(inputs, *fields)`` such as a
    DataLoader's ``(images, labels)``; the fields (labels, ids, cameras, positions)
    come back concatenated, one numpy array per field. Inputs go through
    :func:`to_model_input` (``device``, ``device_transform``, uint8 to [0, 1]) and
    ``forward`` (default: ``model`` itself), under autocast to ``precision`` when set.
    ``model`` is in eval mode without gradients throughout and gets its previous
    mode back afterwards.

    Args:
        flip: average each embedding with that of the mirrored input (last axis).
        normalize: L2-normalise every output row (after the flip average or the pooling).
        pool: ``mean`` | ``max``: the inputs are frames and a batch is
            ``(frames, owner, *fields)``, ``owner`` the (b,) index of each frame's
            tracklet, non-decreasing across the batches (a tracklet may span
            batches, a batch may span tracklets). Each tracklet's frame features
            are pooled in float64 as they come; one row per tracklet comes back,
            with the fields of its first frame.
    """
    if pool is not None:
        check_pool_mode(pool)
    fn = model if forward is None else forward
    rows: list[torch.Tensor] = []
    fields: list[list[torch.Tensor]] | None = None
    pooled = _Pooled(pool, normalize) if pool is not None else None
    with inference(model):
        for batch in batches:
            x, *rest = (batch,) if isinstance(batch, torch.Tensor) else batch
            if len(x) == 0:
                continue
            z = _forward(fn, x, device, device_transform, precision, flip)
            rest = [torch.as_tensor(f) for f in rest]
            if pooled is not None:
                owner, *rest = rest
                done, starts = pooled.add(z, owner)
                rows.extend(done)
                rest = [f[starts] for f in rest]
            else:
                rows.append((F.normalize(z, dim=1) if normalize else z).cpu())
            fields = [[] for _ in rest] if fields is None else fields
            for kept, f in zip(fields, rest, strict=True):
                kept.append(f.cpu())
        if pooled is not None:
            rows.extend(pooled.finish())
    if not rows:
        return Embedded(np.zeros((0, 0), dtype=np.float32), ())
    stack = torch.stack if pooled is not None else torch.cat
    return Embedded(stack(rows).numpy(), tuple(torch.cat(f).numpy() for f in fields or ()))


def _forward(
    fn: Embed,
    x: torch.Tensor,
    device: torch.device | str | None,
    device_transform: Callable[[Any], torch.Tensor] | None,
    precision: torch.dtype | None,
    flip: bool,
) -> torch.Tensor:
    """(b, d) float32 embeddings of one input batch (the mean with its mirror image under ``flip``)."""
    x = to_model_input(x, device, device_transform)
    with autocast(x.device, precision):
        z = fn(x).float()
        if flip:
            z = (z + fn(x.flip(-1)).float()) / 2
    if z.ndim != 2 or z.shape[0] != x.shape[0]:
        raise ValueError(
            f"the model must map a batch of {x.shape[0]} inputs to ({x.shape[0]}, d) "
            f"embeddings, got shape {tuple(z.shape)}"
        )
    return z


class _Pooled:
    """The running mean or max of the frame features of tracklets that arrive in order."""

    def __init__(self, mode: PoolMode, normalize: bool) -> None:
        self.mode, self.normalize = mode, normalize
        self.owner: int | None = None
        self.acc: torch.Tensor | None = None
        self.count = 0

    def add(self, z: torch.Tensor, owner: torch.Tensor) -> tuple[list[torch.Tensor], list[int]]:
        """Pool a batch of frame features; (the tracklets it completed, positions where new ones start)."""
        z = z.double()
        done: list[torch.Tensor] = []
        starts: list[int] = []
        ids, counts = torch.unique_consecutive(owner.cpu(), return_counts=True)
        start = 0
        for o, n in zip(ids.tolist(), counts.tolist(), strict=True):
            seg = z[start : start + n]
            part = seg.sum(0) if self.mode == "mean" else seg.amax(0)
            if o == self.owner and self.acc is not None:
                self.acc = self.acc + part if self.mode == "mean" else torch.maximum(self.acc, part)
                self.count += n
            elif self.owner is not None and o < self.owner:
                raise ValueError(
                    f"frames of tracklet {o} came after those of tracklet {self.owner}; "
                    "give each tracklet's frames together, tracklets in order"
                )
            else:
                done.extend(self.finish())
                starts.append(start)
                self.owner, self.acc, self.count = o, part, n
            start += n
        return done, starts

    def finish(self) -> list[torch.Tensor]:
        """The open tracklet's (d,) float32 feature on the CPU (none when no tracklet is open)."""
        if self.acc is None:
            return []
        feature = (self.acc / self.count if self.mode == "mean" else self.acc).float()
        if self.normalize:
            feature = F.normalize(feature, dim=0)
        self.owner, self.acc, self.count = None, None, 0
        return [feature.cpu()]


def _in_order(dataset: Dataset, batch_size: int, num_workers: int) -> DataLoader:
    """A loader of ``dataset`` in order; its workers ignore SIGINT/SIGTERM (:func:`ignore_interrupts`)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        worker_init_fn=ignore_interrupts,
    )


def extract_embeddings(
    model: nn.Module,
    dataset: Dataset,
    *,
    device: torch.device,
    batch_size: int = 256,
    num_workers: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings float32 (n, d), labels int64 (n,)) of every item, in dataset order."""
    loader = _in_order(dataset, batch_size, num_workers)
    embeddings, (labels,) = embed_batches(model, loader, device=device)
    return embeddings, labels.astype(np.int64)


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
    ``frame_batch_size`` (by the model's ``frame_embeddings`` when it has them) and
    pooled over the real frames of the tracklet (chunk padding dropped) with the
    model's test-time pooling (mean or max), then L2-normalised: a 920-frame
    tracklet never has to fit at once.
    """
    indices = dataset.indices if isinstance(dataset, Subset) else range(len(dataset))
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    tracklets = getattr(base, "tracklets", None)
    if tracklets is None:
        loader = _in_order(dataset, batch_size, num_workers)
        embeddings, (pids, camids) = embed_batches(model, loader, device=device)
        return embeddings, pids.astype(np.int64), camids.astype(np.int64)
    mode = getattr(model, "eval_pooling", "mean")
    if mode not in POOL_MODES:
        mode = "mean"
    loader = _in_order(dataset, 1, num_workers)
    lengths = [len(tracklets[i][0]) for i in indices]
    embeddings, (pids, camids) = embed_batches(
        model,
        _tracklet_frames(loader, lengths, frame_batch_size),
        device=device,
        pool=mode,
        normalize=True,
        forward=getattr(model, "frame_embeddings", None),
    )
    return embeddings, pids.astype(np.int64), camids.astype(np.int64)


def _tracklet_frames(
    loader: Iterable[Any], lengths: Sequence[int], frame_batch_size: int
) -> Iterator[tuple[torch.Tensor, ...]]:
    """``(frames, owner, pids, camids)`` batches of one tracklet at a time, its chunk padding dropped.

    ``loader`` gives one ``(clip, pid, camid)`` item a batch; a chunked clip
    (N, T, C, H, W) is cut to the ``lengths[i]`` real frames of its tracklet.
    """
    if frame_batch_size < 1:
        raise ConfigError(f"evaluation.frame_batch_size must be >= 1, got {frame_batch_size}")
    for i, ((x, pid, camid), n) in enumerate(zip(loader, lengths, strict=True)):
        x = x[0]
        if x.dim() == 3:  # one image: a one-frame tracklet
            x = x[None]
        elif x.dim() == 5:
            x = x.flatten(0, 1)[:n]
        for frames in x.split(frame_batch_size):
            k = len(frames)
            yield (
                frames,
                torch.full((k,), i),
                torch.as_tensor(pid).expand(k),
                torch.as_tensor(camid).expand(k),
            )


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
    check_pool_mode(mode)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    parts = frames.split(batch_size) if isinstance(frames, torch.Tensor) else frames
    batches = ((b, torch.zeros(len(b), dtype=torch.int64)) for b in parts)
    embeddings, _ = embed_batches(embed, batches, device=device, pool=mode)
    if len(embeddings) == 0:
        raise DataError("the tracklet has no frames; every tracklet needs at least one")
    return torch.from_numpy(embeddings[0])


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
    check_pool_mode(mode)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    empty = [i for i, (frames, _, _) in enumerate(tracklets) if len(frames) == 0]
    if empty:
        raise DataError(f"{len(empty)} tracklet(s) have no frames (first: index {empty[0]})")
    if not tracklets:
        raise DataError("no tracklets to embed")
    pids = np.asarray([t[1] for t in tracklets], dtype=np.int64)
    camids = np.asarray([t[2] for t in tracklets], dtype=np.int64)
    loader = _in_order(_Frames(tracklets, load_frame), batch_size, num_workers)
    embeddings, _ = embed_batches(embed, loader, device=device, pool=mode)
    return embeddings, pids, camids


def raw_inputs(dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Flattened raw inputs and labels of every item: the 'raw pixels' baseline."""
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    x = torch.stack([torch.as_tensor(v) for v in xs]).flatten(1).float().numpy()
    return x, np.asarray(ys, dtype=np.int64)
