"""MARS (Zheng et al., ECCV 2016), read from ``bbox_train/``, ``bbox_test/`` and the ``info/`` files.

Layout under ``root``::

    bbox_train/PPPP/PPPPCcTttttFfff.jpg    PPPP identity, c camera 1-6, tttt tracklet, fff frame
    bbox_test/PPPP/...                     PPPP = 0000: distractors; 00-1: junk
    info/train_name.txt                    one bare frame file name per line (order matters)
    info/test_name.txt
    info/tracks_train_info.mat             track_train_info: rows [start, end, pid, camid],
    info/tracks_test_info.mat              track_test_info   start/end 1-based inclusive lines
    info/query_IDX.mat                     query_IDX: 1-based rows of track_test_info

Splits:

* ``train``: the 8,298 tracklets of 625 identities (junk rows, if any, dropped);
  labels are the identities remapped to 0..624.
* ``query``: the 1,980 rows of ``query_IDX`` (junk dropped).
* ``gallery``: the official protocol (``gallery_includes_query=True``, the
  default) is that of the MARS evaluation code (``test_mars.m``,
  ``evaluation_mars.m``): the gallery is *every* test tracklet, queries
  included; the evaluation then ignores gallery items with the query's identity
  and camera (which removes the query itself) and junk. Junk tracklets (pid -1)
  are dropped here, which is equivalent: 11,310 gallery tracklets.
  ``gallery_includes_query=False`` is torchreid's variant: the query rows are
  removed from the gallery as well (9,330 tracklets). MARS has several queries
  per identity, one per camera, so in this variant a query loses the other
  queries of its identity (taken by other cameras) as correct matches; some
  queries keep no match at all and are skipped by the evaluation. The numbers
  of the two protocols are therefore not comparable; papers that follow
  torchreid report the second.
  Distractors (pid 0) stay in the gallery as negatives in both.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from softmine.data.sources import (
    MARS_SOURCE,
    check_root,
    load_mat,
    missing_files,
    read_lines,
    require,
)
from softmine.data.tracklets import Tracklet, VideoDataset
from softmine.errors import DataError

JUNK_PID = -1
DISTRACTOR_PID = 0


def name_pid(name: str) -> int:
    """The identity in a MARS frame name: ``0001C1T0001F001.jpg`` -> 1, ``00-1...`` -> -1."""
    head = name[:4]
    return JUNK_PID if head == "00-1" else int(head)


def read_tracks(root: Path, part: str) -> tuple[list[str], np.ndarray]:
    """(frame names, int64 rows [start, end, pid, camid]) of ``part`` = train | test, checked."""
    names = read_lines(MARS_SOURCE, root / "info" / f"{part}_name.txt")
    mat = root / "info" / f"tracks_{part}_info.mat"
    var = f"track_{part}_info"
    info = np.asarray(load_mat(MARS_SOURCE, mat, [var])[var], dtype=np.int64)
    if info.ndim != 2 or info.shape[1] != 4:
        raise DataError(
            f"{MARS_SOURCE.name}: {var} in {mat} has shape {info.shape}, expected (N, 4) rows "
            f"[start, end, pid, camid]. {MARS_SOURCE.where()}"
        )
    start, end = info[:, 0], info[:, 1]
    bad = np.flatnonzero((start < 1) | (end < start) | (end > len(names)))
    if len(bad):
        r = int(bad[0])
        raise DataError(
            f"{MARS_SOURCE.name}: row {r + 1} of {var} spans lines {start[r]}..{end[r]} but "
            f"info/{part}_name.txt has {len(names)} lines; the two files do not belong "
            f"together or one is truncated. {MARS_SOURCE.where()}"
        )
    for r in range(len(info)):
        for line in (start[r], end[r]):
            name = names[line - 1]
            if name_pid(name) != info[r, 2] or int(name[5]) != info[r, 3]:
                raise DataError(
                    f"{MARS_SOURCE.name}: row {r + 1} of {var} says pid {info[r, 2]}, camera "
                    f"{info[r, 3]}, but line {line} of info/{part}_name.txt is {name}; the two "
                    f"files do not belong together. {MARS_SOURCE.where()}"
                )
    return names, info


class MARS(VideoDataset):
    """MARS tracklets for training (``train``) or the official test protocol (``query``/``gallery``).

    Args:
        root: the folder holding ``bbox_train/``, ``bbox_test/`` and ``info/``.
        split: ``train`` | ``query`` | ``gallery``.
        seq_len: frames per clip (per chunk for ``sampling=all``).
        sampling: ``evenly`` | ``random`` | ``all``; default ``random`` for train,
            ``all`` otherwise (see :mod:`softmine.data.tracklets`).
        transform: applied once per clip to a ``tv_tensors.Video`` (T, C, H, W).
        gallery_includes_query: official MARS gallery (True) or torchreid's (False).
        on_bad_image: ``error`` | ``skip``.
        cache: ``none`` | ``ram`` | ``disk``: decode every frame once into uint8 arrays
            (see :mod:`softmine.data.cache`).
        cache_size: [height, width] of the cached frames (the training size), or a short side.
        cache_dir: folder of a disk cache (default: ``cache/`` under ``root``).

    Attributes:
        rows: 0-based row in ``track_{train,test}_info`` of every tracklet.
    """

    source = MARS_SOURCE

    def __init__(
        self,
        root: str | Path = MARS_SOURCE.folder,
        split: str = "train",
        seq_len: int = 8,
        sampling: str | None = None,
        transform: Callable[[Any], Any] | None = None,
        gallery_includes_query: bool = True,
        on_bad_image: str = "error",
        cache: str = "none",
        cache_size: int | Sequence[int] = (256, 128),
        cache_dir: str | Path | None = None,
    ) -> None:
        super().__init__(
            split, seq_len, sampling, transform, on_bad_image, cache, cache_size, cache_dir
        )
        self.root = check_root(MARS_SOURCE, root)
        self.gallery_includes_query = bool(gallery_includes_query)
        part = "train" if split == "train" else "test"
        folder = require(MARS_SOURCE, self.root / f"bbox_{part}", "folder")
        names, info = read_tracks(self.root, part)
        if split == "train":
            rows = np.arange(len(info))
        else:
            query = self.query_rows(len(info))
            if split == "query":
                rows = query
            elif self.gallery_includes_query:
                rows = np.arange(len(info))
            else:
                rows = np.setdiff1d(np.arange(len(info)), query)
        rows = rows[info[rows, 2] != JUNK_PID]
        self.rows = rows
        self._check_person_folders(folder, {names[info[r, 0] - 1][:4] for r in rows})
        prefix = f"{folder}{os.sep}"
        tracklets: list[Tracklet] = []
        for r in rows:
            start, end, pid, cam = (int(v) for v in info[r])
            frames = tuple(f"{prefix}{n[:4]}{os.sep}{n}" for n in names[start - 1 : end])
            tracklets.append((frames, pid, cam - 1))
        self._setup(tracklets)

    def query_rows(self, num_tracks: int) -> np.ndarray:
        """0-based rows of the test tracks that are queries (``info/query_IDX.mat``)."""
        path = self.root / "info" / "query_IDX.mat"
        idx = np.asarray(load_mat(MARS_SOURCE, path, ["query_IDX"])["query_IDX"], np.int64)
        idx = idx.ravel() - 1
        if len(idx) and (idx.min() < 0 or idx.max() >= num_tracks):
            raise DataError(
                f"{MARS_SOURCE.name}: query_IDX in {path} points outside the {num_tracks} rows "
                f"of track_test_info; the info files do not belong together. "
                f"{MARS_SOURCE.where()}"
            )
        return idx

    @staticmethod
    def _check_person_folders(folder: Path, needed: set[str]) -> None:
        present = set(os.listdir(folder))
        absent = sorted(needed - present)
        if absent:
            raise missing_files(
                MARS_SOURCE,
                [str(folder / a) for a in absent],
                f"info/ (person folders of {folder.name})",
            )
