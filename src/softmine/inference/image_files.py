"""Image files to embed: found in a folder, read from a list, decoded and put through the run's test transform.

Labels, when known, are names: the first sub-folder below the folder given to
:func:`list_images` (the ``ImageFolder`` layout, and CUB's ``images/NNN.Class/``),
or the second column of a list file. :func:`collect_images` takes what
``softmine-embed --images`` is given: folders, files and glob patterns, mixed. :func:`encode_labels` turns them into the
integer labels the metrics need.
"""

from __future__ import annotations

import glob
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from softmine.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
INTEGER = re.compile(r"^-?\d+$")


class BadImageError(DataError):
    """An image file that is missing or cannot be decoded; the message names it."""


@dataclass
class ImageList:
    """Image paths and, when known, the label name of each."""

    paths: list[str]
    names: list[str] | None = None


def list_images(folder: str | Path) -> ImageList:
    """Every image file below ``folder``, sub-folders included, in sorted path order.

    When every file lies in a sub-folder, the first sub-folder's name is its label
    (``folder/<label>/.../file.jpg``); files directly in ``folder`` make the set unlabelled.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"--images {folder}: no such folder; give a folder of image files")
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise DataError(
            f"--images {folder}: no image files below it (looked for {', '.join(IMAGE_SUFFIXES)}, "
            "sub-folders included)"
        )
    parts = [p.relative_to(folder).parts for p in files]
    names = [q[0] for q in parts] if all(len(q) > 1 for q in parts) else None
    return ImageList([str(p) for p in files], names)


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _glob_images(pattern: str) -> list[Path]:
    """The image files a glob pattern names (``**`` spans sub-folders), sorted; a folder it
    matches gives every image file below it."""
    found: list[Path] = []
    for match in sorted(glob.glob(pattern, recursive=True)):
        p = Path(match)
        if p.is_dir():
            found.extend(sorted(q for q in p.rglob("*") if _is_image(q)))
        elif _is_image(p):
            found.append(p)
    if not found:
        raise DataError(
            f"--images {pattern!r}: the pattern matches no image file (looked for "
            f"{', '.join(IMAGE_SUFFIXES)}); check the pattern, or give a folder"
        )
    return found


def collect_images(sources: Sequence[str | Path]) -> ImageList:
    """The images of ``softmine-embed --images``: each source a folder (every image below it,
    as :func:`list_images`), an image file, or a glob pattern (``'photos/*.jpg'``,
    ``'shots/**/*.png'``: quote it, or the shell expands it first, which works too).

    Paths keep the order of the sources (a folder's and a pattern's in sorted order); a
    file named twice is embedded once. Labels (first sub-folder names) are kept only when
    every source is a folder that gives them; otherwise the set is unlabelled.
    """
    if not sources:
        raise DataError("--images needs at least one folder, file or pattern")
    paths: list[str] = []
    names: list[str] | None = []
    for source in sources:
        text = str(source)
        p = Path(text)
        if p.is_dir():
            found = list_images(p)
            paths += found.paths
            names = names + found.names if names is not None and found.names else None
            continue
        if p.is_file():
            paths.append(str(p))
        elif glob.has_magic(text):
            paths += [str(q) for q in _glob_images(text)]
        else:
            raise DataError(
                f"--images {text}: no such file or folder (and no pattern: *, ? or [...])"
            )
        names = None
    seen: dict[str, int] = {}
    for i, path in enumerate(paths):
        seen.setdefault(str(Path(path).resolve()), i)
    keep = sorted(seen.values())
    return ImageList([paths[i] for i in keep], None if names is None else [names[i] for i in keep])


def read_image_list(file: str | Path) -> ImageList:
    """Paths from a text file: ``PATH`` or ``PATH<TAB>LABEL`` per line.

    Blank lines and lines starting with ``#`` are skipped; relative paths are
    relative to the list file's folder. Either every line has a label or none has.
    """
    file = Path(file)
    try:
        text = file.read_text()
    except OSError as e:
        raise DataError(f"--list {file}: cannot read it ({e.strerror or e})") from None
    paths: list[str] = []
    names: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        path, tab, label = line.rstrip("\r\n").partition("\t")
        if tab and not label.strip():
            raise DataError(f"--list {file}, line {number}: a tab but no label after it")
        if bool(tab) != bool(names) and paths:
            raise DataError(
                f"--list {file}, line {number}: some lines have a label (PATH<TAB>LABEL) and "
                "others do not; give a label on every line or on none"
            )
        p = Path(path.strip())
        paths.append(str(p if p.is_absolute() else file.parent / p))
        if tab:
            names.append(label.strip())
    if not paths:
        raise DataError(f"--list {file}: no image paths in it (one path per line)")
    return ImageList(paths, names or None)


def encode_labels(names: Sequence[str]) -> tuple[np.ndarray, list[str] | None]:
    """Integer labels of label names: the integers themselves when every name is one and no
    two names are the same number, else the index of the name in the sorted list of names
    (returned as ``classes``; ``1`` and ``01`` are two classes)."""
    unique = set(names)
    if all(INTEGER.match(n) for n in unique) and len({int(n) for n in unique}) == len(unique):
        return np.array([int(n) for n in names], dtype=np.int64), None
    classes = sorted(set(names))
    return np.searchsorted(np.array(classes), np.array(names)).astype(np.int64), classes


def open_image(path: str, channels: int) -> Image.Image:
    """Decode ``path`` to grayscale (1 channel) or RGB (3), the way the network takes images."""
    try:
        with Image.open(path) as im:
            return im.convert("L" if channels == 1 else "RGB")
    except FileNotFoundError:
        raise BadImageError(f"image file {path} does not exist") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImageError(f"cannot decode image {path} ({e})") from None


def to_uint8_tensor(img: Any) -> torch.Tensor:
    """A (C, H, W) tensor of a transform's output: Pillow images become uint8 tensors."""
    if isinstance(img, Image.Image):
        from torchvision.transforms.v2.functional import pil_to_tensor

        return pil_to_tensor(img)
    if isinstance(img, torch.Tensor):
        return img.as_subclass(torch.Tensor)
    return torch.as_tensor(np.asarray(img))


class ImageFiles(Dataset):
    """Items ``(index, image tensor or None, error message or None)`` of image files.

    An unreadable file gives ``None`` and the reason instead of raising, so the
    caller decides what to do (stop or skip) in the main process, whatever the
    number of DataLoader workers.
    """

    def __init__(
        self, paths: Sequence[str], transform: Callable[[Any], Any] | None, channels: int
    ) -> None:
        self.paths, self.transform, self.channels = list(paths), transform, channels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            img = open_image(self.paths[i], self.channels)
        except BadImageError as e:
            return i, None, str(e)
        if self.transform is not None:
            img = self.transform(img)
        return i, to_uint8_tensor(img), None


def collate_images(
    items: list[tuple[int, torch.Tensor | None, str | None]],
) -> tuple[list[int], list[torch.Tensor], list[tuple[int, str]]]:
    """(indices of the readable images, their tensors, (index, reason) of the unreadable ones)."""
    good = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, err) for i, x, err in items if x is None and err is not None]
    return [i for i, _ in good], [x for _, x in good], bad
