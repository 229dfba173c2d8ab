"""Whether a set's images are much smaller than the transform's crop, and what fits them.

The DML transform resizes every image's short side to ``dataset.transform.resize`` (256) and
crops ``crop_size`` (224) pixels, the resolution ImageNet-pretrained networks were trained at.
Images far smaller than that (icons, thumbnails, 32 px crops) are then upscaled: the network
does the work of a 224 px image on the content of a small one. :func:`small_images_hint`
reads the headers of a sample of the training images (tens of microseconds each, no pixels
decoded) and, when their typical short side is at most half the crop, names the
``dataset.transform`` values that fit them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from softmine.data.decode import BadImageError, image_header
from softmine.data.file_check import item_files

SAMPLE = 256  # images whose headers are read (evenly spaced over the set)
MIN_SIDE = 32  # the smallest resize suggested


def typical_short_side(dataset: Any, sample: int = SAMPLE) -> int | None:
    """The median short side of up to ``sample`` evenly spaced images of ``dataset`` (the
    first frame of a tracklet); None for a set without image files or no readable one."""
    files = item_files(dataset)
    if not files:
        return None
    picks = np.unique(np.linspace(0, len(files) - 1, min(sample, len(files))).astype(int))
    sides = []
    for i in picks:
        try:
            sides.append(min(image_header(files[int(i)][0])))
        except BadImageError:  # named by the file check, not here
            continue
    return int(np.median(sides)) if sides else None


def fitting_resolution(short_side: int, resize: int, crop: int) -> tuple[int, int] | None:
    """(resize, crop) in the transform's proportions for images of ``short_side`` pixels, when
    ``crop`` would upscale them at least twice; None when the images are large enough (or
    the crop is already no larger than the fitting one).
    The resize is the short side rounded down to a multiple of 8 (at least 32)."""
    if short_side * 2 > crop:
        return None
    new_resize = max(MIN_SIDE, short_side // 8 * 8)
    new_crop = min(new_resize, max(MIN_SIDE, int(round(new_resize * crop / resize / 8)) * 8))
    return (new_resize, new_crop) if new_crop < crop else None


def small_images_hint(dataset: Any, transform: Any) -> str | None:
    """One sentence when the training images are at most half the crop size (see the module)."""
    resize = getattr(transform, "get", lambda _k: None)("resize")
    crop = getattr(transform, "get", lambda _k: None)("crop_size")
    if not (isinstance(resize, int) and isinstance(crop, int)):
        return None
    side = typical_short_side(dataset)
    fit = None if side is None else fitting_resolution(side, resize, crop)
    if fit is None:
        return None
    new_resize, new_crop = fit
    ratio = (crop / new_crop) ** 2
    return (
        f"the training images are small (short side {side} px, the median of a sample) and "
        f"dataset.transform upscales them to {crop} px crops; dataset.transform.resize="
        f"{new_resize} dataset.transform.crop_size={new_crop} fits them ({ratio:.0f}x fewer "
        "pixels a step)"
    )
