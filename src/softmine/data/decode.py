"""Decoding one image file: Pillow to RGB, an optional crop box, one clear error per bad file.

The lowest layer of the image data path, shared by the datasets
(:mod:`softmine.data.images`), the decoded-image cache (:mod:`softmine.data.cache`)
and ``softmine-data check``; it imports neither of them.
"""

from __future__ import annotations

import math

from PIL import Image

from softmine.errors import DataError

Box = tuple[float, float, float, float]


class BadImageError(DataError):
    """An image file that is missing or cannot be decoded; the message names the file."""


def read_rgb(path: str, box: Box | None = None) -> Image.Image:
    """Decode ``path`` to an RGB image, cropped to ``box`` = (left, top, right, bottom) if given.

    The box is in Pillow's convention (0-based, right/bottom exclusive); it is
    rounded outwards and clipped to the image, and ignored if nothing is left.
    """
    try:
        with Image.open(path) as im:
            img = im.convert("RGB")
    except FileNotFoundError as e:
        raise BadImageError(f"image file {path} does not exist") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImageError(
            f"cannot decode image {path} ({e}); re-download or re-extract it, or set "
            "dataset.on_bad_image=skip to use another image of the same class instead"
        ) from e
    cut = crop_box(box, *img.size)
    return img if cut is None else img.crop(cut)


def crop_box(box: Box | None, width: int, height: int) -> tuple[int, int, int, int] | None:
    """``box`` rounded outwards to whole pixels and clipped to the image; None if nothing is left."""
    if box is None:
        return None
    left, top = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
    right, bottom = min(width, math.ceil(box[2])), min(height, math.ceil(box[3]))
    if right > left and bottom > top:
        return left, top, right, bottom
    return None
