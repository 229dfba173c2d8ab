"""Decoding one image file to RGB, with an optional crop box and one clear error per bad file.

The lowest layer of the image data path, shared by the datasets
(:mod:`softmine.data.images`, :mod:`softmine.data.video`), the decoded-image cache
(:mod:`softmine.data.cache`) and ``softmine-data check``; it imports neither of them.

:func:`read_image` is what the data path uses: JPEG files (every published set here)
go through TorchCodec's ``decode_jpeg`` (the PyTorch image decoder that replaces
``torchvision.io``'s, deprecated since torchvision 0.29), libjpeg-turbo straight
into a uint8 tensor: the same pixels as Pillow (same library, same IDCT and
upsampling) for about 20 % less CPU than Pillow's decode plus its conversion to a
tensor, which is the floor of an uncached input pipeline. Anything else (PNG, BMP,
a JPEG that libjpeg-turbo rejects but Pillow reads), and every file when TorchCodec
is not installed (it is not a dependency on macOS, which has no wheels of its image
decoders) or cannot be loaded (it is built for torch >= 2.11), goes through Pillow.
"""

from __future__ import annotations

import functools
import io
import logging
import math
from collections.abc import Callable

import torch
from PIL import Image

from softmine.errors import DataError

log = logging.getLogger(__name__)

Box = tuple[float, float, float, float]


class BadImageError(DataError):
    """An image file that is missing or cannot be decoded; the message names the file."""


JPEG_MAGIC = b"\xff\xd8"


def read_image(path: str, box: Box | None = None) -> torch.Tensor:
    """Decode ``path`` to a uint8 RGB tensor (3, H, W), cropped to ``box`` if given.

    The tensor is a view with the channels innermost in memory (strides (1, 3W, 3)),
    which torchvision's uint8 resize takes without a copy. ``box`` = (left, top,
    right, bottom) is in Pillow's convention (0-based, right/bottom exclusive),
    rounded outwards and clipped to the image (ignored if nothing is left); the crop
    is a view too. Raises :class:`BadImageError` naming the file when it is missing
    or neither libjpeg-turbo nor Pillow can decode it.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError as e:
        raise BadImageError(f"image file {path} does not exist") from e
    except OSError as e:
        raise _undecodable(path, e) from e
    img = None
    decode_jpeg = jpeg_decoder() if data[:2] == JPEG_MAGIC else None
    if decode_jpeg is not None:
        try:
            img = decode_jpeg(data, mode="RGB")
        except RuntimeError:
            img = None  # Pillow gets the last word: it reads a few files libjpeg-turbo rejects
    if img is None:
        from torchvision.transforms.v2.functional import pil_to_tensor

        img = pil_to_tensor(_pillow_rgb(data, path))
    cut = crop_box(box, img.shape[2], img.shape[1])
    return img if cut is None else img[:, cut[1] : cut[3], cut[0] : cut[2]]


@functools.cache
def jpeg_decoder() -> Callable[..., torch.Tensor] | None:
    """TorchCodec's ``decode_jpeg``, or None (then Pillow decodes) when it cannot be loaded."""
    try:
        from torchcodec.decoders import decode_jpeg
    except Exception as e:  # noqa: BLE001 - missing, or built for another torch: any load error
        log.info("TorchCodec cannot be loaded (%s); JPEG files are decoded with Pillow", e)
        return None
    return decode_jpeg


def _pillow_rgb(data: bytes, path: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:
        raise _undecodable(path, e) from e


def _undecodable(path: str, error: Exception) -> BadImageError:
    return BadImageError(
        f"cannot decode image {path} ({error}); replace it with a good copy or remove it, or "
        "set dataset.on_bad_image=skip to use another image of the same class instead"
    )


def crop_box(box: Box | None, width: int, height: int) -> tuple[int, int, int, int] | None:
    """``box`` rounded outwards to whole pixels and clipped to the image; None if nothing is left."""
    if box is None:
        return None
    left, top = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
    right, bottom = min(width, math.ceil(box[2])), min(height, math.ceil(box[3]))
    if right > left and bottom > top:
        return left, top, right, bottom
    return None
