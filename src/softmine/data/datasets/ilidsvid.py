"""iLIDS-VID (Wang et al., ECCV 2014), read from ``iLIDS-VID.tar`` as published.

Layout under ``root``::

    i-LIDS-VID/sequences/cam1/personNNN/cam1_personNNN_FFFFF.png
    i-LIDS-VID/sequences/cam2/personNNN/cam2_personNNN_FFFFF.png
    train-test people splits/train_test_splits_ilidsvid.mat     (also accepted under i-LIDS-VID/)

300 people (numbered 1-319 with gaps), one sequence per camera. The split file
holds ``ls_set`` (10 x 300): row ``s`` is a permutation of 1-based indices into
the sorted person folders; its first half are the test people and its second
half the training people (Wang et al., 2014; the convention every video re-ID
code base follows). Train: both sequences of the 150 training people. Query:
the cam1 sequences of the 150 test people; gallery: their cam2 sequences.
Results are reported as the mean over the 10 splits (``split_id`` 0..9).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from softmine.data.sources import (
    ILIDSVID_SOURCE,
    Source,
    check_root,
    load_mat,
    natural_key,
    require,
    require_any,
)
from softmine.data.tracklets import Tracklet, VideoDataset
from softmine.errors import ConfigError, DataError


def ls_set_split(
    source: Source, path: Path, people: Sequence[str], split_id: int
) -> tuple[list[str], list[str]]:
    """(train people, test people) of row ``split_id`` of ``ls_set`` in ``path``.

    ``ls_set`` is (num_splits, num_people) of 1-based indices into ``people``;
    the first half of a row is the test set, the second half the training set.
    """
    ls_set = np.asarray(load_mat(source, path, ["ls_set"])["ls_set"], dtype=np.int64)
    if ls_set.ndim != 2:
        raise DataError(f"{source.name}: ls_set in {path} is not a 2-D array. {source.where()}")
    num_splits, num_people = ls_set.shape
    if not 0 <= split_id < num_splits:
        raise ConfigError(
            f"dataset.split_id must lie in 0..{num_splits - 1} ({path.name} has {num_splits} "
            f"splits), got {split_id}"
        )
    if num_people != len(people):
        raise DataError(
            f"{source.name}: {path.name} splits {num_people} people but {len(people)} qualify "
            f"in the sequences folder; the download is incomplete or altered. {source.where()}"
        )
    row = ls_set[split_id]
    if sorted(row.tolist()) != list(range(1, num_people + 1)):
        raise DataError(
            f"{source.name}: row {split_id} of ls_set in {path} is not a permutation of "
            f"1..{num_people}; the file is damaged. {source.where()}"
        )
    half = num_people // 2
    test = [people[i - 1] for i in sorted(row[:half])]
    train = [people[i - 1] for i in sorted(row[half:])]
    return train, test


def person_number(folder: str) -> int:
    """``person012`` / ``person_0012`` -> 12."""
    digits = "".join(ch for ch in folder if ch.isdigit())
    return int(digits)


def sequence(source: Source, folder: Path) -> tuple[str, ...]:
    """The ``*.png`` frames of one sequence folder in temporal order (a DataError if none)."""
    frames = sorted((f for f in os.listdir(folder) if f.lower().endswith(".png")), key=natural_key)
    if not frames:
        raise DataError(f"{source.name}: no .png frames in {folder}. {source.where()}")
    return tuple(str(folder / f) for f in frames)


def person_folders(folder: Path) -> list[str]:
    return sorted((d for d in os.listdir(folder) if (folder / d).is_dir()), key=natural_key)


def video_split_tracklets(
    source: Source,
    cams: Sequence[Path],
    train: Sequence[str],
    test: Sequence[str],
    split: str,
) -> list[Tracklet]:
    """Train: every camera of the train people; query: camera 0 of the test people; gallery: 1."""
    if split == "train":
        wanted = [(p, c) for p in train for c in range(len(cams))]
    else:
        cam = 0 if split == "query" else 1
        wanted = [(p, cam) for p in test]
    return [(sequence(source, cams[c] / p), person_number(p), c) for p, c in wanted]


class ILIDSVID(VideoDataset):
    """iLIDS-VID with the 10 published train/test people splits.

    Args:
        root: the folder holding ``i-LIDS-VID/`` and ``train-test people splits/``.
        split: ``train`` | ``query`` (cam1 of the test people) | ``gallery`` (cam2).
        split_id: which of the 10 splits (0-based row of ``ls_set``).
        seq_len: frames per clip (per chunk for ``sampling=all``).
        sampling: ``evenly`` | ``random`` | ``all``; default ``random`` for train,
            ``all`` otherwise.
        transform: applied once per clip to a ``tv_tensors.Video`` (T, C, H, W).
        on_bad_image: ``error`` | ``skip``.
        cache: ``none`` | ``ram`` | ``disk``: decode every frame once into uint8 arrays
            (see :mod:`softmine.data.cache`).
        cache_size: [height, width] of the cached frames (the training size), or a short side.
        cache_dir: folder of a disk cache (default: ``cache/`` under ``root``).

    Attributes:
        train_people, test_people: person folder names of the chosen split.
    """

    source = ILIDSVID_SOURCE

    def __init__(
        self,
        root: str | Path = ILIDSVID_SOURCE.folder,
        split: str = "train",
        split_id: int = 0,
        seq_len: int = 8,
        sampling: str | None = None,
        transform: Callable[[Any], Any] | None = None,
        on_bad_image: str = "error",
        cache: str = "none",
        cache_size: int | Sequence[int] = (256, 128),
        cache_dir: str | Path | None = None,
    ) -> None:
        super().__init__(
            split, seq_len, sampling, transform, on_bad_image, cache, cache_size, cache_dir
        )
        src = ILIDSVID_SOURCE
        self.root = check_root(src, root)
        self.split_id = int(split_id)
        seqs = self.root / "i-LIDS-VID" / "sequences"
        cams = [require(src, seqs / c, "folder") for c in ("cam1", "cam2")]
        split_name = "train_test_splits_ilidsvid.mat"
        split_file = require_any(
            src,
            [
                self.root / "train-test people splits" / split_name,
                self.root / "i-LIDS-VID" / "train-test people splits" / split_name,
            ],
        )
        people = person_folders(cams[0])
        only = sorted(set(people) ^ set(person_folders(cams[1])))
        if only:
            raise DataError(
                f"{src.name}: person folder {only[0]} exists in only one of {cams[0]} and "
                f"{cams[1]} ({len(only)} such); the download is incomplete. {src.where()}"
            )
        self.train_people, self.test_people = ls_set_split(src, split_file, people, self.split_id)
        self._setup(video_split_tracklets(src, cams, self.train_people, self.test_people, split))
