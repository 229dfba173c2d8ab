"""Unreadable image files: all of a run's found before training, and evaluation items left out.

:func:`check_files` reads the header of every image file of every split (train, test,
query, gallery, the validation reading) in parallel threads, before any training: a
missing, empty or damaged file, a symlink loop or a decompression bomb is then known at
once, all of them together, instead of one at a time, the last ones at the final
evaluation. It opens each file's header only (:func:`~softmine.data.decode.image_header`,
a few tens of microseconds a file), not the pixels; files of a split with a decoded-image
cache are not read again (the cache's build already judged every one of them). Under
``data.on_bad_image=error`` it raises one :class:`~softmine.data.decode.BadImageError`
naming how many files are bad and the first few, the full list written to the run's
``bad_images.txt`` when it is long; under ``skip`` it lists them there (``path<TAB>reason``
per line) and the run goes on.

What ``skip`` does with a bad file depends on what reads it. Training replaces it with
another image of its class (:mod:`softmine.data.images`), or a bad frame with the nearest
readable frame of its tracklet (:mod:`softmine.data.tracklets`). Evaluation never scores a
stand-in: an item whose files are all unreadable (an image item's one file, every frame of
a tracklet) leaves the evaluation, as query and as gallery item alike
(:func:`unreadable_items`, :class:`KeepItems`); the evaluator counts them. A file that
passes the header check but does not decode is found while the split is read
(:func:`collect_unreadable`) and its item is left out the same way.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from softmine.data.decode import BadImageError, file_problem, image_header
from softmine.data.images import ImageDataset
from softmine.data.tracklets import VideoDataset
from softmine.data.views import DatasetView
from softmine.hardware import available_cpus

log = logging.getLogger(__name__)

SHOWN = 5  # files named in full in an error or a warning
BLOCK = 64  # files checked per thread task
CACHED = "found unreadable when the image cache was built"


def base_dataset(dataset: Any) -> ImageDataset | VideoDataset | None:
    """The image or tracklet dataset under any views (label noise, class subsets, ...); None
    for a set without image files (digits, in memory)."""
    seen = 0
    while not isinstance(dataset, ImageDataset | VideoDataset) and seen < 32:
        inner = vars(dataset).get("dataset") if hasattr(dataset, "__dict__") else None
        if inner is None:
            return None
        dataset, seen = inner, seen + 1
    return dataset if isinstance(dataset, ImageDataset | VideoDataset) else None


def item_files(dataset: Any) -> list[tuple[str, ...]] | None:
    """The files each item of ``dataset`` reads, in item order; None without image files.

    An image item reads one file; a tracklet its frames. Views that pick items of another
    dataset (a ``Subset``, held-out classes, :class:`KeepItems`, ...) keep its files
    for the items they pick; other views (label noise) keep them all.
    """
    if isinstance(dataset, ImageDataset):
        return [(p,) for p, _ in dataset.samples]
    if isinstance(dataset, VideoDataset):
        return [tuple(t[0]) for t in dataset.tracklets]
    own = vars(dataset) if hasattr(dataset, "__dict__") else {}
    if own.get("dataset") is None:
        return None
    inner = item_files(own["dataset"])
    index = own.get("index", own.get("indices"))
    if inner is None or index is None:
        return inner
    return [inner[int(j)] for j in index]


def unreadable_items(dataset: Any, bad: Collection[str]) -> np.ndarray:
    """Bool (n,): the items of ``dataset`` all of whose files are in ``bad`` (to leave out).

    An image item with a bad file is one; a tracklet only when no frame is readable (a
    bad frame of it is replaced by the nearest readable one of the same tracklet).
    """
    files = item_files(dataset)
    if files is None or not bad:
        return np.zeros(len(dataset), dtype=bool)
    bad = set(bad)
    return np.fromiter((all(f in bad for f in item) for item in files), bool, len(files))


def known_bad(dataset: Any) -> set[str]:
    """Files this process already knows are unreadable (``bad_images`` of the base dataset)."""
    base = base_dataset(dataset)
    return set() if base is None else set(base.bad_images)


class KeepItems(DatasetView):
    """Some items of ``dataset`` (``index``, in order), with its per-item attributes cut to them.

    What the evaluator reads instead of a split some of whose items are unreadable; every
    other attribute (transform, class names, ...) is the wrapped dataset's.
    """

    OWN = frozenset({"dataset", "index"})

    def __init__(self, dataset: Any, index: np.ndarray) -> None:
        object.__setattr__(self, "dataset", dataset)
        object.__setattr__(self, "index", np.asarray(index, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[int(self.index[i])]

    def _cut(self, name: str) -> Any:
        values = getattr(self.dataset, name)
        if isinstance(values, np.ndarray):
            return values[self.index]
        return [values[int(j)] for j in self.index]

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self._cut("labels"))

    @property
    def pids(self) -> np.ndarray:
        return np.asarray(self._cut("pids"))

    @property
    def camids(self) -> np.ndarray:
        return np.asarray(self._cut("camids"))

    @property
    def tracklets(self) -> list[Any]:
        return self._cut("tracklets")

    @property
    def samples(self) -> list[Any]:
        return self._cut("samples")


def keep_items(dataset: Any, keep: np.ndarray) -> Any:
    """``dataset`` without the items where ``keep`` is False (a :class:`KeepItems`)."""
    keep = np.asarray(keep, dtype=bool)
    if isinstance(dataset, KeepItems):
        return KeepItems(dataset.dataset, dataset.index[keep])
    return KeepItems(dataset, np.flatnonzero(keep))


def read_listing(path: Path) -> dict[str, str]:
    """``bad_images.txt`` as path -> reason (an empty reason for a line without one)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return {}
    out: dict[str, str] = {}
    for line in text.splitlines():
        file, _, reason = line.partition("\t")
        if file and not out.get(file):
            out[file] = reason
    return out


