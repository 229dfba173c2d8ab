"""LPW, Labeled Pedestrian in the Wild (Song et al., AAAI 2018), read from ``pep_256x128``.

Layout under ``root`` (the publisher's ``pep_256x128/`` folder, or the folder
holding it)::

    scen1/view1/PID/FRAME.jpg     3 views in scene 1, 4 in scenes 2 and 3
    scen1/view2/...               PID: a number, not contiguous; the same PID in
    ...                           the views of one scene is the same person
    scen3/view4/...               FRAME: the frame number

established from the dataset page (http://liuyu.us/dataset/lpw/: "The number of
the folder indicates the identity of a person but it is not continuous. The same
number in the different views of the same scene means same person"; identities
per view) and public loaders of ``pep_256x128`` (e.g. the scen/view/PID/FRAME.jpg
walk of several re-ID code bases). Each (scene, view, PID) folder is one tracklet.

Protocol (Song et al., 2018, and Wang et al., AAAI 2019, whose LPW evaluation takes
the 756 view-2 tracklets of scene 1 as probe): train on every tracklet of scenes
2 and 3 (1,975 people, 5,866 tracklets); query = the tracklets of scene 1 view 2
(756); gallery = the tracklets of the other views of scene 1 (1,072).

Ids: ``pid = 100000 * scene + PID`` (person numbers are per scene), cameras
``camid = 10 * (scene - 1) + view - 1``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from softmine.data.sources import LPW_SOURCE, check_root, natural_key, require
from softmine.data.tracklets import Tracklet, VideoDataset
from softmine.errors import DataError

SCENES = (1, 2, 3)
TEST_SCENE = 1
QUERY_VIEW = 2
PID_BASE = 100_000
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png")
_VIEW = re.compile(r"^view(\d+)$")


def scene_root(root: Path) -> Path:
    """The folder holding ``scen1``..``scen3``: ``root`` itself or ``root/pep_256x128``."""
    for candidate in (root, root / "pep_256x128"):
        if (candidate / "scen1").is_dir():
            return candidate
    return require(LPW_SOURCE, root / "scen1", "folder")


def read_tracklets(base: Path, scenes: tuple[int, ...]) -> list[tuple[int, int, int, Path]]:
    """(scene, view, PID, folder) of every tracklet folder in ``scenes``, in natural order."""
    src = LPW_SOURCE
    out = []
    for scene in scenes:
        folder = require(src, base / f"scen{scene}", "folder")
        views = sorted((v for v in os.listdir(folder) if _VIEW.match(v)), key=natural_key)
        if not views:
            raise DataError(f"{src.name}: {folder} has no viewN folders. {src.where()}")
        for view in views:
            for person in sorted(os.listdir(folder / view), key=natural_key):
                if not person.isdigit():
                    continue
                if int(person) >= PID_BASE:
                    raise DataError(
                        f"{src.name}: person folder {folder / view / person} has a number >= "
                        f"{PID_BASE}; this is not the published layout. {src.where()}"
                    )
                out.append((scene, int(_VIEW.match(view)[1]), int(person), folder / view / person))
    return out


def frames_of(folder: Path) -> tuple[str, ...]:
    """The frames of one tracklet folder in temporal (numeric) order; a DataError if none."""
    names = sorted(
        (f for f in os.listdir(folder) if f.lower().endswith(FRAME_EXTENSIONS)), key=natural_key
    )
    if not names:
        raise DataError(f"{LPW_SOURCE.name}: no frames in {folder}. {LPW_SOURCE.where()}")
    return tuple(str(folder / f) for f in names)


class LPW(VideoDataset):
    """LPW tracklets: scenes 2 and 3 train; scene 1 view 2 queries its other views.

    Args:
        root: the ``pep_256x128`` folder (holding ``scen1``..``scen3``) or its parent.
        split: ``train`` | ``query`` | ``gallery``.
        seq_len: frames per clip (per chunk for ``sampling=all``).
        sampling: ``evenly`` | ``random`` | ``all``; default ``random`` for train,
            ``all`` otherwise (see :mod:`softmine.data.tracklets`).
        transform: applied once per clip to a ``tv_tensors.Video`` (T, C, H, W).
        on_bad_image: ``error`` | ``skip``.

    Attributes:
        scenes, views: scene and view of every tracklet.
    """

    source = LPW_SOURCE

    def __init__(
        self,
        root: str | Path = LPW_SOURCE.folder,
        split: str = "train",
        seq_len: int = 8,
        sampling: str | None = None,
        transform: Callable[[Any], Any] | None = None,
        on_bad_image: str = "error",
    ) -> None:
        super().__init__(split, seq_len, sampling, transform, on_bad_image)
        self.root = check_root(LPW_SOURCE, root)
        base = scene_root(self.root)
        if split == "train":
            chosen = read_tracklets(base, tuple(s for s in SCENES if s != TEST_SCENE))
        else:
            test = read_tracklets(base, (TEST_SCENE,))
            chosen = [t for t in test if (t[1] == QUERY_VIEW) == (split == "query")]
        self.scenes = [s for s, _, _, _ in chosen]
        self.views = [v for _, v, _, _ in chosen]
        tracklets: list[Tracklet] = [
            (frames_of(folder), PID_BASE * scene + person, 10 * (scene - 1) + view - 1)
            for scene, view, person, folder in chosen
        ]
        self._setup(tracklets)
