"""In-Shop Clothes Retrieval (Liu et al., DeepFashion, CVPR 2016), read from its published files.

Layout under ``root`` (the "In-shop Clothes Retrieval Benchmark" folder)::

    Eval/list_eval_partition.txt   line 1: the number of images (52712); line 2: the
                                   header "image_name item_id evaluation_status"; then
                                   "img/WOMEN/Dresses/id_00000002/02_1_front.jpg
                                    id_00000002 train|query|gallery"
    Img/img/WOMEN/..., Img/img/MEN/...   unpacked from Img/img.zip

``list_eval_partition.txt`` is also found at the root, and the images also
directly under the root (``root/img/...``), the layouts other code bases use.

Protocol (Liu et al., 2016): 3,997 items (25,882 images) train; the 3,985 test
items are split into 14,218 query and 12,612 gallery images, and each query
retrieves from the gallery: Recall@1/10/20/30/40/50 (``eval_protocol:
query_gallery``). An item id ``id_00000002`` is the class, numbered 2. The query
and gallery have no cameras: their items carry camera 0 and 1.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from softmine.data.image_splits import SPLITS, SplitImages
from softmine.data.images import check_split
from softmine.data.sources import INSHOP_SOURCE, check_root, read_lines, require_any
from softmine.errors import DataError

PARTITION = "list_eval_partition.txt"
STATUSES = ("train", "query", "gallery")


def read_partition(path: Path) -> list[tuple[str, int, str]]:
    """(image name, item number, evaluation status) of every image in ``list_eval_partition.txt``."""
    lines = read_lines(INSHOP_SOURCE, path)
    body = lines[2:] if len(lines) >= 2 and lines[1].split()[:1] == ["image_name"] else lines
    rows = []
    for n, line in enumerate(body, start=len(lines) - len(body) + 1):
        parts = line.split()
        if len(parts) != 3 or parts[2] not in STATUSES or not parts[1].startswith("id_"):
            raise DataError(
                f"{INSHOP_SOURCE.name}: {path} line {n} is {line!r}, expected 'IMAGE id_NNNNNNNN "
                f"train|query|gallery'; the file is damaged. {INSHOP_SOURCE.where()}"
            )
        rows.append((parts[0], int(parts[1][3:]), parts[2]))
    if lines and lines[0].isdigit() and int(lines[0]) != len(rows):
        raise DataError(
            f"{INSHOP_SOURCE.name}: {path} announces {lines[0]} images but lists {len(rows)}; "
            f"the file is truncated. {INSHOP_SOURCE.where()}"
        )
    return rows


def image_base(root: Path, first_image: str) -> Path:
    """``root/Img`` if the listed images are there (the published layout), else ``root``."""
    return root / "Img" if (root / "Img" / first_image).is_file() else root


class InShop(SplitImages):
    """In-Shop Clothes Retrieval with its published train / query / gallery partition.

    Args:
        root: the folder holding ``Eval/list_eval_partition.txt`` and ``Img/img/``.
        split: ``train`` | ``query`` | ``gallery`` (``test``: query and gallery together).
        transform: callable applied to the Pillow RGB image.
        on_bad_image: ``error`` | ``skip`` (see :mod:`softmine.data.images`).
    """

    source = INSHOP_SOURCE

    def __init__(
        self,
        root: str | Path = INSHOP_SOURCE.folder,
        split: str = "train",
        transform: Callable[[Any], Any] | None = None,
        on_bad_image: str = "error",
    ) -> None:
        super().__init__(transform, on_bad_image)
        self.split = check_split(INSHOP_SOURCE, split, SPLITS)
        self.root = check_root(INSHOP_SOURCE, root)
        path = require_any(INSHOP_SOURCE, [self.root / "Eval" / PARTITION, self.root / PARTITION])
        rows = read_partition(path)
        wanted = ("query", "gallery") if self.split == "test" else (self.split,)
        base = image_base(self.root, rows[0][0]) if rows else self.root
        items = [
            (str(base / name), item, int(status == "gallery"))
            for name, item, status in rows
            if status in wanted
        ]
        names = {item: f"id_{item:08d}" for _, item, _ in items}
        self._setup_split(items, names, PARTITION)
