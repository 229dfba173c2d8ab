"""Decoding one image file to RGB, with an optional crop box and one clear error per bad file.

The lowest layer of the image data path, shared by the datasets
(:mod:`softmine.data.images`, :mod:`softmine.data.tracklets`), the decoded-image cache
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

import errno
import functools
import io
import logging
import math
import os
import stat
from collections.abc import Callable

import torch
from PIL import Image, UnidentifiedImageError

from softmine.errors import DataError

log = logging.getLogger(__name__)

Box = tuple[float, float, float, float]


class BadImageError(DataError):
    """An image file that is missing or cannot be decoded; the message names the file.

    ``path`` is the file and ``reason`` the one-line cause (``empty file (0 bytes)``, the
    decoder's own message, ...), what ``bad_images.txt`` lists beside the path.
    """

    def __init__(self, message: str, path: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.path, self.reason = path, reason


JPEG_MAGIC = b"\xff\xd8"
#: What the error for an unreadable file tells the user to do.
BAD_IMAGE_HINT = (
    "replace it with a good copy or remove it, or set data.on_bad_image=skip to leave it out (training "
    "uses another image of its class instead, evaluation drops the item)"
)


def file_problem(path: str) -> str | None:
    """Why ``path`` cannot be an image file at all, in a few words; None when it is a non-empty file.

    Tells apart a missing file, a symlink loop, a link to a missing file, something that is
    not a regular file and an empty one: the causes a user fixes differently.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return f"broken symlink (its target {os.readlink(path)} does not exist)"
        return "does not exist"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symlink loop (the link leads back to itself, never to a file)"
        return e.strerror or str(e)
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if info.st_size == 0:
        return "empty file (0 bytes)"
    return None


def pixel_limit_problem(width: int, height: int) -> str | None:
    """A decompression bomb: more pixels than Pillow's ``Image.MAX_IMAGE_PIXELS`` (None: fine)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        return (
            f"decompression bomb: {width}x{height} = {width * height:,} pixels, over Pillow's "
            f"limit of {limit:,} (raise PIL.Image.MAX_IMAGE_PIXELS if the image is genuine)"
        )
    return None


def image_header(path: str) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding the pixels.

    Raises :class:`BadImageError` with a one-line reason for a file that is missing, empty,
    a symlink loop, not an image Pillow can identify, or a decompression bomb.
    """
    problem = file_problem(path)
    if problem is not None:
        raise _bad(path, problem)
    try:
        with Image.open(path) as im:
            width, height = im.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise _bad(path, _reason(e)) from None
    problem = pixel_limit_problem(width, height)
    if problem is not None:
        raise _bad(path, problem)
    return width, height


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
    except OSError as e:
        raise _bad(path, file_problem(path) or _reason(e)) from e
    if not data:
        raise _bad(path, "empty file (0 bytes)")
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
            problem = pixel_limit_problem(*im.size)
            if problem is not None:
                raise _bad(path, problem)
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise _bad(path, _reason(e)) from e


def _reason(error: BaseException) -> str:
    """The decoder's own reason in one line, without Pillow's ``<_io.BytesIO object at 0x...>``."""
    if isinstance(error, UnidentifiedImageError):
        return "not an image file Pillow can identify (unknown format or damaged header)"
    if isinstance(error, Image.DecompressionBombError):
        return f"decompression bomb: {error}"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _bad(path: str, reason: str) -> BadImageError:
    """The error for an unreadable ``path``: a missing file, or one that does not decode."""
    if reason == "does not exist":
        return BadImageError(f"image file {path} does not exist", path, reason)
    return BadImageError(f"cannot decode image {path} ({reason}); {BAD_IMAGE_HINT}", path, reason)


def crop_box(box: Box | None, width: int, height: int) -> tuple[int, int, int, int] | None:
    """``box`` rounded outwards to whole pixels and clipped to the image; None if nothing is left."""
    if box is None:
        return None
    left, top = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
    right, bottom = min(width, math.ceil(box[2])), min(height, math.ceil(box[3]))
    if right > left and bottom > top:
        return left, top, right, bottom
    return None
