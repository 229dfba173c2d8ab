"""Image decoding (softmine.data.decode.read_image) against Pillow, the reference decoder.

JPEG files go through torchvision's libjpeg-turbo decoder; the pixels must be the
ones Pillow gives, for every colour layout a JPEG can have, and every other format
and every damaged file must behave as under Pillow (same pixels, or one error
naming the file).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from softmine.data.decode import BadImageError, read_image


def photo(h: int = 37, w: int = 53, seed: int = 0) -> np.ndarray:
    """A smooth colour field plus noise: JPEG-like content with every channel distinct."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (h + w)], axis=-1)
    return (base + rng.normal(0, 20, (h, w, 3))).clip(0, 255).astype(np.uint8)


def pillow_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def hwc(t) -> np.ndarray:  # noqa: ANN001
    assert t.dtype.is_floating_point is False and t.dim() == 3 and t.shape[0] == 3
    return t.permute(1, 2, 0).numpy()


@pytest.mark.parametrize(
    ("mode", "options"),
    [
        ("RGB", {"quality": 90}),
        ("RGB", {"quality": 75, "subsampling": 0}),  # 4:4:4
        ("RGB", {"quality": 95, "progressive": True}),
        ("L", {"quality": 90}),  # grayscale JPEG: replicated to three channels
        ("CMYK", {"quality": 90}),
    ],
)
def test_jpeg_pixels_equal_pillows(tmp_path: Path, mode: str, options: dict) -> None:
    path = tmp_path / "a.jpg"
    Image.fromarray(photo()).convert(mode).save(path, **options)
    got = hwc(read_image(str(path)))
    np.testing.assert_array_equal(got, pillow_rgb(path))


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".gif", ".webp"])
def test_other_formats_go_through_pillow(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"a{suffix}"
    Image.fromarray(photo()).save(path)
    np.testing.assert_array_equal(hwc(read_image(str(path))), pillow_rgb(path))


def test_a_jpeg_with_another_suffix_and_a_png_named_jpg(tmp_path: Path) -> None:
    jpeg, png = tmp_path / "a.png", tmp_path / "b.jpg"
    Image.fromarray(photo()).save(jpeg, format="JPEG")
    Image.fromarray(photo(seed=1)).save(png, format="PNG")
    np.testing.assert_array_equal(hwc(read_image(str(jpeg))), pillow_rgb(jpeg))
    np.testing.assert_array_equal(hwc(read_image(str(png))), photo(seed=1))


def test_crop_box_is_rounded_outwards_and_clipped(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    pixels = photo()
    Image.fromarray(pixels).save(path)
    # (left, top, right, bottom), Pillow's convention: floor the start, ceil the end, clip
    cut = read_image(str(path), (2.5, 3.2, 10.1, 500.0))
    np.testing.assert_array_equal(hwc(cut), pixels[3:37, 2:11])
    whole = read_image(str(path), (60.0, 0.0, 70.0, 10.0))  # nothing left: the box is ignored
    np.testing.assert_array_equal(hwc(whole), pixels)


def test_channels_are_innermost_in_memory(tmp_path: Path) -> None:
    """The layout torchvision's uint8 resize reads without a copy."""
    path = tmp_path / "a.jpg"
    Image.fromarray(photo()).save(path)
    img = read_image(str(path))
    assert img.stride() == (1, 3 * 53, 3)


def test_missing_truncated_and_garbage_files_are_one_error_naming_the_file(
    tmp_path: Path,
) -> None:
    good = tmp_path / "good.jpg"
    Image.fromarray(photo(200, 300)).save(good, quality=90)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\xff\xd8 this is not a jpeg")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(BadImageError, match="does not exist") as e:
        read_image(str(tmp_path / "gone.jpg"))
    assert "gone.jpg" in str(e.value)
    for bad in (truncated, garbage, empty):
        with Image.open(good):  # Pillow reads the intact file, and rejects the damaged ones
            pass
        with pytest.raises(OSError):
            pillow_rgb(bad)
        with pytest.raises(BadImageError, match="cannot decode image") as e:
            read_image(str(bad))
        assert str(bad) in str(e.value) and "on_bad_image=skip" in str(e.value)


def test_jpeg_goes_through_torchcodec_and_pillow_decodes_when_it_cannot_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from softmine.data import decode

    path = tmp_path / "a.jpg"
    Image.fromarray(photo()).save(path, quality=90)
    real = decode.jpeg_decoder()
    assert real is not None, "TorchCodec (a dependency) should load with this torch"
    calls: list[object] = []

    def spy(data, mode):  # noqa: ANN001, ANN202
        calls.append(mode)
        return real(data, mode=mode)

    monkeypatch.setattr(decode, "jpeg_decoder", lambda: spy)
    fast = hwc(read_image(str(path)))
    assert calls == ["RGB"]
    monkeypatch.setattr(decode, "jpeg_decoder", lambda: None)
    np.testing.assert_array_equal(hwc(read_image(str(path))), fast)
    np.testing.assert_array_equal(fast, pillow_rgb(path))


def test_a_torchcodec_that_cannot_load_is_one_log_line_not_an_error(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import builtins
    import logging

    from softmine.data import decode

    real_import = builtins.__import__

    def broken(name, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if name.startswith("torchcodec"):
            raise OSError("undefined symbol: built for another torch")
        return real_import(name, *args, **kwargs)

    decode.jpeg_decoder.cache_clear()
    monkeypatch.setattr(builtins, "__import__", broken)
    try:
        with caplog.at_level(logging.INFO, logger="softmine.data.decode"):
            assert decode.jpeg_decoder() is None
    finally:
        monkeypatch.undo()
        decode.jpeg_decoder.cache_clear()
    assert "decoded with Pillow" in caplog.text and "another torch" in caplog.text
    assert decode.jpeg_decoder() is not None
