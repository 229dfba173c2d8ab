"""Decoded-image cache: every image of a split decoded once, resized, kept as uint8 arrays.

``dataset.cache`` chooses where the arrays live:

* ``none`` (default): nothing is cached; every access decodes the file;
* ``ram``: one uint8 buffer in this process's memory (DataLoader workers share it
  through ``fork``; under ``spawn`` torch moves it to shared memory once);
* ``disk``: a memory-mapped file ``<cache folder>/<name>.pixels`` with its index
  ``<name>.index.npz``, built once and reused by later runs; the operating system's
  page cache then keeps the hot part in memory for every process that maps it.

Each image is decoded exactly as without a cache (:func:`softmine.data.decode.read_image`,
crop box included), then resized with torchvision's ``resize`` (bilinear, antialiased)
to ``size``: an int is the short side (what ``Resize(size)`` gives, aspect kept; 256 by
default, the DML recipe's resize), a pair ``(height, width)`` a fixed size (video
frames at the training size). An image stored this way is what the transforms would
have made of the file at that step, so a cached run sees the same pixels.

A disk cache is keyed by the file list (paths relative to the dataset root, crop
boxes), the size and the decoder (the versions of Pillow, torch and torchvision): the
key is in the file name, so a change of any of them builds a new cache, and the
stale one of the same split and size is deleted. Concurrent builders (several ranks,
several jobs) take a file lock; one builds, the others wait and map its result.

Building decodes in parallel threads (torchvision, Pillow and torch release the GIL), one per
available CPU, with a progress bar on a terminal and one log line at the end.
Unreadable images follow ``on_bad_image``: ``error`` stops the build after the header
pass, before any image is decoded, naming every file whose header is unreadable (nothing is
written); ``skip`` stores an empty entry that the dataset treats like any unreadable file
(:mod:`softmine.data.images`). The temporary files of a build that was killed are deleted
by the next build of the same split and size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from softmine.errors import ConfigError
from softmine.hardware import available_cpus

log = logging.getLogger(__name__)

CACHE_MODES = ("none", "ram", "disk")
CACHE_FOLDER = "cache"  # under the dataset root, unless dataset.cache_dir says otherwise
FORMAT = 1  # bump when the stored layout changes: every disk cache is rebuilt
BLOCK = 32  # images decoded per thread task
SHOWN_BAD = 5  # unreadable files named in full in an error

Size = int | tuple[int, int]
Box = tuple[float, float, float, float]


def check_cache_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`CACHE_MODES`, else a ConfigError naming the choices."""
    if str(mode) not in CACHE_MODES:
        raise ConfigError(f"dataset.cache must be one of {CACHE_MODES}, got {mode!r}")
    return str(mode)


def check_cache_size(size: Any) -> Size:
    """An int short side, or a (height, width) pair, all positive; else a ConfigError."""
    values = [size] if isinstance(size, int | float | str) else list(size)
    try:
        ints = [int(v) for v in values]
    except (TypeError, ValueError):
        ints = []
    if len(ints) not in (1, 2) or any(v < 1 for v in ints) or ints != [float(v) for v in values]:
        raise ConfigError(
            f"dataset.cache_size must be a positive int (short side) or [height, width], "
            f"got {size!r}"
        )
    return ints[0] if len(ints) == 1 else (ints[0], ints[1])


def resized_shape(height: int, width: int, size: Size) -> tuple[int, int]:
    """(height, width) after torchvision's ``resize(img, size)`` of an image of that shape.

    An int resizes the short side to ``size`` and the long side to
    ``int(size * long / short)`` (truncated, as torchvision does).
    """
    if not isinstance(size, int):
        return size
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def decoder_id() -> str:
    """What turns a file into cached pixels; part of a disk cache's key."""
    import PIL
    import torchvision

    return (
        f"jpeg-torchvision+pillow-{PIL.__version__}+torch-{torch.__version__}+torchvision-"
        f"{torchvision.__version__}:bilinear-antialias"
    )


