"""Tensor transforms for small in-memory images (the digits set)."""

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
