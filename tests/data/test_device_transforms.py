"""Augmentation on the device against the torchvision transforms it replaces.

For fixed boxes the batched resampling must equal torchvision's ``resized_crop`` of
each image (float rounding apart); the random boxes, flips and whole outputs must
follow the same distributions (two-sample Kolmogorov-Smirnov tests, seeded).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import ks_2samp
from torch.utils.data import DataLoader
from torchvision.transforms import RandomResizedCrop, v2
from torchvision.transforms.v2 import functional as F

from softmine.data.device_transforms import (
    DeviceResizedCrop,
    PaddedImages,
    ToHWC,
    collate_padded,
    crop_resize,
    sample_boxes,
)
from softmine.engine import Trainer
from softmine.errors import ConfigError
from softmine.testing.fakes import make_cub
from tests.conftest import compose


def _images(shapes: list[tuple[int, int]], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in shapes]


def _batch(images: list[torch.Tensor]) -> PaddedImages:
    return collate_padded([(img.permute(1, 2, 0), 0) for img in images])[0]


def _gradient(h: int, w: int) -> torch.Tensor:
    """uint8 (3, h, w): red encodes x, green encodes y, blue is flat."""
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), torch.full_like(xx, 77)]).to(
        torch.uint8
    )


SHAPES = [(37, 50), (50, 33), (24, 24), (61, 45)]
# (top, left, height, width) per image: downscaling, upscaling, non-square, the whole image
BOXES = [(3, 5, 30, 40), (10, 2, 9, 7), (0, 0, 24, 24), (7, 11, 50, 20)]


@pytest.mark.parametrize("out", [16, 40])
def test_fixed_boxes_equal_torchvision_resized_crop(out: int) -> None:
    images = _images(SHAPES)
    boxes = tuple(torch.tensor(c, dtype=torch.float64) for c in zip(*BOXES, strict=True))
    got = crop_resize(_batch(images).pixels, boxes, (out, out))
    assert got.shape == (len(images), 3, out, out) and got.dtype == torch.float32
    for img, (t, left, h, w), mine in zip(images, BOXES, got, strict=True):
        ref = F.resized_crop(img.float(), t, left, h, w, [out, out], antialias=True)
        torch.testing.assert_close(mine * 255, ref, atol=2e-3, rtol=0)
        # and torchvision's integer uint8 kernel, to its own rounding
        ref8 = F.resized_crop(img, t, left, h, w, [out, out], antialias=True)
        assert (torch.round(mine * 255) - ref8.float()).abs().max() <= 1


def test_flip_mirrors_the_crop() -> None:
    images = _images(SHAPES)
    boxes = tuple(torch.tensor(c, dtype=torch.float64) for c in zip(*BOXES, strict=True))
    flip = torch.tensor([True, False, True, False])
    got = crop_resize(_batch(images).pixels, boxes, (20, 20), flip)
    for img, (t, left, h, w), mine, f in zip(images, BOXES, got, flip, strict=True):
        ref = F.resized_crop(img.float(), t, left, h, w, [20, 20], antialias=True)
        ref = F.horizontal_flip(ref) if f else ref
        torch.testing.assert_close(mine * 255, ref, atol=2e-3, rtol=0)


def test_full_crop_is_the_authors_plain_resize() -> None:
    """crop=full: the whole image to size x size, no flip (dataset/transform=authors)."""
    images = _images(SHAPES)
    got = DeviceResizedCrop(size=[24, 20], crop="full", flip=0.0)(_batch(images))
    for img, mine in zip(images, got, strict=True):
        ref = F.resize(img.float(), [24, 20], antialias=True)
        torch.testing.assert_close(mine * 255, ref, atol=2e-3, rtol=0)


def test_center_crop_from_a_cache_at_the_resize_is_an_exact_cut() -> None:
    """Resize(r) is already done by a cache of short side r, so CenterCrop needs no resampling."""
    stored = [F.resize(img, [30], antialias=True) for img in _images(SHAPES)]
    got = DeviceResizedCrop(size=24, crop="center", resize=30, flip=0.0)(_batch(stored))
    for img, mine in zip(stored, got, strict=True):
        ref = F.center_crop(img, [24, 24]).float()
        torch.testing.assert_close(mine * 255, ref, atol=2e-3, rtol=0)


def _torchvision_boxes(h: int, w: int, n: int, scale, ratio) -> np.ndarray:
    torch.manual_seed(1)
    img = torch.empty(1, h, w)
    return np.array([RandomResizedCrop.get_params(img, scale, ratio) for _ in range(n)])


@pytest.mark.parametrize(
    ("h", "w", "scale"),
    [
        (375, 500, (0.08, 1.0)),
        (256, 341, (0.08, 1.0)),
        (40, 400, (0.08, 1.0)),
        (90, 60, (0.5, 1.0)),
    ],
)
def test_random_boxes_follow_torchvision_distribution(h: int, w: int, scale) -> None:
    """Top, left, height and width: same distributions as RandomResizedCrop.get_params.

    (40, 400) is wider than any allowed aspect ratio for most tries, so it exercises
    the mix of accepted tries and the central fallback.
    """
    ratio = (3 / 4, 4 / 3)
    ref = _torchvision_boxes(h, w, 3000, list(scale), list(ratio))
    torch.manual_seed(2)
    sizes = torch.tensor([[h, w]] * 20000)
    got = np.stack([t.numpy() for t in sample_boxes(sizes, scale, ratio)], 1)
    assert (got[:, 0] >= 0).all() and (got[:, 0] + got[:, 2] <= h).all()
    assert (got[:, 1] >= 0).all() and (got[:, 1] + got[:, 3] <= w).all()
    for k, name in enumerate(("top", "left", "height", "width")):
        p = ks_2samp(got[:, k], ref[:, k]).pvalue
        assert p > 1e-3, f"{name}: KS p = {p:.2g}"


def test_fallback_box_equals_torchvision_when_no_try_fits() -> None:
    """No area of 90-100% of a 1-pixel-high strip has an allowed aspect ratio: central box."""
    ref = _torchvision_boxes(1, 100, 5, [0.9, 1.0], [3 / 4, 4 / 3])
    got = np.stack(
        [t.numpy() for t in sample_boxes(torch.tensor([[1, 100]] * 5), (0.9, 1.0), (3 / 4, 4 / 3))],
        1,
    )
    assert (got == ref).all() and tuple(ref[0]) == (0, 49, 1, 1)


@pytest.mark.slow
def test_whole_augmentation_matches_random_resized_crop_and_flip() -> None:
    """Outputs of the device path and of torchvision's RandomResizedCrop + flip on the cached image.

    The cache holds Resize(32) of the file; torchvision works on it as float so that
    neither side rounds to uint8. The image encodes x in red and y in green, so the
    mean red of an output says where the crop sits horizontally (and whether it was
    flipped), the green range how tall it is. Statistics are rounded to 1e-4: they
    take few distinct values (one per box), and float noise would split those ties.
    """
    stored = F.resize(_gradient(45, 64), [32], antialias=True)  # the cache at short side 32
    tv = v2.Compose([v2.RandomResizedCrop(16, antialias=True), v2.RandomHorizontalFlip(0.5)])
    torch.manual_seed(3)
    ref = torch.stack([tv(stored.float()) for _ in range(3000)]) / 255
    torch.manual_seed(4)
    got = DeviceResizedCrop(size=16, crop="random", resize=32, flip=0.5)(_batch([stored] * 6000))
    stats = {
        "mean red": lambda x: x[:, 0].mean((1, 2)),
        "mean green": lambda x: x[:, 1].mean((1, 2)),
        "red left - right": lambda x: x[:, 0, :, 0].mean(1) - x[:, 0, :, -1].mean(1),
        "green range": lambda x: x[:, 1, -1].mean(1) - x[:, 1, 0].mean(1),
    }
    for name, f in stats.items():
        p = ks_2samp(np.round(f(got).numpy(), 4), np.round(f(ref).numpy(), 4)).pvalue
        assert p > 1e-3, f"{name}: KS p = {p:.2g}"
    flipped = (stats["red left - right"](got) > 0).float().mean()
    assert abs(float(flipped) - 0.5) < 0.03  # 6000 draws: 4.6 standard deviations


def test_boxes_drawn_on_the_virtual_resize_are_mapped_back() -> None:
    """From the original file (no cache) the boxes scale with it, as ResizeRandomResizedCrop's."""
    crop = DeviceResizedCrop(size=16, crop="random", resize=32)
    torch.manual_seed(5)
    small = torch.stack(crop.boxes(torch.tensor([[32, 48]] * 4000)), 1).numpy()
    torch.manual_seed(5)
    large = torch.stack(crop.boxes(torch.tensor([[96, 144]] * 4000)), 1).numpy()
    assert np.abs(large - 3 * small).max() <= 1  # same draws, three times the pixels
    assert (large[:, 0] + large[:, 2] <= 96).all() and (large[:, 1] + large[:, 3] <= 144).all()