class ImageCache:
    """Decoded uint8 images (H, W, 3) of a fixed file list, in one flat buffer.

    Item ``i`` occupies ``pixels[offsets[i]:offsets[i + 1]]``; ``shapes[i]`` is its
    (height, width); ``bad[i]`` marks a file that could not be decoded (empty entry).
    A disk cache pickles as its file path and maps the file again in the receiving
    process (a spawned DataLoader worker), instead of copying the pixels.
    """

    def __init__(
        self,
        pixels: torch.Tensor,
        offsets: np.ndarray,
        shapes: np.ndarray,
        bad: np.ndarray,
        path: Path | None = None,
    ) -> None:
        self.pixels, self.offsets, self.shapes, self.bad = pixels, offsets, shapes, bad
        self.path = path

    def __len__(self) -> int:
        return len(self.shapes)

    @property
    def nbytes(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> torch.Tensor:
        """Image ``i`` as a uint8 (H, W, 3) view into the cache (no copy)."""
        h, w = (int(v) for v in self.shapes[i])
        return self.pixels[int(self.offsets[i]) : int(self.offsets[i + 1])].view(h, w, 3)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.path is not None:
            state["pixels"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.pixels is None:
            self.pixels = _map_pixels(_pixels_file(self.path), self.nbytes)


def _pixels_file(index: Path) -> Path:
    return index.with_name(index.name.removesuffix(".index.npz") + ".pixels")


def _map_pixels(path: Path, nbytes: int) -> torch.Tensor:
    """The file as a flat uint8 tensor, mapped copy-on-write (writes never reach the file)."""
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c", shape=(nbytes,)))


def cache_key(files: Sequence[tuple[str, Box | None]], size: Size, root: Path) -> str:
    """Hex digest of the file list (relative to ``root``), the crop boxes, the size and the decoder."""

    def rel(p: str) -> str:
        try:
            return str(Path(p).relative_to(root))
        except ValueError:
            return str(p)

    payload = {
        "format": FORMAT,
        "decoder": decoder_id(),
        "size": size,
        "files": [[rel(p), None if b is None else [float(v) for v in b]] for p, b in files],
    }
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


def build_cache(
    files: Sequence[tuple[str, Box | None]],
    size: Size,
    mode: str,
    *,
    name: str,
    folder: Path,
    root: Path,
    on_bad_image: str,
    threads: int | None = None,
) -> ImageCache:
    """The cache of ``files`` (path, crop box or None) at ``size``, built or (``disk``) reused.

    Args:
        files: the images, in item order.
        size: short side (int) or (height, width).
        mode: ``ram`` or ``disk``.
        name: readable prefix of the disk files (dataset and split).
        folder: where a disk cache lives (created if needed).
        root: the dataset root; paths in the key are relative to it.
        on_bad_image: ``error`` (a BadImageError naming the first unreadable file) or ``skip``.
        threads: decoding threads (default: the CPUs this process may use).
    """
    threads = threads or available_cpus()
    if mode == "ram":
        return _build(files, size, on_bad_image, threads, name, target=None)
    key = cache_key(files, size, root)
    tag = size if isinstance(size, int) else f"{size[0]}x{size[1]}"
    prefix = f"{name}-{tag}"
    index = folder / f"{prefix}-{key[:16]}.index.npz"
    _make_folder(folder)
    with _locked(folder / f"{prefix}.lock"):
        _remove_temporary(folder, prefix)
        if not index.exists():
            _remove_stale(folder, prefix, keep=index)
            cache = _build(files, size, on_bad_image, threads, name, target=index)
        else:
            cache = _open(index)
            log.info("%s: using the image cache %s (%s)", name, index, _gb(cache.nbytes))
    _check_bad(cache, files, on_bad_image, index)
    return cache


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"cannot write the image cache folder {folder} ({e.strerror or e}); choose a "
            "writable one with dataset.cache_dir=..., or keep the cache in memory with "
            "dataset.cache=ram"
        ) from None


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (no-op where ``fcntl`` does not exist)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: builders may race, each rename is still atomic
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_stale(folder: Path, prefix: str, keep: Path) -> None:
    """Delete caches of the same split and size with another key (the files or decoder changed)."""
    for old in folder.glob(f"{prefix}-*.index.npz"):
        if old != keep:
            log.info("removing the stale image cache %s (its files, size or decoder changed)", old)
            _pixels_file(old).unlink(missing_ok=True)
            old.unlink(missing_ok=True)
    for pixels in folder.glob(f"{prefix}-*.pixels"):  # a build killed between its two renames
        if pixels != _pixels_file(keep):
            log.info("removing %s, an image cache without its index", pixels)
            pixels.unlink(missing_ok=True)


def _remove_temporary(folder: Path, prefix: str) -> None:
    """Delete the temporary files a killed build of this split and size left (pixels, index).

    Called under the split's lock, so no live builder of these files can be writing them.
    """
    for tmp in folder.glob(f"{prefix}-*.tmp*"):
        log.info("removing %s, left by an image cache build that did not finish", tmp)
        tmp.unlink(missing_ok=True)


def _open(index: Path) -> ImageCache:
    with np.load(index) as z:
        offsets, shapes, bad = z["offsets"], z["shapes"], z["bad"]
    return ImageCache(
        _map_pixels(_pixels_file(index), int(offsets[-1])), offsets, shapes, bad, index
    )


def _check_bad(
    cache: ImageCache, files: Sequence[tuple[str, Box | None]], policy: str, index: Path
) -> None:
    """A reused cache with unreadable entries: an error under ``error``, a warning under ``skip``."""
    bad = np.flatnonzero(cache.bad)
    if not len(bad):
        return
    first = files[int(bad[0])][0]
    if policy == "error":
        from softmine.data.decode import BadImageError

        raise BadImageError(
            f"cannot decode image {first} ({len(bad)} unreadable when the image cache {index} "
            "was built); fix the file and delete that cache, or set "
            "data.on_bad_image=skip to leave it out",
            first,
            "found unreadable when the image cache was built",
        )
    log.warning("%d cached images were unreadable (e.g. %s); they are skipped", len(bad), first)


def _header_shape(path: str, box: Box | None) -> tuple[int, int] | str:
    """(height, width) the decoded (cropped) image will have, from the file header; else the
    one-line reason the file is unreadable (missing, empty, not an image, a decompression bomb)."""
    from softmine.data.decode import BadImageError, crop_box, image_header

    try:
        w, h = image_header(path)
    except BadImageError as e:
        return e.reason
    cut = crop_box(box, w, h)
    return (h, w) if cut is None else (cut[3] - cut[1], cut[2] - cut[0])


def _decode(path: str, box: Box | None, size: Size) -> torch.Tensor:
    """The cached form of one file: decoded (cropped) and resized, uint8 (3, H, W)."""
    from torchvision.transforms.v2 import functional as F

    from softmine.data.decode import read_image

    img = read_image(path, box)
    return F.resize(img, [size] if isinstance(size, int) else list(size), antialias=True)


def _build(
    files: Sequence[tuple[str, Box | None]],
    size: Size,
    on_bad_image: str,
    threads: int,
    name: str,
    target: Path | None,
) -> ImageCache:
    """Decode every file into a new buffer (RAM, or ``target``'s pixel file, written atomically)."""
    # imported here, once: two decoding threads importing it at once stalled each other for seconds
    import torchvision.transforms.v2.functional  # noqa: F401
    from tqdm import tqdm

    from softmine.data.decode import BadImageError, jpeg_decoder

    jpeg_decoder()  # loaded once here, not by each thread

    t0 = time.perf_counter()
    n = len(files)
    blocks = range(0, n, BLOCK)  # a task per block: a million frames are not a million futures
    with ThreadPoolExecutor(threads) as pool:
        parts = pool.map(lambda b: [_header_shape(*f) for f in files[b : b + BLOCK]], blocks)
        headers = [h for part in parts for h in part]
    bad = np.array([isinstance(h, str) for h in headers], dtype=bool)
    if bad.any() and on_bad_image == "error":  # before decoding anything: nothing is written
        raise _unreadable_headers(name, files, headers, bad)
    shapes = np.array(
        [(0, 0) if isinstance(h, str) else resized_shape(*h, size) for h in headers],
        dtype=np.int64,
    ).reshape(n, 2)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(shapes[:, 0] * shapes[:, 1] * 3, out=offsets[1:])
    total = int(offsets[-1])
    tmp, mapped = None, None
    if target is None:
        pixels = torch.empty(total, dtype=torch.uint8)
    else:
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        mapped = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=(max(total, 1),))
        pixels = torch.from_numpy(mapped)
    cache = ImageCache(pixels, offsets, shapes, bad)

    def fill(i: int) -> None:
        if bad[i]:
            return
        try:
            img = _decode(*files[i], size)
        except BadImageError:
            if on_bad_image == "error":
                raise
            bad[i] = True
            return
        h, w = img.shape[-2:]
        if (h, w) != tuple(shapes[i]):
            raise RuntimeError(f"{files[i][0]}: decoded to {h}x{w}, expected {tuple(shapes[i])}")
        cache[i].copy_(img.permute(1, 2, 0))

    def fill_block(start: int) -> int:
        for i in range(start, min(start + BLOCK, n)):
            fill(i)
        return min(BLOCK, n - start)

    pool = ThreadPoolExecutor(threads)
    try:
        with tqdm(total=n, desc=f"caching {name}", unit="img", disable=None) as bar:
            for done in pool.map(fill_block, blocks):
                bar.update(done)
        pool.shutdown()
        if mapped is not None:
            mapped.flush()
            del mapped, pixels, cache
            _commit(tmp, target, offsets, shapes, bad)
            cache = _open(target)
    finally:
        pool.shutdown(cancel_futures=True)  # an error stops the build: drop the files not started
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    where = "in memory" if target is None else str(_pixels_file(target))
    log.info(
        "%s: cached %d images (%s, %d unreadable) in %.1f s with %d threads, %s",
        name,
        n,
        _gb(total),
        int(bad.sum()),
        time.perf_counter() - t0,
        threads,
        where,
    )
    if bad.any():
        log.warning(
            "%s: %d images could not be decoded (e.g. %s); they are skipped",
            name,
            int(bad.sum()),
            files[int(np.flatnonzero(bad)[0])][0],
        )
    return cache


