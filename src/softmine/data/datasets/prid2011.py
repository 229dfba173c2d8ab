"""PRID2011 (Hirzer et al., SCIA 2011), multi-shot part, with the splits of Wang et al. (ECCV 2014).

Layout under ``root``::

    prid_2011/multi_shot/cam_a/person_NNNN/NNNN.png     385 people
    prid_2011/multi_shot/cam_b/person_NNNN/NNNN.png     749 people
    train_test_splits_prid.mat                          from iLIDS-VID.tar's
                                                        'train-test people splits/'

Only ``person_0001`` .. ``person_0200`` appear in both cameras (a higher number
is a different person in each camera). The standard protocol keeps the 178 of
these 200 whose sequences have at least 27 frames in both cameras, in folder
order; ``ls_set`` (10 x 178) in the split file holds 1-based indices into that
list, the first half of a row being the test people and the second half the
training people, as for iLIDS-VID. Query: cam_a sequences of the test people;
gallery: their cam_b sequences.

The split file is looked for at ``split_file`` if given, else at
``root/train_test_splits_prid.mat``, ``root/train-test people splits/``, and
``root/../ilids-vid/train-test people splits/`` (where it is when iLIDS-VID is
unpacked next to PRID2011).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from softmine.data.datasets.ilidsvid import (
    ls_set_split,
    person_folders,
    video_split_tracklets,
)
from softmine.data.sources import PRID_SOURCE, check_root, require, require_any
from softmine.data.tracklets import VideoDataset
from softmine.errors import DataError

SHARED_PEOPLE = 200  # person_0001..person_0200 are the same people in cam_a and cam_b
MIN_FRAMES = 27  # the protocol's minimum sequence length in both cameras (178 people)


class PRID2011(VideoDataset):
    """PRID2011 multi-shot with the 10 published train/test people splits.

    Args:
        root: the folder holding ``prid_2011/multi_shot/``.
        split: ``train`` | ``query`` (cam_a of the test people) | ``gallery`` (cam_b).
        split_id: which of the 10 splits (0-based row of ``ls_set``).
        seq_len: frames per clip (per chunk for ``sampling=all``).
        sampling: ``evenly`` | ``random`` | ``all``; default ``random`` for train,
            ``all`` otherwise.
        transform: applied once per clip to a ``tv_tensors.Video`` (T, C, H, W).
        split_file: path of ``train_test_splits_prid.mat`` (default: searched, see module doc).
        min_frames: minimum frames per camera for a person to take part (27 in the protocol).
        on_bad_image: ``error`` | ``skip``.
        cache: ``none`` | ``ram`` | ``disk``: decode every frame once into uint8 arrays
            (see :mod:`softmine.data.cache`).
        cache_size: [height, width] of the cached frames (the training size), or a short side.
        cache_dir: folder of a disk cache (default: ``cache/`` under ``root``).

    Attributes:
        people: the qualifying person folders, in the order ``ls_set`` indexes.
        train_people, test_people: person folder names of the chosen split.
    """

    source = PRID_SOURCE

    def __init__(
        self,
        root: str | Path = PRID_SOURCE.folder,
        split: str = "train",
        split_id: int = 0,
        seq_len: int = 8,
        sampling: str | None = None,
        transform: Callable[[Any], Any] | None = None,
        split_file: str | Path | None = None,
        min_frames: int = MIN_FRAMES,
        on_bad_image: str = "error",
        cache: str = "none",
        cache_size: int | Sequence[int] = (256, 128),
        cache_dir: str | Path | None = None,
    ) -> None:
        super().__init__(
            split, seq_len, sampling, transform, on_bad_image, cache, cache_size, cache_dir
        )
        src = PRID_SOURCE
        self.root = check_root(src, root)
        self.split_id = int(split_id)
        shots = self.root / "prid_2011" / "multi_shot"
        cams = [require(src, shots / c, "folder") for c in ("cam_a", "cam_b")]
        name = "train_test_splits_prid.mat"
        if split_file is not None:
            path = require(src, Path(split_file))
        else:
            path = require_any(
                src,
                [
                    self.root / name,
                    self.root / "train-test people splits" / name,
                    self.root.parent / "ilids-vid" / "train-test people splits" / name,
                ],
            )
        shared = person_folders(cams[0])[:SHARED_PEOPLE]
        absent = [p for p in shared if not (cams[1] / p).is_dir()]
        if absent:
            raise DataError(
                f"{src.name}: {absent[0]} is missing from {cams[1]} ({len(absent)} of the first "
                f"{SHARED_PEOPLE} people missing); the download is incomplete. {src.where()}"
            )
        self.people = [p for p in shared if all(_count(c / p) >= min_frames for c in cams)]
        self.train_people, self.test_people = ls_set_split(src, path, self.people, self.split_id)
        self._setup(video_split_tracklets(src, cams, self.train_people, self.test_people, split))


def _count(folder: Path) -> int:
    return sum(1 for f in folder.iterdir() if f.suffix.lower() == ".png")