def test_host_side_hands_over_views_and_pads_a_batch() -> None:
    hwc = torch.randint(0, 256, (5, 7, 3), dtype=torch.uint8)
    view = ToHWC()(hwc.permute(2, 0, 1))  # what a cached dataset yields
    assert view.data_ptr() == hwc.data_ptr() and torch.equal(view, hwc)
    pil = Image.fromarray(hwc.numpy())
    assert torch.equal(ToHWC()(pil), hwc)
    other = torch.randint(0, 256, (9, 4, 3), dtype=torch.uint8)
    batch, labels = collate_padded([(hwc, 3), (other, 8)])
    assert batch.pixels.shape == (2, 9, 7, 3) and batch.sizes.tolist() == [[5, 7], [9, 4]]
    assert torch.equal(batch.pixels[0, :5, :7], hwc) and torch.equal(batch.pixels[1, :9, :4], other)
    assert labels.tolist() == [3, 8] and len(batch) == 2


def test_workers_collate_padded_batches() -> None:
    items = [(torch.full((4 + i, 6 - i % 3, 3), i, dtype=torch.uint8), i) for i in range(6)]
    loader = DataLoader(items, batch_size=3, num_workers=2, collate_fn=collate_padded)
    for k, (batch, labels) in enumerate(loader):
        assert isinstance(batch, PaddedImages) and labels.tolist() == [3 * k, 3 * k + 1, 3 * k + 2]
        for i, (h, w) in zip(labels.tolist(), batch.sizes.tolist(), strict=True):
            assert (h, w) == (4 + i, 6 - i % 3)
            assert (batch.pixels[i - 3 * k, :h, :w] == i).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"crop": "zoom"}, "crop must be one of"),
        ({"size": [224, 200]}, "size must be"),
        ({"size": 0}, "size must be"),
        ({"flip": 1.5}, "flip must be"),
    ],
)
def test_bad_options_are_config_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        DeviceResizedCrop(**kwargs)