def _unreadable_headers(
    name: str, files: Sequence[tuple[str, Box | None]], headers: list[Any], bad: np.ndarray
) -> Exception:
    """The BadImageError naming every file whose header is unreadable (the first few in full)."""
    from softmine.data.decode import BAD_IMAGE_HINT, BadImageError

    where = np.flatnonzero(bad)
    shown = "; ".join(f"{files[int(i)][0]} ({headers[int(i)]})" for i in where[:SHOWN_BAD])
    more = f"; and {len(where) - SHOWN_BAD} more" if len(where) > SHOWN_BAD else ""
    first = int(where[0])
    if len(where) == 1:
        message = f"cannot decode image {files[first][0]} ({headers[first]}); {BAD_IMAGE_HINT}"
    else:
        message = (
            f"{name}: {len(where)} image files cannot be decoded: {shown}{more}; replace them with "
            "good copies or remove them, or set data.on_bad_image=skip to leave them out"
        )
    return BadImageError(message, files[first][0], headers[first])


def _commit(
    tmp: Path, index: Path, offsets: np.ndarray, shapes: np.ndarray, bad: np.ndarray
) -> None:
    """Make the built pixel file and its index visible: pixels renamed first, index last."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, _pixels_file(index))
    index_tmp = index.with_name(f"{index.name}.{os.getpid()}.tmp.npz")
    np.savez(index_tmp, offsets=offsets, shapes=shapes, bad=bad)
    os.replace(index_tmp, index)


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"
