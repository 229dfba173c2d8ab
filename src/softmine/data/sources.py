"""Where each real dataset is published, how it must be laid out, and its published statistics.

Every loader checks its files through :func:`require`, so a missing or
incomplete download always fails with one :class:`~softmine.errors.DataError`
sentence that names the missing file, where it was looked for, the expected
layout and where the set is published.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from softmine.errors import DataError


@dataclass(frozen=True)
class Source:
    """What a user needs to know to obtain one dataset and unpack it correctly.

    Attributes:
        name: the dataset's published name.
        config: its ``dataset=`` config name.
        folder: the default ``dataset.root`` (relative to the launch directory).
        url: where the publisher distributes it (empty for the user's own data).
        layout: the expected files under ``dataset.root``, in one line.
        stats: the published counts that :mod:`softmine.data.check` compares against.
        key: the config key that points to the data: ``root`` (a folder) or ``file`` (CSV).
        verified_download: ``softmine-data download`` fetches and verifies the published
            archive, which unpacks into the folder named like ``folder``'s last part; for
            the other published sets it prints where to get them and how to unpack them.
    """

    name: str
    config: str
    folder: str
    url: str
    layout: str
    stats: dict[str, int] = field(default_factory=dict)
    key: str = "root"
    verified_download: bool = False

    @property
    def own(self) -> bool:
        """The user's own data (no publisher): nothing to download again."""
        return not self.url

    def where(self) -> str:
        """The end of every data error: expected layout and where the set is published."""
        published = (
            f"{self.name} is published at {self.url}; unpack it unchanged so that "
            f"dataset.root holds those files. "
            if self.url
            else ""
        )
        return (
            f"Expected layout: dataset.{self.key} (default {self.folder}, relative to the "
            f"directory the command is launched from) {'is' if self.key == 'file' else 'holds'} "
            f"{self.layout}. {published}"
            f"Check a copy with `softmine-data check {self.config} ROOT`."
        )


CUB = Source(
    name="CUB-200-2011",
    config="cub",
    folder="data/CUB_200_2011",
    url="https://www.vision.caltech.edu/datasets/cub_200_2011/ (CUB_200_2011.tgz)",
    layout=(
        "images/NNN.Class_Name/*.jpg, images.txt, image_class_labels.txt, classes.txt, "
        "train_test_split.txt, bounding_boxes.txt"
    ),
    stats={"images": 11788, "classes": 200, "train_images": 5864, "test_images": 5924},
    verified_download=True,
)

CARS = Source(
    name="Cars196 (Stanford Cars)",
    config="cars196",
    folder="data/cars196",
    url=(
        "http://ai.stanford.edu/~jkrause/cars/car_dataset.html (car_ims.tgz + cars_annos.mat, "
        "or cars_train.tgz + cars_test.tgz + car_devkit.tgz + cars_test_annos_withlabels.mat)"
    ),
    layout=(
        "either car_ims/000001.jpg... and cars_annos.mat, or cars_train/*.jpg, cars_test/*.jpg, "
        "devkit/cars_train_annos.mat, devkit/cars_meta.mat and "
        "cars_test_annos_withlabels.mat (at the root or in devkit/)"
    ),
    stats={"images": 16185, "classes": 196, "train_images": 8054, "test_images": 8131},
)

MARS_SOURCE = Source(
    name="MARS",
    config="mars",
    folder="data/mars",
    url=(
        "https://zheng-lab-anu.github.io/Project/project_mars.html (bbox_train.zip, "
        "bbox_test.zip) with the info/ folder of https://github.com/liangzheng06/MARS-evaluation"
    ),
    layout=(
        "bbox_train/PPPP/PPPPCcTttttFfff.jpg, bbox_test/PPPP/..., info/train_name.txt, "
        "info/test_name.txt, info/tracks_train_info.mat, info/tracks_test_info.mat, "
        "info/query_IDX.mat"
    ),
    stats={
        "train_frames": 509914,
        "test_frames": 681089,
        "train_tracklets": 8298,
        "train_identities": 625,
        "test_tracklets": 12180,
        "query_tracklets": 1980,
        "gallery_tracklets": 11310,
        "gallery_tracklets_without_query": 9330,
    },
)

ILIDSVID_SOURCE = Source(
    name="iLIDS-VID",
    config="ilidsvid",
    folder="data/ilids-vid",
    url=(
        "https://xiatian-zhu.github.io/downloads_qmul_iLIDS-VID_ReID_dataset.html (iLIDS-VID.tar)"
    ),
    layout=(
        "i-LIDS-VID/sequences/cam1/personNNN/cam1_personNNN_FFFFF.png, "
        "i-LIDS-VID/sequences/cam2/personNNN/..., "
        "train-test people splits/train_test_splits_ilidsvid.mat"
    ),
    stats={
        "identities": 300,
        "tracklets": 600,
        "splits": 10,
        "train_identities": 150,
        "test_identities": 150,
    },
)

PRID_SOURCE = Source(
    name="PRID2011",
    config="prid2011",
    folder="data/prid2011",
    url=(
        "https://www.tugraz.at/institute/icg/research/team-bischof/lrs/downloads/PRID11/ "
        "(prid_2011.zip); the split file train_test_splits_prid.mat ships in the "
        "'train-test people splits' folder of iLIDS-VID.tar"
    ),
    layout=(
        "prid_2011/multi_shot/cam_a/person_NNNN/NNNN.png, "
        "prid_2011/multi_shot/cam_b/person_NNNN/NNNN.png, and train_test_splits_prid.mat "
        "(at the root, in 'train-test people splits/', or in "
        "../ilids-vid/train-test people splits/)"
    ),
    stats={
        "identities": 178,
        "tracklets": 356,
        "splits": 10,
        "train_identities": 89,
        "test_identities": 89,
    },
)

SOP_SOURCE = Source(
    name="Stanford Online Products",
    config="sop",
    folder="data/Stanford_Online_Products",
    url=(
        "https://cvgl.stanford.edu/projects/lifted_struct/ "
        "(Stanford_Online_Products.zip; `softmine-data download sop`)"
    ),
    layout=(
        "Ebay_train.txt, Ebay_test.txt (image_id class_id super_class_id path) and the "
        "image folders they list (bicycle_final/, cabinet_final/, ...)"
    ),
    stats={
        "images": 120053,
        "classes": 22634,
        "train_images": 59551,
        "train_classes": 11318,
        "test_images": 60502,
        "test_classes": 11316,
    },
    verified_download=True,
)

INSHOP_SOURCE = Source(
    name="In-Shop Clothes Retrieval (DeepFashion)",
    config="inshop",
    folder="data/inshop",
    url=(
        "https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html "
        "(Google Drive: 'In-shop Clothes Retrieval Benchmark', files Img/img.zip and "
        "Eval/list_eval_partition.txt)"
    ),
    layout=(
        "Eval/list_eval_partition.txt (or list_eval_partition.txt) and the images it lists "
        "(img/WOMEN/..., img/MEN/...) unpacked from Img/img.zip into Img/ (or into the root)"
    ),
    stats={
        "images": 52712,
        "train_images": 25882,
        "train_items": 3997,
        "query_images": 14218,
        "gallery_images": 12612,
        "test_items": 3985,
    },
)

LPW_SOURCE = Source(
    name="LPW (Labeled Pedestrian in the Wild)",
    config="lpw",
    folder="data/lpw",
    url="http://liuyu.us/dataset/lpw/ (pep_256x128.zip)",
    layout=(
        "pep_256x128/scen{1,2,3}/viewN/PID/FRAME.jpg (or scen1/, scen2/, scen3/ directly): "
        "one folder per identity and view, the same PID in the views of a scene is the "
        "same person"
    ),
    stats={
        "identities": 2731,
        "tracklets": 7694,
        "frames": 590547,
        "train_identities": 1975,
        "train_tracklets": 5866,
        "train_frames": 418739,
        "query_tracklets": 756,
        "query_frames": 63118,
        "gallery_tracklets": 1072,
        "gallery_frames": 108690,
    },
)

IMAGEFOLDER_SOURCE = Source(
    name="image folder",
    config="imagefolder",
    folder="data/images",
    url="",
    layout=(
        "one sub-folder per class, the images below it (CLASS/*.jpg, *.png, ...; any depth); "
        "optionally more such folders as dataset.test_root / query_root / gallery_root"
    ),
)

CSV_SOURCE = Source(
    name="CSV list",
    config="csv",
    folder="data/dataset.csv",
    url="",
    layout=(
        "a CSV file with a header and the columns path,label and optionally "
        "split,is_query,is_gallery,camera,sequence; paths relative to the CSV's folder"
    ),
    key="file",
)

SOURCES: dict[str, Source] = {
    s.config: s
    for s in (
        CUB,
        CARS,
        MARS_SOURCE,
        ILIDSVID_SOURCE,
        PRID_SOURCE,
        SOP_SOURCE,
        INSHOP_SOURCE,
        LPW_SOURCE,
        IMAGEFOLDER_SOURCE,
        CSV_SOURCE,
    )
}


def check_root(source: Source, root: str | Path) -> Path:
    """``root`` as a Path; a DataError if the folder does not exist (naming the download)."""
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(
            f"{source.name}: dataset folder {path.resolve()} does not exist "
            f"(dataset.root={root}). {download_hint(source, path)}{source.where()}"
        )
    return path


def download_hint(source: Source, path: Path) -> str:
    """The ``softmine-data download`` command that puts ``source`` at ``path`` ("" if none).

    A set with a verified archive is downloaded by that command; for the other published
    sets it prints where to get the set and how to unpack it; the user's own have none.
    """
    if not source.url:
        return ""
    if source.verified_download:
        creates = Path(source.folder).name
        if path.name == creates:
            return (
                f"Download it with `softmine-data download {source.config} --root {path.parent}`. "
            )
        return (
            f"Download it with `softmine-data download {source.config} --root DIR`, then "
            f"set dataset.root=DIR/{creates}. "
        )
    return f"`softmine-data download {source.config}` says where to get it and how to unpack it. "


def require(source: Source, path: Path, what: str = "file") -> Path:
    """``path`` if it exists; otherwise a DataError naming it and the expected layout."""
    exists = path.is_dir() if what == "folder" else path.is_file()
    if not exists:
        raise DataError(
            f"{source.name}: missing {what} '{path.name}' (looked for {path.resolve()}). "
            f"{source.where()}"
        )
    return path


def require_any(
    source: Source, candidates: Sequence[Path], what: str = "file", why: str = ""
) -> Path:
    """The first existing path of ``candidates``; otherwise a DataError listing all of them.

    ``why``, when given, follows the list in the message (what else the user should know).
    """
    for path in candidates:
        if path.is_file():
            return path
    looked = ", ".join(str(p.resolve()) for p in candidates)
    note = f"; {why}" if why else ""
    raise DataError(
        f"{source.name}: missing {what} '{candidates[0].name}' (looked for {looked}){note}. "
        f"{source.where()}"
    )


def missing_files(source: Source, paths: Sequence[str], listed_in: str) -> DataError:
    """The error for files that an index lists but that are not on disk."""
    if not source.own:
        why = "the download or extraction is incomplete"
    elif source.key == "file":
        why = (
            "restore them or correct their paths (relative to the CSV's folder), or set "
            "dataset.on_bad_image=skip to leave them out"
        )
    else:
        why = "they were moved or deleted while the folders were read; restore them"
    return DataError(
        f"{source.name}: {len(paths)} file(s) listed in {listed_in} are missing, "
        f"e.g. {paths[0]}; {why}. {source.where()}"
    )


def read_lines(source: Source, path: Path) -> list[str]:
    """Non-empty, stripped lines of a required text file."""
    require(source, path)
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def read_table(source: Source, path: Path, columns: int) -> list[list[str]]:
    """Whitespace-separated rows with exactly ``columns`` fields (the last one may not split)."""
    rows = []
    for n, line in enumerate(read_lines(source, path), start=1):
        row = line.split(maxsplit=columns - 1)
        if len(row) != columns:
            raise DataError(
                f"{source.name}: {path} line {n} has {len(row)} field(s), expected {columns}: "
                f"{line!r}; the file is damaged. {source.where()}"
            )
        rows.append(row)
    return rows


def load_mat(source: Source, path: Path, variables: Sequence[str]) -> dict[str, Any]:
    """The named variables of a required MATLAB .mat file (scipy.io.loadmat)."""
    from scipy.io import loadmat

    require(source, path)
    try:
        mat = loadmat(str(path))
    except Exception as e:  # scipy raises several types for damaged files
        raise DataError(
            f"{source.name}: cannot read {path} as a MATLAB .mat file ({e}); "
            f"re-download it. {source.where()}"
        ) from e
    absent = [v for v in variables if v not in mat]
    if absent:
        present = sorted(k for k in mat if not k.startswith("__"))
        raise DataError(
            f"{source.name}: {path} has no variable(s) {absent} (it has {present}); "
            f"it is not the published file. {source.where()}"
        )
    return {v: mat[v] for v in variables}


def mat_struct_field(source: Source, path: Path, array: np.ndarray, name: str) -> list[Any]:
    """Field ``name`` of every element of a MATLAB struct array, unwrapped to scalars/strings."""
    if array.dtype.names is None or name not in array.dtype.names:
        fields = array.dtype.names or ()
        raise DataError(
            f"{source.name}: the struct array in {path} has no field '{name}' "
            f"(fields: {list(fields)}); it is not the published file. {source.where()}"
        )
    return [mat_value(v) for v in array[name].ravel()]


def mat_value(value: Any) -> Any:
    """A MATLAB cell/scalar as loadmat returns it (nested 1x1 arrays) -> a Python scalar or str."""
    while isinstance(value, np.ndarray):
        if value.dtype.kind == "U":
            return str(value.item()) if value.size == 1 else "".join(value.ravel().tolist())
        if value.size != 1:
            return value
        value = value.item() if value.dtype != object else value.ravel()[0]
    return value.item() if isinstance(value, np.generic) else value


_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple:
    """Sort key that orders embedded numbers numerically (frame 9 before frame 10).

    Names equal as numbers (``1`` and ``01``) are ordered by their text, so every list
    of distinct names has one order, whatever order the names came in.
    """
    return tuple(int(t) if t.isdigit() else t for t in _DIGITS.split(name)), name