def test_training_with_the_cache_and_device_augmentation(tmp_path: Path) -> None:
    """dataset/transform=dml_device + dataset.cache=ram through the real trainer (CPU, workers)."""
    root = make_cub(tmp_path / "CUB_200_2011", num_classes=8, images_per_class=6, size=40)
    cfg = compose(
        [
            "dataset=cub",
            f"dataset.root={root}",
            "dataset/transform=dml_device",
            "dataset.cache=ram",
            "dataset.cache_size=28",
            "dataset.transform.resize=28",
            "dataset.transform.crop_size=24",
            "backbone=tiny",
            "backbone.trunk.in_channels=3",
            "sampler.classes_per_batch=2",
            "sampler.samples_per_class=3",
            "trainer.max_iters=4",
            "trainer.num_workers=2",
            "trainer.device=cpu",
            "trainer.progress_bar=false",
            "trainer.plots=false",
            "trainer.tensorboard=false",
        ]
    )
    trainer = Trainer(cfg, tmp_path / "run")
    assert isinstance(trainer.device_transform, DeviceResizedCrop)
    seen = []
    step = trainer.train_step
    trainer.train_step = lambda x, y: seen.append(x) or step(x, y)  # type: ignore[method-assign]
    metrics = trainer.fit()
    assert len(seen) == 4 and all(isinstance(x, PaddedImages) for x in seen)
    assert all(min(map(int, x.sizes.min(0).values)) == 28 for x in seen)  # whole cached images
    assert 0.0 <= metrics["recall@1"] <= 1.0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == metrics
