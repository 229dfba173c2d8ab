"""Image augmentation on the training device: a whole batch cropped, resized and flipped at once.

The host side only gathers: each DataLoader worker hands over the uint8 image as
it is (a view of the :mod:`softmine.data.cache`, or a decoded file) through
:class:`ToHWC`, and :func:`collate_padded` pads the batch into one uint8 tensor
(:class:`PaddedImages`, the true sizes beside it). On the device,
:class:`DeviceResizedCrop` draws a crop box and a flip per image and resamples all
images with two batched matrix products, giving float images in [0, 1] (the
backbone's ``input_norm`` then normalises them, as on the CPU path).

Same distributions as the torchvision transforms they replace:

* ``crop="random"``: ``RandomResizedCrop(size, scale, ratio)`` (torchvision's draw:
  ten tries of area and log-uniform aspect ratio, then the central fallback),
  drawn on the image resized to a short side of ``resize`` and cut from the stored
  pixels in one resampling, exactly as :class:`~softmine.data.transforms.ResizeRandomResizedCrop`;
  from a cache whose short side is ``resize`` this is ``Resize(resize)`` then
  ``RandomResizedCrop``;
* ``crop="center"``: ``Resize(resize)`` then ``CenterCrop(size)``;
* ``crop="full"``: the whole image resized to ``size`` (no crop: the authors' recipe);
* a horizontal flip with probability ``flip``.

The resampling is torchvision's bilinear ``resize`` with ``antialias=True`` (the
triangle filter widened by the downscaling factor, weights renormalised at the
borders), so for a given box the result equals ``resized_crop(img, box, size)`` on a
float image up to float rounding. Boxes are kept inside the image (torchvision
would pad a box that overhangs by a rounding pixel with zeros).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import default_collate, get_worker_info

from softmine.errors import ConfigError

CROPS = ("random", "center", "full")
ATTEMPTS = 10  # tries of RandomResizedCrop before its central fallback (torchvision's number)


class PaddedImages(NamedTuple):
    """Images of differing sizes in one uint8 tensor: image ``i`` is ``pixels[i, :h_i, :w_i]``.

    Attributes:
        pixels: (B, H_max, W_max, 3) uint8; what lies outside an image is never read.
        sizes: (B, 2) int64, (height, width) of every image.
    """

    pixels: Tensor
    sizes: Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PaddedImages:
        return PaddedImages(
            self.pixels.to(device, non_blocking=non_blocking),
            self.sizes.to(device, non_blocking=non_blocking),
        )

    def __len__(self) -> int:  # the batch size, like a tensor's
        return int(self.pixels.shape[0])


class ToHWC:
    """Host transform: any image (Pillow, uint8 (3, H, W) tensor, (H, W, 3) array) -> uint8 (H, W, 3).

    A cached image is already stored as (H, W, 3), so this is a view, not a copy.
    """

    def __call__(self, img: Any) -> Tensor:
        if isinstance(img, Tensor):
            if img.dim() != 3 or img.shape[0] not in (1, 3):
                raise ConfigError(
                    f"the device augmentation takes single images (C, H, W), got shape "
                    f"{tuple(img.shape)}; dataset/transform=dml_device is for image sets "
                    "(video sets: dataset/transform=reid or dml)"
                )
            return img.expand(3, -1, -1).permute(1, 2, 0)
        arr = np.array(img.convert("RGB") if hasattr(img, "convert") else img, copy=True)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        return torch.from_numpy(arr)


def collate_padded(items: Sequence[tuple[Any, ...]]) -> tuple[Any, ...]:
    """Batch ``(image (H, W, 3), label, ...)`` items: the images padded into :class:`PaddedImages`.

    In a DataLoader worker the batch is written straight into shared memory, so it
    crosses to the main process without another copy (as ``default_collate`` does).
    """
    images = [item[0] for item in items]
    for img in images:
        if not (torch.is_tensor(img) and img.dim() == 3 and img.shape[2] == 3):
            raise ConfigError(
                "the device transform needs whole images (H, W, 3) from the training transform "
                f"(got {type(img).__name__} {tuple(getattr(img, 'shape', ()))}); end it with "
                "softmine.data.device_transforms.ToHWC, as dataset/transform=dml_device does"
            )
    sizes = torch.tensor([img.shape[:2] for img in images], dtype=torch.int64)
    h, w = (int(v) for v in sizes.max(0).values)
    shape = (len(images), h, w, 3)
    if get_worker_info() is not None:
        storage = torch.UntypedStorage._new_shared(math.prod(shape))
        pixels = torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)
    else:
        pixels = torch.empty(shape, dtype=torch.uint8)
    for i, img in enumerate(images):
        pixels[i, : img.shape[0], : img.shape[1]] = img
    rest = default_collate([item[1:] for item in items])
    return (PaddedImages(pixels, sizes), *rest)


def sample_boxes(
    sizes: Tensor, scale: Sequence[float], ratio: Sequence[float]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """RandomResizedCrop boxes (top, left, height, width) for images of ``sizes`` (B, 2), vectorised.

    torchvision's rule per image: up to ten tries of an area uniform in ``scale``
    times the image area and an aspect ratio log-uniform in ``ratio``, the first
    box that fits placed uniformly; if none fits, the largest central box whose
    aspect ratio is clamped into ``ratio``. All ten tries are drawn at once on
    the device of ``sizes`` (its default generator). Returns float tensors (B,)
    holding whole numbers.
    """
    device = sizes.device
    height, width = sizes[:, :1].double(), sizes[:, 1:].double()
    u = torch.rand(len(sizes), ATTEMPTS, 4, device=device, dtype=torch.float64)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * u[..., 1])
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.int8).argmax(1, keepdim=True)  # the first box that fits
    pick = lambda t: t.gather(1, first)[:, 0]  # noqa: E731
    h, w = pick(h), pick(w)
    top = torch.floor(pick(u[..., 2]) * (height[:, 0] - h + 1))
    left = torch.floor(pick(u[..., 3]) * (width[:, 0] - w + 1))
    # central fallback, as torchvision: aspect ratio clamped into [min(ratio), max(ratio)]
    H, W = height[:, 0], width[:, 0]
    in_ratio = W / H
    fb_w = torch.where(in_ratio > max(ratio), torch.round(H * max(ratio)), W)
    fb_h = torch.where(in_ratio < min(ratio), torch.round(W / min(ratio)), H)
    any_fit = fits.any(1)
    h = torch.where(any_fit, h, fb_h)
    w = torch.where(any_fit, w, fb_w)
    top = torch.where(any_fit, top, torch.floor((H - fb_h) / 2))
    left = torch.where(any_fit, left, torch.floor((W - fb_w) / 2))
    return top, left, h, w


def axis_weights(start: Tensor, length: Tensor, out: int, extent: int) -> Tensor:
    """Antialiased bilinear weights (B, out, extent) resampling ``[start, start + length)`` to ``out`` pixels.

    torchvision's ``resize(..., antialias=True)`` filter: output pixel ``i`` of the
    crop is centred at ``start + s * (i + 0.5)`` with ``s = length / out``; input
    pixel ``j`` weighs ``max(0, 1 - |j + 0.5 - centre| / max(s, 1))``, only inside
    the crop, normalised to sum 1. ``extent`` is the padded axis length.
    """
    start = start.to(torch.float32)[:, None, None]
    length = length.to(torch.float32)[:, None, None]
    s = length / out
    i = torch.arange(out, device=start.device, dtype=torch.float32)[None, :, None]
    j = torch.arange(extent, device=start.device, dtype=torch.float32)[None, None, :]
    centre = start + s * (i + 0.5)
    weights = (1 - ((j + 0.5 - centre) / s.clamp(min=1)).abs()).clamp_(min=0)
    weights = weights * ((j >= start) & (j < start + length))
    return weights / weights.sum(-1, keepdim=True)


def crop_resize(
    pixels: Tensor,
    boxes: tuple[Tensor, Tensor, Tensor, Tensor],
    size: tuple[int, int],
    flip: Tensor | None = None,
) -> Tensor:
    """Cut box (top, left, height, width) of every image, resize it to ``size``, flip where asked.

    Args:
        pixels: (B, H, W, C) uint8 or float, on any device.
        boxes: four (B,) tensors of whole numbers, inside each image.
        size: output (height, width).
        flip: (B,) bool, mirror those images left-right.

    Returns:
        (B, C, height, width) float32, in the input's value range divided by 255 for uint8.
    """
    b, h_max, w_max, c = pixels.shape
    top, left, h, w = boxes
    wy = axis_weights(top, h, size[0], h_max)
    wx = axis_weights(left, w, size[1], w_max)
    if flip is not None:
        wx = torch.where(flip[:, None, None], wx.flip(1), wx)
    if pixels.dtype == torch.uint8:
        wy = wy / 255.0
    rows = torch.bmm(wy, pixels.reshape(b, h_max, w_max * c).to(torch.float32))
    return torch.einsum("bpwc,bqw->bcpq", rows.view(b, size[0], w_max, c), wx)


class DeviceResizedCrop:
    """Crop, resize and flip a :class:`PaddedImages` batch on its device (the trainer's ``device_transform``).

    Args:
        size: output side (int) or (height, width) (``full`` only).
        crop: ``random`` (RandomResizedCrop) | ``center`` (centre crop) | ``full`` (no crop).
        resize: short side the ``random``/``center`` boxes are drawn on (Resize(resize)
            first); null draws them on the stored image as it is.
        scale: RandomResizedCrop area range, as a fraction of the image.
        ratio: RandomResizedCrop aspect-ratio range.
        flip: probability of a horizontal flip.

    ``collate`` is the host half: the DataLoader's ``collate_fn``.
    """

    collate = staticmethod(collate_padded)

    def __init__(
        self,
        size: int | Sequence[int] = 224,
        crop: str = "random",
        resize: int | None = 256,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        flip: float = 0.5,
    ) -> None:
        if crop not in CROPS:
            raise ConfigError(f"device transform crop must be one of {CROPS}, got {crop!r}")
        sides = [int(size)] * 2 if isinstance(size, int | float) else [int(v) for v in size]
        if len(sides) != 2 or min(sides) < 1 or (crop != "full" and sides[0] != sides[1]):
            raise ConfigError(
                f"device transform size must be a positive int (or [height, width] with "
                f"crop=full), got {size!r}"
            )
        if not 0.0 <= float(flip) <= 1.0:
            raise ConfigError(f"device transform flip must be a probability, got {flip}")
        self.size = (sides[0], sides[1])
        self.crop, self.resize = crop, None if resize is None else int(resize)
        self.scale, self.ratio = tuple(float(v) for v in scale), tuple(float(v) for v in ratio)
        self.flip = float(flip)

    def boxes(self, sizes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One box per image of ``sizes`` (B, 2), in stored pixels, drawn by the ``crop`` rule."""
        height, width = sizes[:, 0].double(), sizes[:, 1].double()
        if self.crop == "full":
            zero = torch.zeros_like(height)
            return zero, zero, height, width
        s = torch.ones_like(height)
        if self.resize is not None:
            s = self.resize / torch.minimum(height, width)
        virtual = torch.stack([torch.round(height * s), torch.round(width * s)], 1).clamp(min=1)
        if self.crop == "random":
            top, left, h, w = sample_boxes(virtual, self.scale, self.ratio)
        else:
            side = torch.full_like(height, float(self.size[0]))
            top = torch.round((virtual[:, 0] - side) / 2)
            left = torch.round((virtual[:, 1] - side) / 2)
            h = w = side
        top, left = torch.round(top / s).clamp(min=0), torch.round(left / s).clamp(min=0)
        h = torch.minimum(torch.round(h / s).clamp(min=1), height - top)
        w = torch.minimum(torch.round(w / s).clamp(min=1), width - left)
        return top, left, h, w

    def __call__(self, batch: PaddedImages) -> Tensor:
        """(B, 3, size, size) float32 images in [0, 1] on the batch's device."""
        n = len(batch)
        flip = torch.rand(n, device=batch.pixels.device) < self.flip if self.flip > 0 else None
        out = crop_resize(batch.pixels, self.boxes(batch.sizes), self.size, flip)
        return out.clamp_(0.0, 1.0)  # the weights sum to 1 up to rounding: stay inside [0, 1]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, crop={self.crop!r}, resize={self.resize}, "
            f"scale={self.scale}, ratio={self.ratio}, flip={self.flip})"
        )
