"""The decoded-image cache against decoding every time: same pixels, built once, rebuilt on change.

Reference values come from decoding the files directly (Pillow, then torchvision's
resize), never from the cache code itself.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from softmine.data import CUB200, MARS
from softmine.data import cache as cache_module
from softmine.data.images import BadImageError
from softmine.errors import ConfigError, DataError
from softmine.testing.fakes import make_cub, make_mars


def _photo(path: Path, width: int, height: int, seed: int) -> None:
    """A JPEG with texture (lossy decoding and resampling both matter)."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path, quality=90)


@pytest.fixture(scope="module")
def cub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 classes x 3 images, each a different size (landscape and portrait)."""
    root = make_cub(tmp_path_factory.mktemp("data") / "CUB_200_2011")
    for k, p in enumerate(sorted((root / "images").rglob("*.jpg"))):
        w, h = (40 + 3 * k, 30) if k % 2 else (30, 44 + k)
        _photo(p, w, h, k)
    return root


def _copy(cub: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(cub, tmp_path / "CUB_200_2011"))


def _decoded(path: str, size) -> torch.Tensor:
    img = F.pil_to_tensor(Image.open(path).convert("RGB"))
    return F.resize(img, [size] if isinstance(size, int) else list(size), antialias=True)


@pytest.mark.parametrize("mode", ["ram", "disk"])
def test_cached_items_are_the_decoded_files_resized(cub: Path, tmp_path: Path, mode: str) -> None:
    ds = CUB200(_copy(cub, tmp_path), "train", cache=mode, cache_size=24)
    for i, (path, label) in enumerate(ds.samples):
        img, y = ds[i]
        assert y == label and img.dtype == torch.uint8
        assert torch.equal(img, _decoded(path, 24))
        h, w = Image.open(path).size[::-1]
        short, long = min(h, w), max(h, w)
        assert min(img.shape[1:]) == 24 and max(img.shape[1:]) == int(24 * long / short)


def test_transforms_give_the_same_items_with_and_without_a_cache(cub: Path, tmp_path: Path) -> None:
    """The test transform's Resize(24) is a no-op on a 24-cache: identical tensors."""
    root = _copy(cub, tmp_path)
    test_tf = v2.Compose([v2.ToImage(), v2.Resize(24), v2.CenterCrop(20)])
    plain = CUB200(root, "test", transform=test_tf)
    for mode in ("ram", "disk", "disk"):  # the second disk dataset maps the first one's file
        cached = CUB200(root, "test", transform=test_tf, cache=mode, cache_size=24)
        for i in range(len(plain)):
            assert torch.equal(plain[i][0], cached[i][0])


def test_crop_boxes_are_cut_before_resizing(cub: Path, tmp_path: Path) -> None:
    ds = CUB200(_copy(cub, tmp_path), "train", crop=True, cache="ram", cache_size=[6, 8])
    path = ds.samples[0][0]
    box = F.pil_to_tensor(Image.open(path).convert("RGB"))[:, 2:5, 1:5]  # x=1, y=2, w=4, h=3
    assert torch.equal(ds[0][0], F.resize(box, [6, 8], antialias=True))


