"""Your own images in class folders: ``ROOT/CLASS/*.jpg`` (torchvision's ImageFolder layout).

Every sub-folder of ``root`` is a class; every image file below it (any depth,
extensions :data:`IMAGE_EXTENSIONS`, any case) is an image of that class; folders
with different names are different classes (``1`` and ``01`` are two). Class
names become ids as :mod:`softmine.data.custom` says (integer names keep their
value unless two are the same number, others are numbered in natural order), the
same way in every folder given.

Train / test:

* ``test_root`` set: ``root`` trains and ``test_root`` (the same layout) tests;
* otherwise ``root`` is split by :func:`softmine.data.custom.held_out`
  (``split_by=images``: the same classes, ``test_ratio`` of each class's images
  test; ``split_by=classes``: whole classes test, the zero-shot protocol of CUB/Cars).

Query / gallery (re-ID or In-Shop-style evaluation): ``query_root`` and
``gallery_root``, two more folders of the same layout; folder names are the
identities. Their items are ``(image, id, camera)`` with camera 0 for the query and
1 for the gallery (no same-camera removal happens).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from softmine.data.custom import held_out, number_names
from softmine.data.image_splits import SPLITS, Item, SplitImages
from softmine.data.images import check_split
from softmine.data.sources import IMAGEFOLDER_SOURCE, check_root, natural_key
from softmine.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def class_folders(root: Path) -> dict[str, list[str]]:
    """Class name -> its image paths (natural order, recursive) for every sub-folder of ``root``."""
    src = IMAGEFOLDER_SOURCE
    folders = sorted((d for d in os.listdir(root) if (root / d).is_dir()), key=natural_key)
    if not folders:
        raise DataError(f"{src.name}: {root.resolve()} has no class sub-folders. {src.where()}")
    loose = [f for f in os.listdir(root) if f.lower().endswith(IMAGE_EXTENSIONS)]
    if loose:
        log.warning(
            "%s: ignoring %d image(s) directly in %s (not in a class folder), e.g. %s",
            src.name,
            len(loose),
            root,
            loose[0],
        )
    out = {}
    for name in folders:
        images = [
            os.path.join(dirpath, f)
            for dirpath, _, files in os.walk(root / name)
            for f in files
            if f.lower().endswith(IMAGE_EXTENSIONS)
        ]
        out[name] = sorted(images, key=natural_key)
    if not any(out.values()):
        raise DataError(
            f"{src.name}: the class folders of {root.resolve()} hold no images with an "
            f"extension of {IMAGE_EXTENSIONS}. {src.where()}"
        )
    return out


class ImageFolder(SplitImages):
    """Images in one folder per class, split into train/test (or given as query/gallery folders).

    Args:
        root: the folder of class sub-folders (training images, or all images to split).
        split: ``train`` | ``test`` | ``query`` | ``gallery``.
        transform: callable applied to the Pillow RGB image.
        test_root: a second folder of class sub-folders that tests (then ``root`` is not split).
        query_root, gallery_root: folders of class (identity) sub-folders for query/gallery.
        split_by: ``images`` | ``classes`` (see :mod:`softmine.data.custom`).
        test_classes: ``split_by=classes``: the class folder names that test.
        test_ratio: fraction of each class's images (``images``) or of the classes (``classes``).
        split_seed: seed of the per-image split.
        on_bad_image: ``error`` | ``skip`` (see :mod:`softmine.data.images`).
    """

    source = IMAGEFOLDER_SOURCE

    def __init__(
        self,
        root: str | Path = IMAGEFOLDER_SOURCE.folder,
        split: str = "train",
        transform: Callable[[Any], Any] | None = None,
        test_root: str | Path | None = None,
        query_root: str | Path | None = None,
        gallery_root: str | Path | None = None,
        split_by: str = "images",
        test_classes: Sequence[str] | None = None,
        test_ratio: float = 0.5,
        split_seed: int = 0,
        on_bad_image: str = "error",
    ) -> None:
        super().__init__(transform, on_bad_image)
        src = IMAGEFOLDER_SOURCE
        self.split = check_split(src, split, SPLITS)
        self.root = check_root(src, root)
        roots = {"root": self.root}
        for key, value in (
            ("test_root", test_root),
            ("query_root", query_root),
            ("gallery_root", gallery_root),
        ):
            if value is not None:
                roots[key] = check_root(src, value)
        if self.split in ("query", "gallery") and f"{self.split}_root" not in roots:
            raise ConfigError(
                f"dataset.{self.split}_root is not set: query/gallery evaluation of an image "
                "folder needs dataset.query_root and dataset.gallery_root (folders of identity "
                "sub-folders), or use dataset.eval_protocol=retrieval"
            )
        listed = {key: class_folders(path) for key, path in roots.items()}
        numbering = number_names(name for classes in listed.values() for name in classes)
        self.class_numbering = numbering

        def items_of(key: str, camera: int = 0) -> list[Item]:
            return [
                (path, numbering[name], camera)
                for name, paths in listed[key].items()
                for path in paths
            ]

        if self.split in ("query", "gallery"):
            items = items_of(f"{self.split}_root", int(self.split == "gallery"))
        elif "test_root" in roots:
            items = items_of("root" if self.split == "train" else "test_root")
        else:
            everything = items_of("root")
            is_test = held_out(
                [c for _, c, _ in everything],
                split_by,
                test_classes,
                test_ratio,
                split_seed,
                numbering,
            )
            items = [
                it for it, t in zip(everything, is_test, strict=True) if t == (split == "test")
            ]
        names = {i: n for n, i in numbering.items()}
        self._setup_split(items, names, f"the class folders of {roots.get(split + '_root', root)}")
