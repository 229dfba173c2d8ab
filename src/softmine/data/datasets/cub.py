"""CUB-200-2011 (Wah et al., 2011), read from the files of ``CUB_200_2011.tgz`` as published.

Layout under ``root`` (the unpacked ``CUB_200_2011/`` folder)::

    images/NNN.Class_Name/*.jpg
    images.txt               <image_id> <path relative to images/>
    image_class_labels.txt   <image_id> <class_id 1..200>
    classes.txt              <class_id> <NNN.Class_Name>
    bounding_boxes.txt       <image_id> <x> <y> <width> <height>   (read only with crop=True)
    train_test_split.txt     the classification split (not used by metric learning)

Metric-learning protocol (Song et al., 2016, and every DML paper since): the
first half of the classes (1-100: 5,864 images) train, the second half
(101-200: 5,924 images) test; the split is by class, so test classes are never
seen in training. The boundary is half the number of entries in ``classes.txt``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from softmine.data.images import IMAGE_SPLITS, Box, ImageDataset, check_split
from softmine.data.sources import CUB, check_root, read_table, require
from softmine.errors import DataError


class CUB200(ImageDataset):
    """CUB-200-2011 with the class-disjoint metric-learning split.

    Args:
        root: the unpacked ``CUB_200_2011`` folder.
        split: ``train`` (classes 1-100) or ``test`` (classes 101-200).
        transform: callable applied to the Pillow RGB image.
        crop: crop every image to its box in ``bounding_boxes.txt`` (x, y are the
            0-based top-left corner, so the box is ``(x, y, x + w, y + h)``).
        on_bad_image: ``error`` | ``skip`` (see :mod:`softmine.data.images`).
        cache: ``none`` | ``ram`` | ``disk``: decode every image once into uint8 arrays
            (see :mod:`softmine.data.cache`); items are then uint8 tensors (3, H, W).
        cache_size: short side of the cached images (int), or [height, width].
        cache_dir: folder of a disk cache (default: ``cache/`` under ``root``).
    """

    source = CUB

    def __init__(
        self,
        root: str | Path = CUB.folder,
        split: str = "train",
        transform: Callable[[Any], Any] | None = None,
        crop: bool = False,
        on_bad_image: str = "error",
        cache: str = "none",
        cache_size: int | Sequence[int] = 256,
        cache_dir: str | Path | None = None,
    ) -> None:
        super().__init__(transform, on_bad_image, cache, cache_size, cache_dir)
        self.split = check_split(CUB, split, IMAGE_SPLITS)
        self.root = check_root(CUB, root)
        paths = {int(i): p for i, p in read_table(CUB, self.root / "images.txt", 2)}
        class_of = {
            int(i): int(c) for i, c in read_table(CUB, self.root / "image_class_labels.txt", 2)
        }
        names = {int(c): n for c, n in read_table(CUB, self.root / "classes.txt", 2)}
        if set(paths) != set(class_of):
            odd = sorted(set(paths) ^ set(class_of))
            raise DataError(
                f"{CUB.name}: images.txt and image_class_labels.txt list different image ids "
                f"({len(odd)} differ, e.g. {odd[0]}); re-extract the archive. {CUB.where()}"
            )
        boundary = len(names) // 2
        ids = sorted(i for i in paths if (class_of[i] <= boundary) == (self.split == "train"))
        boxes: list[Box] | None = None
        if crop:
            table = read_table(CUB, self.root / "bounding_boxes.txt", 5)
            xywh = {int(r[0]): tuple(float(v) for v in r[1:]) for r in table}
            absent = [i for i in ids if i not in xywh]
            if absent:
                raise DataError(
                    f"{CUB.name}: bounding_boxes.txt has no box for image id {absent[0]} "
                    f"({len(absent)} missing); re-extract the archive. {CUB.where()}"
                )
            boxes = [(x, y, x + w, y + h) for x, y, w, h in (xywh[i] for i in ids)]
        images = require(CUB, self.root / "images", "folder")
        items = [(str(images / paths[i]), class_of[i]) for i in ids]
        self._setup(items, boxes, names, "images.txt")
