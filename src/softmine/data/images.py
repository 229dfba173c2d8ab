"""Image reading shared by the real datasets, and the base class of the image sets (CUB, Cars).

Images are decoded to RGB uint8 tensors (3, H, W) by
:func:`softmine.data.decode.read_image` (libjpeg-turbo through torchvision for
JPEG files, Pillow for other formats), so transforms receive tensors: every
torchvision ``transforms.v2`` transform takes them, and a transform written for
Pillow images can start with ``torchvision.transforms.v2.ToPILImage``. An unreadable file is a
:class:`BadImageError` (a :class:`~softmine.errors.DataError`) that names the
file. What a dataset does about it is its ``on_bad_image`` policy:

* ``error`` (default): raise, naming the file;
* ``skip``: the item gives the next readable image of the same class instead
  (cyclically, in dataset order), so a P x K batch keeps its label structure; the
  path is added to the dataset's ``bad_images`` set and logged once. That stand-in
  is for training only: evaluation leaves such an item out altogether
  (:mod:`softmine.data.file_check` finds the items whose file is bad, and the
  evaluator drops them from queries and gallery alike). Files missing at
  construction are dropped up front under ``skip`` (and also recorded).
  ``bad_images`` lives in the process that loads the images (each DataLoader
  worker keeps its own set); every process also appends ``path<TAB>reason`` to the
  file ``bad_image_log`` when one is set, which is how the trainer and the evaluator
  collect the skipped files of all workers.

With ``cache=ram|disk`` every image is decoded once, up front, into a
:mod:`softmine.data.cache` of uint8 arrays resized to ``cache_size``; items then
come from the cache (uint8 tensors (3, H, W) at that size) instead of the files, and the
transforms see exactly what they would have made of the file at that size.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from softmine.data.cache import (
    CACHE_FOLDER,
    ImageCache,
    build_cache,
    check_cache_mode,
    check_cache_size,
)
from softmine.data.decode import (
    BAD_IMAGE_HINT,
    BadImageError,
    Box,
    crop_box,
    file_problem,
    read_image,
)
from softmine.data.sources import Source, missing_files
from softmine.errors import ConfigError, DataError

log = logging.getLogger(__name__)

__all__ = ["BadImageError", "Box", "FileDataset", "ImageDataset", "crop_box", "read_image"]

BAD_IMAGE_POLICIES = ("error", "skip")
IMAGE_SPLITS = ("train", "test")


@dataclass(frozen=True)
class CacheOptions:
    """A dataset's ``cache``, ``cache_size`` and ``cache_dir`` arguments (see :mod:`softmine.data.cache`)."""

    mode: str = "none"
    size: int | tuple[int, int] = 256
    folder: str | None = None

    @classmethod
    def checked(
        cls, mode: str, size: int | Sequence[int], folder: str | Path | None
    ) -> CacheOptions:
        return cls(
            check_cache_mode(mode), check_cache_size(size), None if folder is None else str(folder)
        )

    def build(self, dataset: Any, files: Sequence[tuple[str, Box | None]]) -> ImageCache | None:
        """The cache of ``files`` for ``dataset`` (None for ``none``), in ``<root>/cache`` by default."""
        if self.mode == "none":
            return None
        root = Path(getattr(dataset, "root", "."))
        folder = Path(os.path.expanduser(self.folder)) if self.folder else root / CACHE_FOLDER
        name = f"{type(dataset).__name__.lower()}-{getattr(dataset, 'split', 'all')}"
        return build_cache(
            files,
            self.size,
            self.mode,
            name=name,
            folder=folder,
            root=root,
            on_bad_image=dataset.on_bad_image,
        )


def cached_image(cache: ImageCache, i: int, path: str) -> torch.Tensor:
    """Entry ``i`` of ``cache`` as a uint8 (3, H, W) view; BadImageError for an unreadable file."""
    if cache.bad[i]:
        reason = "found unreadable when the image cache was built"
        raise BadImageError(
            f"cannot decode image {path} ({reason}); {BAD_IMAGE_HINT}", path, reason
        )
    return cache[i].permute(2, 0, 1)


def check_policy(on_bad_image: str) -> str:
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ConfigError(
            f"dataset.on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}"
        )
    return on_bad_image


def check_split(source: Source, split: str, allowed: Sequence[str]) -> str:
    if split not in allowed:
        raise ConfigError(f"{source.name} split must be one of {tuple(allowed)}, got {split!r}")
    return split


def note_bad_image(dataset: Any, path: str, what: str, reason: str = "") -> None:
    """Record a skipped file once: in ``dataset.bad_images``, the log, and ``dataset.bad_image_log``.

    ``bad_image_log`` (a file path the trainer or evaluator sets, or None) collects the
    skipped paths of every DataLoader worker process, ``path<TAB>reason`` per line, so
    the run can count and report them.
    """
    if path in dataset.bad_images:
        return
    dataset.bad_images.add(path)
    log.warning("%s: skipping unreadable %s %s (%s)", dataset.source.name, what, path, reason)
    log_file = getattr(dataset, "bad_image_log", None)
    if log_file:
        with open(log_file, "a") as f:
            f.write(f"{path}\t{reason}\n")


