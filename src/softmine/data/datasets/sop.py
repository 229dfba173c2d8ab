"""Stanford Online Products (Oh Song et al., CVPR 2016), read from ``Stanford_Online_Products.zip``.

Layout under ``root`` (the unpacked ``Stanford_Online_Products/`` folder)::

    Ebay_train.txt    header "image_id class_id super_class_id path", then one image a line
    Ebay_test.txt     the same for the test classes
    bicycle_final/111085122871_0.JPG, ...   (12 super-class folders, the paths listed)

Metric-learning protocol (the paper's, used by every DML paper since): the
11,318 classes of ``Ebay_train.txt`` (59,551 images) train, the 11,316 classes
of ``Ebay_test.txt`` (60,502 images) test, class-disjoint; the test set is
evaluated leave-one-out with Recall@1/10/100/1000. ``Ebay_info.txt`` (all
images) and ``Ebay_final.txt`` are not needed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from softmine.data.images import IMAGE_SPLITS, ImageDataset, check_split
from softmine.data.sources import SOP_SOURCE, check_root, read_table
from softmine.errors import DataError

HEADER = ["image_id", "class_id", "super_class_id", "path"]


def read_ebay_list(path: Path) -> list[tuple[str, int, int]]:
    """(relative image path, class id, super-class id) of every row of an ``Ebay_*.txt`` file."""
    rows = read_table(SOP_SOURCE, path, 4)
    if rows and rows[0] == HEADER:
        rows = rows[1:]
    try:
        return [(r[3], int(r[1]), int(r[2])) for r in rows]
    except ValueError as e:
        raise DataError(
            f"{SOP_SOURCE.name}: {path} has a non-integer class id ({e}); expected the columns "
            f"{' '.join(HEADER)}; the file is damaged. {SOP_SOURCE.where()}"
        ) from None


class StanfordOnlineProducts(ImageDataset):
    """Stanford Online Products with the class-disjoint train/test split of the paper.

    Args:
        root: the unpacked ``Stanford_Online_Products`` folder.
        split: ``train`` (``Ebay_train.txt``) or ``test`` (``Ebay_test.txt``).
        transform: callable applied to the Pillow RGB image.
        on_bad_image: ``error`` | ``skip`` (see :mod:`softmine.data.images`).

    Attributes:
        super_classes: super-class id (1..12) of every sample.
    """

    source = SOP_SOURCE

    def __init__(
        self,
        root: str | Path = SOP_SOURCE.folder,
        split: str = "train",
        transform: Callable[[Any], Any] | None = None,
        on_bad_image: str = "error",
    ) -> None:
        super().__init__(transform, on_bad_image)
        self.split = check_split(SOP_SOURCE, split, IMAGE_SPLITS)
        self.root = check_root(SOP_SOURCE, root)
        listed_in = f"Ebay_{self.split}.txt"
        rows = read_ebay_list(self.root / listed_in)
        names = {c: f"{p.split('/', 1)[0]}/{c}" for p, c, _ in rows}
        self._setup([(str(self.root / p), c) for p, c, _ in rows], None, names, listed_in)
        super_of = {str(self.root / p): s for p, _, s in rows}
        self.super_classes = [super_of[p] for p, _ in self.samples]