def test_disk_cache_is_reused_and_rebuilt_when_its_key_changes(
    cub: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    root = _copy(cub, tmp_path)
    first = CUB200(root, "train", cache="disk", cache_size=24)
    folder = root / "cache"
    built = sorted(p.name for p in folder.glob("*.index.npz"))
    assert len(built) == 1 and built[0].startswith("cub200-train-24-")

    def no_decoding(*args: object) -> None:
        raise AssertionError("a valid cache was decoded again")

    with monkeypatch.context() as m:
        m.setattr(cache_module, "_decode", no_decoding)
        again = CUB200(root, "train", cache="disk", cache_size=24)
        assert torch.equal(again[3][0], first[3][0])
        # another size is another cache, next to this one
        with pytest.raises(AssertionError, match="decoded again"):
            CUB200(root, "train", cache="disk", cache_size=20)
    assert len(list(folder.glob("cub200-train-24-*.index.npz"))) == 1

    # a new decoder (say, a Pillow upgrade) changes the key: rebuilt, the stale one removed
    monkeypatch.setattr(cache_module, "decoder_id", lambda: "another-decoder")
    with caplog.at_level(logging.INFO, logger="softmine.data.cache"):
        CUB200(root, "train", cache="disk", cache_size=24)
    assert "removing the stale image cache" in caplog.text
    now = sorted(p.name for p in folder.glob("cub200-train-24-*"))
    assert len(now) == 2 and built[0] not in now  # one index + its pixels, under a new key

    # so does the file list (crop boxes are part of it)
    cropped = CUB200(root, "train", cache="disk", cache_size=24, crop=True)
    assert cropped.cache.path.name not in now
    box = F.pil_to_tensor(Image.open(cropped.samples[0][0]).convert("RGB"))[:, 2:5, 1:5]
    assert torch.equal(cropped[0][0], F.resize(box, [24], antialias=True))
    assert len(list(folder.glob("cub200-train-24-*.index.npz"))) == 1


def test_disk_cache_pickles_as_its_path(cub: Path, tmp_path: Path) -> None:
    """A spawned DataLoader worker maps the file again instead of receiving the pixels."""
    ds = CUB200(_copy(cub, tmp_path), "test", cache="disk", cache_size=24)
    blob = pickle.dumps(ds)
    assert len(blob) < ds.cache.nbytes
    back = pickle.loads(blob)
    assert all(torch.equal(back[i][0], ds[i][0]) for i in range(len(ds)))


def test_cache_dir_override_and_unwritable_folder(cub: Path, tmp_path: Path) -> None:
    root = _copy(cub, tmp_path)
    CUB200(root, "test", cache="disk", cache_size=24, cache_dir=tmp_path / "elsewhere")
    assert list((tmp_path / "elsewhere").glob("cub200-test-24-*.pixels"))
    assert not (root / "cache").exists()
    blocked = tmp_path / "a-file"  # a folder cannot be made under a file, not even by root
    blocked.write_text("")
    with pytest.raises(ConfigError, match="dataset.cache_dir=") as e:
        CUB200(root, "test", cache="disk", cache_dir=blocked / "cache")
    assert str(blocked / "cache") in str(e.value) and "dataset.cache=ram" in str(e.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cache": "gpu"}, "dataset.cache must be one of"),
        ({"cache": "ram", "cache_size": 0}, "dataset.cache_size must be"),
        ({"cache": "ram", "cache_size": [1, 2, 3]}, "dataset.cache_size must be"),
        ({"cache": "ram", "cache_size": 2.5}, "dataset.cache_size must be"),
    ],
)
def test_bad_cache_options_are_config_errors(cub: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        CUB200(cub, "train", **kwargs)


@pytest.mark.parametrize("mode", ["ram", "disk"])
def test_unreadable_image_stops_the_build_or_is_replaced_within_its_class(
    cub: Path, tmp_path: Path, mode: str
) -> None:
    root = _copy(cub, tmp_path)
    bad = root / "images/001.Fake_Bird_1/Fake_Bird_1_0001_2.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(DataError, match="cannot decode image") as e:
        CUB200(root, "train", cache=mode, cache_size=24)
    assert str(bad) in str(e.value)
    assert not list(root.glob("cache/*.pixels"))  # nothing half-built is left behind

    log_file = tmp_path / "bad.txt"
    ds = CUB200(root, "train", cache=mode, cache_size=24, on_bad_image="skip")
    ds.bad_image_log = str(log_file)
    img, label = ds[1]
    assert label == 0 and torch.equal(img, _decoded(ds.samples[2][0], 24))  # the next of class 1
    assert ds.bad_images == {str(bad)}
    assert log_file.read_text() == f"{bad}\tfound unreadable when the image cache was built\n"
    if mode == "disk":  # reused under `error`: the unreadable entry is named again
        with pytest.raises(BadImageError, match="cannot decode image") as e:
            CUB200(root, "train", cache=mode, cache_size=24)
        assert str(bad) in str(e.value)


def _count_builds(marker: str) -> None:
    original = cache_module._build

    def counted(*args: object, **kwargs: object) -> object:
        with open(marker, "a") as f:
            f.write("built\n")
        return original(*args, **kwargs)

    cache_module._build = counted


def _open_cache(root: str, marker: str) -> None:
    _count_builds(marker)
    CUB200(root, "train", cache="disk", cache_size=24)


def test_concurrent_builders_build_once(cub: Path, tmp_path: Path) -> None:
    """Ranks of one job (or two jobs) opening the same disk cache: one builds, one waits."""
    root = _copy(cub, tmp_path)
    marker = tmp_path / "builds.txt"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_open_cache, args=(str(root), str(marker))) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert marker.read_text() == "built\n"
    assert len(list((root / "cache").glob("*.pixels"))) == 1


# ------------------------------------------------------------------------- video


@pytest.fixture(scope="module")
def mars(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_mars(tmp_path_factory.mktemp("data") / "mars")


@pytest.mark.parametrize("split", ["train", "query", "gallery"])
def test_video_frames_are_cached_at_the_training_size(mars: Path, split: str) -> None:
    plain = MARS(mars, split, seq_len=4, sampling="evenly")
    cached = MARS(mars, split, seq_len=4, sampling="evenly", cache="ram", cache_size=[12, 6])
    frames = len({f for t in plain.tracklets for f in t[0]})
    assert len(cached.cache) == frames  # every frame once, even when clips repeat it
    for i in range(len(plain)):
        clip, *rest = cached[i]
        ref = F.resize(plain[i][0], [12, 6], antialias=True)
        assert clip.shape == (4, 3, 12, 6) and torch.equal(clip, ref)
        assert rest == list(plain[i][1:])
