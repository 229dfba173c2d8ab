"""Your own data as a CSV list: images or video tracklets, for retrieval or query/gallery re-ID.

The file has a header row and these columns (any order, extra columns ignored)::

    path        image file, relative to the CSV's folder (or absolute)       required
    label       class / identity name (``1`` and ``01`` are two classes)        required
    split       train | test (OML's "validation" = test)                     optional
    is_query    1/0, true/false, yes/no: the row is a query (test rows)      optional
    is_gallery  the same for the gallery                                     optional
    camera      integer camera of the row (re-ID same-camera rule)           optional
    sequence    name of the tracklet the row (a frame) belongs to            optional

It is the CSV format of open-metric-learning (``label, path, split, is_query,
is_gallery``), so its converted datasets load as they are.

Which rows test:

* a ``split`` column says it for every row;
* otherwise, with ``is_query`` / ``is_gallery`` columns, the rows marked as either
  are the test set, the others train;
* otherwise :func:`softmine.data.custom.held_out` splits them (``split_by``,
  ``test_classes``, ``test_ratio``, ``split_seed``).

The ``query`` / ``gallery`` splits are the test rows marked ``is_query`` /
``is_gallery``. Without a ``camera`` column the query is camera 0 and the gallery
camera 1; a row that is both query and gallery then needs a camera column (else
the query would find itself), which the Market-1501/MARS rule uses to remove it.

With a ``sequence`` column the rows are frames: the rows with the same label,
camera and sequence form one tracklet, its frames in row order, and the dataset
is a :class:`~softmine.data.tracklets.VideoDataset` (splits train, query, gallery).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from softmine.data.custom import held_out, number_names
from softmine.data.image_splits import SPLITS, Item, SplitImages
from softmine.data.images import check_split, note_bad_image
from softmine.data.sources import CSV_SOURCE, missing_files, require
from softmine.data.tracklets import Tracklet, VideoDataset
from softmine.errors import ConfigError, DataError

REQUIRED = ("path", "label")
OPTIONAL = ("split", "is_query", "is_gallery", "camera", "sequence")
TRAIN_VALUES = ("train",)
TEST_VALUES = ("test", "validation")
TRUE = ("1", "true", "yes", "y", "t")
FALSE = ("0", "false", "no", "n", "f", "")


@dataclass
class CSVTable:
    """The parsed rows of a CSV list; optional columns are None when absent.

    Attributes:
        file: the CSV file.
        paths: absolute image path of every row.
        labels: the label text of every row.
        ids: the class id of every row (:func:`softmine.data.custom.number_names`).
        numbering: label text -> id.
        split: the ``split`` text of every row (lower case).
        is_query, is_gallery: bool per row.
        camera: int per row.
        sequence: the sequence text of every row.
    """

    file: Path
    paths: list[str]
    labels: list[str]
    ids: np.ndarray
    numbering: dict[str, int]
    split: list[str] | None = None
    is_query: np.ndarray | None = None
    is_gallery: np.ndarray | None = None
    camera: np.ndarray | None = None
    sequence: list[str] | None = None

    def __len__(self) -> int:
        return len(self.paths)


def _error(file: Path, line: int, message: str) -> DataError:
    return DataError(f"{CSV_SOURCE.name}: {file} line {line}: {message}. {CSV_SOURCE.where()}")


def _flags(file: Path, column: str, values: list[str]) -> np.ndarray:
    out = np.zeros(len(values), dtype=bool)
    for i, v in enumerate(values):
        v = v.strip().lower()
        if v not in TRUE + FALSE:
            raise _error(file, i + 2, f"{column} is {v!r}; use 1/0, true/false or yes/no")
        out[i] = v in TRUE
    return out


def read_csv_table(file: str | Path) -> CSVTable:
    """Parse and check a CSV list (module docstring); one DataError naming the line otherwise."""
    path = require(CSV_SOURCE, Path(file).expanduser())
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        absent = [c for c in REQUIRED if c not in header]
        if absent:
            raise DataError(
                f"{CSV_SOURCE.name}: {path} has no column(s) {absent} in its header {header}; "
                f"the first row must name the columns, at least path,label. {CSV_SOURCE.where()}"
            )
        rows = [{k: (v or "").strip() for k, v in row.items() if k} for row in reader]
    if not rows:
        raise DataError(f"{CSV_SOURCE.name}: {path} has no rows below its header")
    for i, row in enumerate(rows):
        if not row.get("path") or not row.get("label"):
            raise _error(path, i + 2, "the path or label is empty")
    base = path.parent
    labels = [r["label"] for r in rows]
    numbering = number_names(labels)
    table = CSVTable(
        file=path,
        paths=[os.path.join(base, r["path"]) for r in rows],
        labels=labels,
        ids=np.asarray([numbering[v] for v in labels], dtype=np.int64),
        numbering=numbering,
    )
    if "split" in header:
        table.split = [r.get("split", "").lower() for r in rows]
        for i, v in enumerate(table.split):
            if v not in TRAIN_VALUES + TEST_VALUES:
                raise _error(path, i + 2, f"split is {v!r}; use train or test (or validation)")
    for column in ("is_query", "is_gallery"):
        if column in header:
            setattr(table, column, _flags(path, column, [r.get(column, "") for r in rows]))
    if "camera" in header:
        try:
            table.camera = np.asarray([int(r.get("camera", "")) for r in rows], dtype=np.int64)
        except ValueError:
            bad = next(
                i for i, r in enumerate(rows) if not r.get("camera", "").lstrip("-").isdigit()
            )
            raise _error(path, bad + 2, "camera must be an integer") from None
    if "sequence" in header:
        table.sequence = [r.get("sequence", "") for r in rows]
    return table


def row_splits(
    table: CSVTable,
    split_by: str = "images",
    test_classes: Sequence[str] | None = None,
    test_ratio: float = 0.5,
    split_seed: int = 0,
) -> dict[str, np.ndarray]:
    """Bool row masks of the four splits, and the camera of every row in a query/gallery item.

    Returns ``{"train", "test", "query", "gallery"}`` masks (query/gallery all-False
    without the columns) and ``"query_camera"`` / ``"gallery_camera"`` arrays.
    """
    n = len(table)
    if table.split is not None:
        is_test = np.isin(np.asarray(table.split), TEST_VALUES)
    elif table.is_query is not None or table.is_gallery is not None:
        is_test = np.zeros(n, dtype=bool)
        for flags in (table.is_query, table.is_gallery):
            if flags is not None:
                is_test |= flags
    else:
        is_test = held_out(
            table.ids, split_by, test_classes, test_ratio, split_seed, table.numbering
        )
    none = np.zeros(n, dtype=bool)
    query = is_test & (table.is_query if table.is_query is not None else none)
    gallery = is_test & (table.is_gallery if table.is_gallery is not None else none)
    if table.camera is None:
        both = np.flatnonzero(query & gallery)
        if len(both):
            raise _error(
                table.file,
                int(both[0]) + 2,
                f"{len(both)} row(s) are both query and gallery but the CSV has no camera column, "
                "so a query would find itself; add a camera column (same-camera items of the "
                "query's identity are then removed, itself included)",
            )
        query_camera, gallery_camera = np.zeros(n, np.int64), np.ones(n, np.int64)
    else:
        query_camera = gallery_camera = table.camera
    return {
        "train": ~is_test,
        "test": is_test,
        "query": query,
        "gallery": gallery,
        "query_camera": query_camera,
        "gallery_camera": gallery_camera,
    }


def _check_query_gallery(table: CSVTable, split: str) -> None:
    column = f"is_{split}"
    if getattr(table, column) is None:
        raise DataError(
            f"{CSV_SOURCE.name}: {table.file} has no {column} column, so it has no {split} "
            "split; add is_query/is_gallery columns, or evaluate leave-one-out with "
            "dataset.eval_protocol=retrieval"
        )


class CSVImages(SplitImages):
    """The image rows of a CSV list for one split (see the module docstring).

    Args:
        table: the parsed CSV (:func:`read_csv_table`).
        split: ``train`` | ``test`` | ``query`` | ``gallery``.
        transform: callable applied to the Pillow RGB image.
        split_by, test_classes, test_ratio, split_seed: the split rules for a CSV without
            ``split`` / ``is_query`` / ``is_gallery`` columns (:mod:`softmine.data.custom`).
        on_bad_image: ``error`` | ``skip`` (see :mod:`softmine.data.images`).
    """

    source = CSV_SOURCE

    def __init__(
        self,
        table: CSVTable,
        split: str = "train",
        transform: Callable[[Any], Any] | None = None,
        split_by: str = "images",
        test_classes: Sequence[str] | None = None,
        test_ratio: float = 0.5,
        split_seed: int = 0,
        on_bad_image: str = "error",
    ) -> None:
        super().__init__(transform, on_bad_image)
        self.split = check_split(CSV_SOURCE, split, SPLITS)
        self.table = table
        if self.split in ("query", "gallery"):
            _check_query_gallery(table, self.split)
        masks = row_splits(table, split_by, test_classes, test_ratio, split_seed)
        camera = masks.get(f"{self.split}_camera", table.camera)
        if camera is None:
            camera = np.zeros(len(table), np.int64)
        rows = np.flatnonzero(masks[self.split])
        items: list[Item] = [(table.paths[r], int(table.ids[r]), int(camera[r])) for r in rows]
        names = {i: n for n, i in table.numbering.items()}
        self._setup_split(items, names, str(table.file))


class CSVTracklets(VideoDataset):
    """The tracklets (rows grouped by label, camera and ``sequence``) of a CSV list for one split.

    Args:
        table: the parsed CSV, with a ``sequence`` column.
        split: ``train`` | ``query`` | ``gallery``.
        seq_len: frames per clip (per chunk for ``sampling=all``).
        sampling: ``evenly`` | ``random`` | ``all`` (see :mod:`softmine.data.tracklets`).
        transform: applied once per clip to a ``tv_tensors.Video`` (T, C, H, W).
        split_by, test_classes, test_ratio, split_seed: as for :class:`CSVImages`.
        on_bad_image: ``error`` | ``skip``: a missing frame is an error, or left out.
    """

    source = CSV_SOURCE

    def __init__(
        self,
        table: CSVTable,
        split: str = "train",
        seq_len: int = 8,
        sampling: str | None = None,
        transform: Callable[[Any], Any] | None = None,
        split_by: str = "images",
        test_classes: Sequence[str] | None = None,
        test_ratio: float = 0.5,
        split_seed: int = 0,
        on_bad_image: str = "error",
    ) -> None:
        if split == "test":
            raise ConfigError(
                "a CSV with a sequence column holds tracklets, evaluated query against gallery: "
                "set dataset.eval_protocol=reid (or query_gallery) and is_query/is_gallery columns"
            )
        super().__init__(split, seq_len, sampling, transform, on_bad_image)
        self.table = table
        if table.split is None and table.is_query is None and table.is_gallery is None:
            raise DataError(
                f"{CSV_SOURCE.name}: {table.file} has a sequence column but neither a split "
                "column nor is_query/is_gallery columns; mark which tracklets test (a whole "
                "sequence at a time), e.g. with is_query/is_gallery"
            )
        if split in ("query", "gallery"):
            _check_query_gallery(table, split)
        masks = row_splits(table, split_by, test_classes, test_ratio, split_seed)
        camera = masks.get(f"{split}_camera", table.camera)
        if camera is None:
            camera = np.zeros(len(table), np.int64)
        self._setup(self._tracklets(masks, camera))

    def _tracklets(self, masks: dict[str, np.ndarray], camera: np.ndarray) -> list[Tracklet]:
        table, split = self.table, self.split
        groups: dict[tuple[int, int, str], list[int]] = {}
        for r in range(len(table)):
            key = (int(table.ids[r]), int(camera[r]), table.sequence[r])
            groups.setdefault(key, []).append(r)
        missing = [table.paths[r] for r in np.flatnonzero(masks[split])]
        missing = [p for p in missing if not os.path.isfile(p)]
        if missing and self.on_bad_image == "error":
            raise missing_files(CSV_SOURCE, missing, str(table.file))
        absent = set(missing)
        for p in missing:
            note_bad_image(self, p, "frame")
        tracklets: list[Tracklet] = []
        for (pid, cam, _), rows in groups.items():
            inside = masks[split][rows]
            if inside.any() != inside.all():
                raise _error(
                    table.file,
                    rows[0] + 2,
                    f"the tracklet of label {table.labels[rows[0]]!r}, sequence "
                    f"{table.sequence[rows[0]]!r} has rows inside and outside the {split} split; "
                    "give all rows of a sequence the same split / is_query / is_gallery",
                )
            frames = tuple(table.paths[r] for r in rows if table.paths[r] not in absent)
            if inside.all() and frames:
                tracklets.append((frames, pid, cam))
        return tracklets


def CSVDataset(
    file: str | Path,
    split: str = "train",
    transform: Callable[[Any], Any] | None = None,
    seq_len: int = 8,
    sampling: str | None = None,
    split_by: str = "images",
    test_classes: Sequence[str] | None = None,
    test_ratio: float = 0.5,
    split_seed: int = 0,
    on_bad_image: str = "error",
) -> CSVImages | CSVTracklets:
    """The ``split`` of the CSV list ``file``: :class:`CSVTracklets` if it has a ``sequence``
    column, else :class:`CSVImages` (``seq_len`` and ``sampling`` then unused)."""
    table = read_csv_table(file)
    rules = dict(
        split_by=split_by, test_classes=test_classes, test_ratio=test_ratio, split_seed=split_seed
    )
    if table.sequence is not None:
        return CSVTracklets(
            table, split, seq_len, sampling, transform, on_bad_image=on_bad_image, **rules
        )
    return CSVImages(table, split, transform, on_bad_image=on_bad_image, **rules)
