"""The fused resize + random resized crop against the two transforms applied one after the other."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as F

from softmine.data.transforms import RandomShift, ResizeRandomResizedCrop


def _gradient(h: int, w: int) -> torch.Tensor:
    """A smooth uint8 image whose channels encode x, y and x + y."""
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    img = torch.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), (xx + yy) * 255 // (h + w - 2)])
    return img.to(torch.uint8)


def _two_step(img: torch.Tensor, resize: int, size: int, scale, ratio) -> torch.Tensor:
    resized = F.resize(img, resize, antialias=True)
    top, left, h, w = RandomResizedCrop.get_params(resized, list(scale), list(ratio))
    return F.resized_crop(resized, top, left, h, w, [size, size], antialias=True)


@pytest.mark.parametrize(("h", "w"), [(375, 500), (500, 333), (300, 300)])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_same_crops_as_resize_then_random_resized_crop(h: int, w: int, seed: int) -> None:
    img = _gradient(h, w)
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    torch.manual_seed(seed)
    fused = ResizeRandomResizedCrop(256, 224, scale, ratio)(img)
    torch.manual_seed(seed)
    ref = _two_step(img, 256, 224, scale, ratio)
    assert fused.shape == ref.shape == (3, 224, 224) and fused.dtype == torch.uint8
    # Same box (the image encodes coordinates), one interpolation instead of two.
    diff = (fused.float() - ref.float()).abs()
    assert diff.mean() < 2.0 and diff.max() <= 12


def test_full_crop_is_a_plain_resize() -> None:
    img = _gradient(300, 300)
    out = ResizeRandomResizedCrop(256, 224, scale=(1.0, 1.0), ratio=(1.0, 1.0))(img)
    assert torch.equal(out, F.resize(img, [224, 224], antialias=True))


def test_random_shift_moves_content_by_at_most_one_pixel() -> None:
    img = torch.zeros(1, 8, 8)
    img[0, 4, 4] = 1.0
    seen = set()
    for _ in range(50):
        out = RandomShift(1)(img)
        (y, x) = (out[0] == 1).nonzero()[0].tolist()
        seen.add((y, x))
        assert abs(y - 4) <= 1 and abs(x - 4) <= 1 and out.sum() == 1
    assert len(seen) > 3


@pytest.mark.parametrize("shape", [(6, 1, 8, 8), (5, 3, 2, 7, 9)])
def test_random_shift_batch_is_the_items_shifted_one_by_one(shape: tuple[int, ...]) -> None:
    """The batched form draws the same shifts from the same stream, in the same order."""
    x = torch.rand(shape)
    torch.manual_seed(4)
    one_by_one, after = torch.stack([RandomShift(2)(xi) for xi in x]), torch.rand(3)
    torch.manual_seed(4)
    assert torch.equal(RandomShift(2).batch(x), one_by_one)
    assert torch.equal(torch.rand(3), after)