class FileDataset(Dataset):
    """What every reader of image files holds: its transform, bad-image policy and record, cache.

    The base of :class:`ImageDataset` and :class:`~softmine.data.tracklets.VideoDataset`; a
    reader passes its loading options (``on_bad_image``, ``cache``, ``cache_size``,
    ``cache_dir``) here and only parses its layout.

    Attributes:
        transform: applied to every item's image (or clip), or None.
        on_bad_image: ``error`` | ``skip`` (see the module docstring).
        bad_images: paths skipped under ``on_bad_image=skip`` (in this process).
        bad_image_log: a file each process appends skipped paths to, or None.
        cache_options: the checked ``cache``, ``cache_size`` and ``cache_dir``.
        cache: the decoded images (``cache=ram|disk``) once the subclass built it, else None.
    """

    source: ClassVar[Source]

    def __init__(
        self,
        transform: Callable[[Any], Any] | None,
        on_bad_image: str,
        cache: str = "none",
        cache_size: int | Sequence[int] = 256,
        cache_dir: str | Path | None = None,
    ) -> None:
        self.transform = transform
        self.on_bad_image = check_policy(on_bad_image)
        self.bad_images: set[str] = set()
        self.bad_image_log: str | None = None
        self.cache_options = CacheOptions.checked(cache, cache_size, cache_dir)
        self.cache: ImageCache | None = None


class ImageDataset(FileDataset):
    """Labelled image files with an optional crop box each; the shared half of CUB200 and Cars196.

    Subclasses parse their index files, then call :meth:`_setup` with
    ``(path, class_id)`` pairs. Labels are the class ids remapped to ``0..C-1`` in
    ascending class-id order, so ``labels`` is contiguous in every split (what the
    trainer needs); ``classes[label]`` gives the published class id back.

    Attributes:
        samples: ``(image path, label)`` per item, in the dataset's published order.
        labels: int64 array of the labels, shape (n,).
        classes: published class ids (1-based) of labels ``0..C-1``.
        class_names: published class names of labels ``0..C-1``.
        boxes: crop box (left, top, right, bottom) per item, or None when not cropping.
        bad_images: paths skipped under ``on_bad_image=skip`` (in this process).
        cache: the decoded images (``cache=ram|disk``), or None.
    """

    def _setup(
        self,
        items: Sequence[tuple[str, int]],
        boxes: Sequence[Box] | None,
        class_names: dict[int, str],
        listed_in: str,
    ) -> None:
        """Check the files exist, drop or reject missing ones, remap class ids to 0..C-1."""
        missing = [i for i, (p, _) in enumerate(items) if not os.path.isfile(p)]
        if missing and self.on_bad_image == "error":
            links = [items[i][0] for i in missing if os.path.islink(items[i][0])]
            if links:  # a symlink loop or a dangling link: not an incomplete download
                problem = file_problem(links[0]) or "unreadable link"
                raise BadImageError(
                    f"image file {links[0]} is a {problem}"
                    + (f" ({len(links)} such links)" if len(links) > 1 else "")
                    + "; fix the link, or set data.on_bad_image=skip to leave it out",
                    links[0],
                    problem,
                )
            raise missing_files(self.source, [items[i][0] for i in missing], listed_in)
        if missing:
            log.warning(
                "%s: skipping %d missing image file(s), e.g. %s",
                self.source.name,
                len(missing),
                items[missing[0]][0],
            )
            self.bad_images.update(items[i][0] for i in missing)
            keep = sorted(set(range(len(items))) - set(missing))
            items = [items[i] for i in keep]
            boxes = None if boxes is None else [boxes[i] for i in keep]
        if not items:
            raise DataError(f"{self.source.name}: the {self.split} split has no images")
        class_ids = np.array([c for _, c in items], dtype=np.int64)
        self.classes = np.unique(class_ids)
        self.class_names = [class_names.get(int(c), str(c)) for c in self.classes]
        labels = np.searchsorted(self.classes, class_ids)
        self.samples = [(p, int(y)) for (p, _), y in zip(items, labels, strict=True)]
        self.boxes = None if boxes is None else list(boxes)
        self._labels = labels
        order = np.argsort(labels, kind="stable")
        self._class_members = np.split(order, np.cumsum(np.bincount(labels))[:-1])
        boxes = self.boxes or [None] * len(self.samples)
        files = [(p, b) for (p, _), b in zip(self.samples, boxes, strict=True)]
        self.cache = self.cache_options.build(self, files)

    @property
    def labels(self) -> np.ndarray:
        """Integer label of every sample, shape (n,), contiguous 0..C-1."""
        return self._labels

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int) -> torch.Tensor:
        """The (cropped) RGB image of item ``i``, uint8 (3, H, W); raises BadImageError naming the file.

        Decoded from the file, or with a cache a view of the cached image.
        """
        if self.cache is not None:
            return cached_image(self.cache, i, self.samples[i][0])
        box = None if self.boxes is None else self.boxes[i]
        return read_image(self.samples[i][0], box)

    def _load_or_substitute(self, i: int) -> torch.Tensor:
        try:
            return self.load(i)
        except BadImageError as e:
            if self.on_bad_image == "error":
                raise
            self._record_bad(i, e.reason)
        members = self._class_members[self.samples[i][1]]
        start = int(np.searchsorted(members, i))
        for j in np.roll(members, -start - 1)[:-1]:
            if self.samples[int(j)][0] in self.bad_images:
                continue
            try:
                return self.load(int(j))
            except BadImageError as e:
                self._record_bad(int(j), e.reason)
        raise DataError(
            f"{self.source.name}: no readable image left in class "
            f"{self.class_names[self.samples[i][1]]!r} ({len(members)} files, "
            f"e.g. {self.samples[i][0]})"
        )

    def _record_bad(self, i: int, reason: str = "") -> None:
        note_bad_image(self, self.samples[i][0], "image", reason)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        """(image, label): the uint8 RGB image (3, H, W), or what ``transform`` makes of it."""
        img = self._load_or_substitute(i)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.samples[i][1]
