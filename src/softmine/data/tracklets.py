"""Tracklet datasets for video re-identification (MARS, iLIDS-VID, PRID2011): the shared half.

A tracklet is ``(frame paths in temporal order, pid, camid)``. An item is a clip
of ``seq_len`` frames chosen by the ``sampling`` rule (:func:`clip_indices`):

* ``evenly``: the frames at the centres of ``seq_len`` equal segments of the
  tracklet (deterministic; a short tracklet repeats frames, in order);
* ``random``: ``seq_len`` distinct frames drawn uniformly and sorted; a
  tracklet shorter than ``seq_len`` is drawn with replacement (then sorted);
  uses torch's global generator, which in training is seeded per item
  (:class:`softmine.data.run_batches.SeededItems`);
* ``all``: every frame, cut into consecutive chunks of ``seq_len``; the last
  chunk is padded by repeating the last frame. The item is then
  ``(num_chunks, seq_len, C, H, W)``; the true length of tracklet ``i`` is
  ``len(dataset.tracklets[i][0])``, so an evaluator can drop the padding before
  pooling frame features. Chunks differ in number, so load with batch size 1.

What an item is (the choice documented here, relied on by the trainer):

* ``train`` split: ``(clip, label)`` with ``label`` the identity remapped to
  ``0..C-1`` (what the loss and the P x K sampler need);
* ``query`` / ``gallery``: ``(clip, pid, camid)`` with the published identity
  number (``0`` = MARS distractor) and the 0-based camera index, what the
  re-ID evaluation needs.

``clip`` is ``(seq_len, C, H, W)`` (or ``(num_chunks, seq_len, C, H, W)`` for
``all``): uint8 without a transform; with one, the transform is called ONCE on
the whole clip as a ``torchvision.tv_tensors.Video``, so every frame of a clip
gets the same random crop / flip / erasing (torchvision.transforms.v2
transforms accept videos). Frames of one tracklet with differing sizes are
resized to the first frame's size before stacking.

A frame that cannot be read is a :class:`~softmine.data.images.BadImageError`
under ``on_bad_image=error``; under ``skip`` the nearest readable frame of the
same tracklet replaces it (the tracklet's own pixels, in training and evaluation
alike) and the path is added to ``bad_images``. Evaluation leaves out a tracklet
none of whose frames is readable (:mod:`softmine.data.file_check`).

With ``cache=ram|disk`` every frame of the split is decoded once into a
:mod:`softmine.data.cache`, resized to ``cache_size`` (the training size, (height,
width), by default 256 x 128); clips are then cut from the cached arrays.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from softmine.data.images import (
    BadImageError,
    FileDataset,
    cached_image,
    note_bad_image,
    read_image,
)
from softmine.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SAMPLINGS = ("evenly", "random", "all")
VIDEO_SPLITS = ("train", "query", "gallery")

Tracklet = tuple[tuple[str, ...], int, int]


def clip_indices(num_frames: int, seq_len: int, sampling: str) -> np.ndarray:
    """Frame indices of one clip: shape (seq_len,), or (num_chunks, seq_len) for ``all``.

    See the module docstring for the three rules. Indices are always in
    non-decreasing temporal order.
    """
    n, t = int(num_frames), int(seq_len)
    if n < 1:
        raise ValueError("a tracklet needs at least one frame")
    if sampling == "evenly":
        return ((np.arange(t) + 0.5) * n / t).astype(np.int64)
    if sampling == "random":
        if n >= t:
            idx = torch.randperm(n)[:t]
        else:
            idx = torch.randint(0, n, (t,))
        return np.sort(idx.numpy()).astype(np.int64)
    if sampling == "all":
        chunks = -(-n // t)
        return np.minimum(np.arange(chunks * t), n - 1).reshape(chunks, t)
    raise ConfigError(f"clip sampling must be one of {SAMPLINGS}, got {sampling!r}")


def relabel(pids: Sequence[int]) -> np.ndarray:
    """Identities mapped to 0..C-1 in ascending pid order."""
    arr = np.asarray(pids, dtype=np.int64)
    return np.searchsorted(np.unique(arr), arr)


class VideoDataset(FileDataset):
    """Tracklets -> clips. Subclasses parse their layout and call :meth:`_setup`.

    Attributes:
        tracklets: ``(frame paths, pid, camid)`` per item.
        pids: published identity of every tracklet, int64 (n,).
        camids: 0-based camera of every tracklet, int64 (n,).
        labels: ``train``: identities remapped to 0..C-1; otherwise equal to ``pids``.
        bad_images: frame paths skipped under ``on_bad_image=skip`` (in this process).
        cache: the decoded frames (``cache=ram|disk``), or None.
    """

    def __init__(
        self,
        split: str,
        seq_len: int,
        sampling: str | None,
        transform: Callable[[Any], Any] | None,
        on_bad_image: str,
        cache: str = "none",
        cache_size: int | Sequence[int] = (256, 128),
        cache_dir: str | Path | None = None,
    ) -> None:
        if split not in VIDEO_SPLITS:
            raise ConfigError(
                f"{self.source.name} split must be one of {VIDEO_SPLITS}, got {split!r}"
            )
        if int(seq_len) < 1:
            raise ConfigError(f"dataset seq_len must be >= 1, got {seq_len}")
        sampling = sampling or ("random" if split == "train" else "all")
        if sampling not in SAMPLINGS:
            raise ConfigError(f"clip sampling must be one of {SAMPLINGS}, got {sampling!r}")
        self.split, self.seq_len, self.sampling = split, int(seq_len), sampling
        super().__init__(transform, on_bad_image, cache, cache_size, cache_dir)

    def _setup(self, tracklets: Sequence[Tracklet]) -> None:
        if not tracklets:
            raise DataError(f"{self.source.name}: the {self.split} split has no tracklets")
        self.tracklets = list(tracklets)
        self.pids = np.array([t[1] for t in self.tracklets], dtype=np.int64)
        self.camids = np.array([t[2] for t in self.tracklets], dtype=np.int64)
        self._labels = relabel(self.pids) if self.split == "train" else self.pids
        if self.cache_options.mode != "none":
            files = list(dict.fromkeys(f for t in self.tracklets for f in t[0]))
            position = {f: k for k, f in enumerate(files)}
            self._cache_ids = [np.array([position[f] for f in t[0]]) for t in self.tracklets]
            self.cache = self.cache_options.build(self, [(f, None) for f in files])

    @property
    def labels(self) -> np.ndarray:
        """Label of every tracklet, shape (n,): contiguous 0..C-1 for ``train``, else the pid."""
        return self._labels

    @property
    def num_classes(self) -> int:
        """Number of distinct identities in this split."""
        return len(np.unique(self.pids))

    def __len__(self) -> int:
        return len(self.tracklets)

    def _read(self, i: int, k: int) -> torch.Tensor:
        """Frame ``k`` of tracklet ``i`` as uint8 (3, H, W), from the cache when there is one."""
        path = self.tracklets[i][0][k]
        if self.cache is not None:
            return cached_image(self.cache, int(self._cache_ids[i][k]), path)
        return read_image(path)

    def _frame(self, i: int, j: int) -> torch.Tensor:
        """Frame ``j`` of tracklet ``i`` as uint8 (3, H, W); under ``skip`` the nearest readable one."""
        frames = self.tracklets[i][0]
        order = [j] if self.on_bad_image == "error" else _nearest_first(j, len(frames))
        for k in order:
            path = frames[k]
            if k != j and path in self.bad_images:
                continue
            try:
                return self._read(i, k)
            except BadImageError as e:
                if self.on_bad_image == "error":
                    raise
                note_bad_image(self, path, "frame", e.reason)
        raise DataError(f"{self.source.name}: no readable frame in the tracklet of {frames[0]}")

    def load_clip(self, i: int) -> torch.Tensor:
        """Item ``i``'s clip before the transform: uint8 (T, 3, H, W) or (N, T, 3, H, W)."""
        frames = self.tracklets[i][0]
        idx = clip_indices(len(frames), self.seq_len, self.sampling)
        unique, inverse = np.unique(idx, return_inverse=True)
        loaded = [self._frame(i, int(k)) for k in unique]
        size = loaded[0].shape[-2:]
        if any(f.shape[-2:] != size for f in loaded):
            from torchvision.transforms.v2.functional import resize

            loaded = [f if f.shape[-2:] == size else resize(f, list(size)) for f in loaded]
        return torch.stack(loaded)[torch.from_numpy(inverse.reshape(idx.shape))]

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        """``train``: (clip, label); ``query``/``gallery``: (clip, pid, camid)."""
        from torchvision import tv_tensors

        clip = self.load_clip(i)
        if self.transform is not None:
            lead = clip.shape[:-3]
            video = tv_tensors.Video(clip.reshape(-1, *clip.shape[-3:]))
            out = torch.as_tensor(self.transform(video)).as_subclass(torch.Tensor)
            clip = out.reshape(*lead, *out.shape[-3:])
        _, pid, camid = self.tracklets[i]
        if self.split == "train":
            return clip, int(self._labels[i])
        return clip, pid, camid


def _nearest_first(j: int, n: int) -> list[int]:
    """0..n-1 ordered by distance to j (j first, then j+1, j-1, j+2, ...)."""
    return sorted(range(n), key=lambda k: (abs(k - j), k < j))
