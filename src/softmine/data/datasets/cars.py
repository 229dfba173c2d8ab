"""Cars196 / Stanford Cars (Krause et al., 2013), read from either published distribution.

``root`` holds one of:

(a) the all-in-one release: ``car_ims/000001.jpg ... 016185.jpg`` and
    ``cars_annos.mat`` (struct array ``annotations`` with fields
    ``relative_im_path`` (``car_ims/000001.jpg``), ``bbox_x1``, ``bbox_y1``,
    ``bbox_x2``, ``bbox_y2``, ``class`` (1..196), ``test``; and the cell array
    ``class_names``);
(b) the classification release: ``cars_train/*.jpg``, ``cars_test/*.jpg``,
    ``devkit/cars_train_annos.mat`` and ``cars_test_annos_withlabels.mat``
    (struct arrays ``annotations`` with ``bbox_x1..bbox_y2``, ``class``,
    ``fname``; the labelled test file lies at the root or in ``devkit/``), and
    ``devkit/cars_meta.mat`` (cell array ``class_names``).

(a) is used when ``cars_annos.mat`` is present. Metric-learning protocol: all
16,185 images pooled (the release's train/test flag is ignored), the first half
of the classes (1-98: 8,054 images) train, the second half (99-196: 8,131) test.
The boundary is half the number of class names.

Boxes are MATLAB pixel indices (1-based, inclusive), so the crop is the
Pillow box ``(x1 - 1, y1 - 1, x2, y2)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from softmine.data.images import IMAGE_SPLITS, Box, ImageDataset, check_split
from softmine.data.sources import (
    CARS,
    check_root,
    load_mat,
    mat_struct_field,
    mat_value,
    require,
    require_any,
)
from softmine.errors import DataError

BOX_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")


def _records(path: Path, path_field: str, prefix: Path) -> list[tuple[str, int, Box]]:
    """(image path, class id, Pillow box) of every element of ``annotations`` in ``path``."""
    ann = load_mat(CARS, path, ["annotations"])["annotations"]
    if "class" not in (ann.dtype.names or ()):
        hint = " (it is the unlabelled test file?)" if path.name.startswith("cars_test") else ""
        raise DataError(
            f"{CARS.name}: the annotations in {path} have no 'class' field{hint}; the "
            f"published file is needed. {CARS.where()}"
        )
    files = mat_struct_field(CARS, path, ann, path_field)
    classes = mat_struct_field(CARS, path, ann, "class")
    x1, y1, x2, y2 = (mat_struct_field(CARS, path, ann, f) for f in BOX_FIELDS)
    return [
        (str(prefix / f), int(c), (float(a) - 1, float(b) - 1, float(r), float(d)))
        for f, c, a, b, r, d in zip(files, classes, x1, y1, x2, y2, strict=True)
    ]


def _class_names(path: Path, records: list[tuple[str, int, Box]]) -> dict[int, str]:
    """Class id -> name from the ``class_names`` cell array in ``path``.

    cars_meta.mat always has it; for cars_annos.mat, where it is optional, the
    ids 1..max(class) stand in for names when it is absent.
    """
    from scipy.io import whosmat

    if not any(name == "class_names" for name, _, _ in whosmat(str(path))):
        return {c: str(c) for c in range(1, max(c for _, c, _ in records) + 1)}
    names = load_mat(CARS, path, ["class_names"])["class_names"].ravel()
    return {i + 1: str(mat_value(n)) for i, n in enumerate(names)}


class Cars196(ImageDataset):
    """Cars196 with the class-disjoint metric-learning split, from either distribution.

    Args:
        root: the folder holding ``cars_annos.mat`` + ``car_ims/``, or the devkit layout.
        split: ``train`` (classes 1-98) or ``test`` (classes 99-196).
        transform: callable applied to the Pillow RGB image.
        crop: crop every image to its annotated bounding box.
        on_bad_image: ``error`` | ``skip`` (see :mod:`softmine.data.images`).
        cache: ``none`` | ``ram`` | ``disk``: decode every image once into uint8 arrays
            (see :mod:`softmine.data.cache`); items are then uint8 tensors (3, H, W).
        cache_size: short side of the cached images (int), or [height, width].
        cache_dir: folder of a disk cache (default: ``cache/`` under ``root``).

    Attributes:
        layout: ``annos`` (distribution a) or ``devkit`` (distribution b).
    """

    source = CARS

    def __init__(
        self,
        root: str | Path = CARS.folder,
        split: str = "train",
        transform: Callable[[Any], Any] | None = None,
        crop: bool = False,
        on_bad_image: str = "error",
        cache: str = "none",
        cache_size: int | Sequence[int] = 256,
        cache_dir: str | Path | None = None,
    ) -> None:
        super().__init__(transform, on_bad_image, cache, cache_size, cache_dir)
        self.split = check_split(CARS, split, IMAGE_SPLITS)
        self.root = check_root(CARS, root)
        annos, devkit = self.root / "cars_annos.mat", self.root / "devkit"
        if annos.is_file():
            self.layout = "annos"
            require(CARS, self.root / "car_ims", "folder")
            records = _records(annos, "relative_im_path", self.root)
            names = _class_names(annos, records)
            listed_in = "cars_annos.mat"
        elif devkit.is_dir():
            self.layout = "devkit"
            for folder in ("cars_train", "cars_test"):
                require(CARS, self.root / folder, "folder")
            test_annos = _labelled_test_annos(self.root)
            records = _records(
                require(CARS, devkit / "cars_train_annos.mat"), "fname", self.root / "cars_train"
            )
            records += _records(test_annos, "fname", self.root / "cars_test")
            names = _class_names(require(CARS, devkit / "cars_meta.mat"), records)
            listed_in = "cars_train_annos.mat / cars_test_annos_withlabels.mat"
        else:
            raise DataError(
                f"{CARS.name}: found neither 'cars_annos.mat' (looked for {annos.resolve()}) nor "
                f"the 'devkit' folder (looked for {devkit.resolve()}). {CARS.where()}"
            )
        boundary = len(names) // 2
        is_train = self.split == "train"
        chosen = [r for r in records if (r[1] <= boundary) == is_train]
        boxes = [b for _, _, b in chosen] if crop else None
        self._setup([(p, c) for p, c, _ in chosen], boxes, names, listed_in)


def _labelled_test_annos(root: Path) -> Path:
    """``cars_test_annos_withlabels.mat`` at the root or in devkit/ (a DataError otherwise)."""
    name = "cars_test_annos_withlabels.mat"
    return require_any(
        CARS,
        [root / name, root / "devkit" / name],
        why="the devkit's cars_test_annos.mat has no labels, the labelled file is a separate "
        "download",
    )
