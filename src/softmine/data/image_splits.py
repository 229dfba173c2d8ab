"""Image sets with train / test / query / gallery splits: In-Shop, image folders and CSV lists.

The shared half of the image datasets whose evaluation may rank a separate gallery
(:class:`~softmine.data.datasets.inshop.InShop`, :class:`~softmine.data.datasets.imagefolder.ImageFolder`,
:class:`~softmine.data.datasets.csvlist.CSVImages`). A subclass turns its files into
``(path, id, camera)`` triples and calls :meth:`SplitImages._setup_split`; images are
read, cropped, skipped and (once it lands) cached by the shared
:class:`~softmine.data.images.ImageDataset`.

What an item is, by split:

* ``train``: ``(image, label)``, the ids remapped to ``0..C-1`` (what the loss and
  the P x K sampler need);
* ``test``: ``(image, label)``, for leave-one-out retrieval;
* ``query`` / ``gallery``: ``(image, id, camera)`` with the published id (not
  remapped, so query and gallery share one id space and a user's 0-based ids stay
  what they are) and the 0-based camera, as the video re-ID sets give them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from softmine.data.images import ImageDataset

SPLITS = ("train", "test", "query", "gallery")

Item = tuple[str, int, int]  # (image path, published id, 0-based camera)


class SplitImages(ImageDataset):
    """:class:`ImageDataset` plus published ids and cameras, with query/gallery items.

    Attributes:
        pids: published id of every sample, int64 (n,) (``classes[labels]``).
        camids: 0-based camera of every sample, int64 (n,).
    """

    def _setup_split(
        self, items: Sequence[Item], class_names: dict[int, str], listed_in: str
    ) -> None:
        """Check and remap ``items`` (:meth:`ImageDataset._setup`), keeping their cameras."""
        self._setup([(p, c) for p, c, _ in items], None, class_names, listed_in)
        cams, j = [], 0
        for path, _ in self.samples:  # samples are items in order, missing files dropped
            while items[j][0] != path:
                j += 1
            cams.append(items[j][2])
            j += 1
        self.camids = np.asarray(cams, dtype=np.int64)

    @property
    def pids(self) -> np.ndarray:
        """Published id of every sample, int64 (n,)."""
        return np.asarray(self.classes, dtype=np.int64)[self.labels]

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        """``train``/``test``: (image, label); ``query``/``gallery``: (image, id, camera)."""
        image, label = super().__getitem__(i)
        if self.split in ("query", "gallery"):
            return image, int(self.classes[label]), int(self.camids[i])
        return image, label