def write_listing(path: Path, bad: Mapping[str, str]) -> None:
    """``bad_images.txt``: ``path<TAB>reason`` per file, sorted; the entries already there stay."""
    merged = read_listing(path)
    merged.update({p: r for p, r in bad.items() if r or p not in merged})
    Path(path).write_text("".join(f"{p}\t{merged[p]}\n" for p in sorted(merged)))


def find_unreadable(paths: Sequence[str], threads: int | None = None) -> dict[str, str]:
    """path -> one-line reason for every file of ``paths`` whose header cannot be read.

    Threads: the work is mostly waiting for the file system (and Pillow's header parsing),
    so a few more threads than CPUs (at most 32).
    """
    threads = threads or min(32, available_cpus() + 4)

    def check(start: int) -> list[tuple[str, str]]:
        out = []
        for p in paths[start : start + BLOCK]:
            try:
                image_header(p)
            except BadImageError as e:
                out.append((p, e.reason))
        return out

    with ThreadPoolExecutor(threads) as pool:
        parts = pool.map(check, range(0, len(paths), BLOCK))
        return dict(pair for part in parts for pair in part)


def _cache_bad(base: ImageDataset | VideoDataset) -> set[str]:
    """The files a built cache of ``base`` marked unreadable."""
    cache = base.cache
    assert cache is not None
    if isinstance(base, ImageDataset):
        return {base.samples[int(i)][0] for i in np.flatnonzero(cache.bad)}
    bad = np.asarray(cache.bad, dtype=bool)
    return {
        f
        for t, ids in zip(base.tracklets, base._cache_ids, strict=True)
        for f, k in zip(t[0], ids, strict=True)
        if bad[int(k)]
    }


