"""Image transforms of our own: a shift for the tiny digits, and a fused resize + random crop."""

from __future__ import annotations

import torch


class RandomShift:
    """Shift an image by up to ``max_shift`` pixels in each direction, zero-filled.

    Cheap augmentation for 8x8 digits: a 1-pixel jitter keeps every digit legible.
    """

    def __init__(self, max_shift: int = 1) -> None:
        self.max_shift = int(max_shift)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.max_shift <= 0:
            return x
        s = self.max_shift
        dy, dx = torch.randint(-s, s + 1, (2,)).tolist()
        padded = torch.nn.functional.pad(x, (s, s, s, s))
        h, w = x.shape[-2:]
        return padded[..., s + dy : s + dy + h, s + dx : s + dx + w]

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        """``torch.stack([self(xi) for xi in x])`` in a few tensor operations: the same
        shifts, drawn from the same stream in the same order (one ``randint`` of ``(n, 2)``
        yields what ``n`` calls of ``(2,)`` do)."""
        if self.max_shift <= 0:
            return x
        s, (n, h, w) = self.max_shift, (len(x), *x.shape[-2:])
        d = torch.randint(-s, s + 1, (n, 2))
        padded = torch.nn.functional.pad(x.reshape(n, -1, h, w), (s, s, s, s))
        rows = s + d[:, :1] + torch.arange(h)  # (n, h): source row of each output row
        cols = s + d[:, 1:] + torch.arange(w)  # (n, w)
        # one gather over the flattened padded pixels: (n, 1, h * w) source positions
        at = (rows[:, :, None] * (w + 2 * s) + cols[:, None, :]).reshape(n, 1, h * w)
        flat = padded.flatten(2)
        return flat.gather(2, at.expand(n, flat.shape[1], h * w)).reshape(x.shape)


class ResizeRandomResizedCrop:
    """``Resize(resize)`` then ``RandomResizedCrop(size, scale, ratio)`` with a single resampling.

    The crop box is drawn exactly as RandomResizedCrop draws it on the image
    resized to a shorter side of ``resize``, mapped back to the original pixels,
    and cut and resized in one step: the same distribution of crops as the two
    transforms in a row, at about half the cost (one interpolation instead of two).
    Works on tensors, tv_tensors (Image, Video: one box for every frame) and PIL images.

    Args:
        resize: shorter side of the intermediate resize (256 in the DML recipe).
        size: output side (224, or 227 for Caffe-era BN-Inception code).
        scale: range of the crop area as a fraction of the (resized) image.
        ratio: range of the crop aspect ratio.
    """

    def __init__(
        self,
        resize: int = 256,
        size: int = 224,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ) -> None:
        self.resize, self.size = int(resize), int(size)
        self.scale, self.ratio = tuple(scale), tuple(ratio)

    def __call__(self, img):  # noqa: ANN001, ANN204 - any image type torchvision accepts
        from torchvision.transforms import RandomResizedCrop
        from torchvision.transforms.v2 import functional as F

        _, h, w = F.get_dimensions(img)
        s = self.resize / min(h, w)
        rh, rw = max(1, round(h * s)), max(1, round(w * s))
        top, left, ch, cw = RandomResizedCrop.get_params(
            torch.empty(1, rh, rw), list(self.scale), list(self.ratio)
        )
        return F.resized_crop(
            img,
            round(top / s),
            round(left / s),
            max(1, round(ch / s)),
            max(1, round(cw / s)),
            [self.size, self.size],
            antialias=True,
        )