def check_files(
    splits: Mapping[str, Any],
    listing: Path | None,
    *,
    write: bool = True,
    threads: int | None = None,
) -> dict[str, str]:
    """Find every unreadable image file of ``splits`` (name -> dataset) before training.

    Returns path -> reason of the bad files. Under a split's ``on_bad_image=error`` any bad
    file raises one :class:`BadImageError` naming the count and the first few (all of them
    in ``listing`` when there are more). Under ``skip`` they go to ``listing``, a warning
    names the first few, and each dataset's ``bad_images`` learns its own (so training
    skips them without trying each again). ``write``: whether this process writes
    ``listing`` (rank 0 of a distributed job). Sets without image files are left alone.
    """
    t0 = time.perf_counter()
    files: dict[str, list[tuple[str, ...]]] = {}
    bases: dict[str, ImageDataset | VideoDataset] = {}
    known: dict[str, str] = {}
    to_read: dict[str, None] = {}
    for name, dataset in splits.items():
        base, items = base_dataset(dataset), item_files(dataset)
        if base is None or items is None:
            continue
        files[name], bases[name] = items, base
        for p in base.bad_images:  # dropped when the dataset was built (missing files)
            known[p] = file_problem(p) or "unreadable"
        if base.cache is not None:  # its build read every file: no need to read them again
            known.update({p: CACHED for p in _cache_bad(base)})
        else:
            to_read.update(dict.fromkeys(f for item in items for f in item))
    bad = {**find_unreadable([p for p in to_read if p not in known], threads), **known}
    n_files = len(to_read)
    if n_files:  # sets without image files (digits) have nothing to say
        log.info(
            "checked the headers of %d image files in %.1f s (data.check_files=false skips this)",
            n_files,
            time.perf_counter() - t0,
        )
    if not bad:
        return bad
    per_split = {
        name: {f for item in items for f in item if f in bad} for name, items in files.items()
    }
    counts = ", ".join(f"{name} {len(v)}" for name, v in per_split.items() if v)
    ordered = sorted(bad)
    shown = "; ".join(f"{p} ({bad[p]})" for p in ordered[:SHOWN])
    more = len(ordered) - SHOWN
    strict = [n for n, v in per_split.items() if v and bases[n].on_bad_image == "error"]
    if strict:
        listed = ""
        if more > 0 and listing is not None:
            if write:
                write_listing(listing, bad)
            listed = f", all listed in {listing}"
        if len(ordered) == 1:
            head, them, their = f"cannot decode image {shown}", "it", "its item"
        else:
            tail = f" and {more} more" if more > 0 else ""
            head = f"{len(ordered)} image files cannot be read ({counts}): {shown}{tail}"
            them, their = "them", "their items"
        raise BadImageError(
            f"{head}{listed}; found before training. Fix or remove {them}, or set "
            f"data.on_bad_image=skip to leave {them} out (training uses another image of the "
            f"class instead, evaluation drops {their})",
            ordered[0],
            bad[ordered[0]],
        )
    for name, base in bases.items():
        base.bad_images.update(per_split[name])
    if listing is not None and write:
        write_listing(listing, bad)
    where = f"; all listed in {listing}" if listing is not None else ""
    log.warning(
        "%d unreadable image files (%s), e.g. %s: training uses another image of the class "
        "(or frame of the tracklet) instead, evaluation leaves their items out%s",
        len(ordered),
        counts,
        shown,
        where,
    )
    return bad


@contextmanager
def collect_unreadable(dataset: Any) -> Iterator[dict[str, str]]:
    """The files found unreadable (path -> reason) while ``dataset`` is read in the block.

    Points the base dataset's ``bad_image_log`` at a temporary file for the block, so the
    DataLoader worker processes report what they skip; the dict is filled when the block
    ends, and the main process's ``bad_images`` learns them (and any earlier log gets them).
    """
    found: dict[str, str] = {}
    base = base_dataset(dataset)
    if base is None:
        yield found
        return
    previous = base.bad_image_log
    fd, tmp = tempfile.mkstemp(prefix="softmine-bad-images-", suffix=".txt")
    os.close(fd)
    base.bad_image_log = tmp
    try:
        yield found
    finally:
        base.bad_image_log = previous
        found.update(read_listing(Path(tmp)))
        os.unlink(tmp)
        base.bad_images.update(found)
        if previous and found:
            with open(previous, "a") as f:
                f.writelines(f"{p}\t{r}\n" for p, r in found.items())
