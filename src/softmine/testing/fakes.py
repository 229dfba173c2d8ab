"""Tiny fake copies of the real datasets, in exactly their published layouts, for tests.

``make_cub``, ``make_cars``, ``make_sop``, ``make_inshop`` (images), ``make_mars``,
``make_ilidsvid``, ``make_prid2011``, ``make_lpw`` (video), and for your own data
``make_image_folder`` and ``make_csv``. Each ``make_*`` function writes a few
classes / identities of small images under ``root`` with the same folder
structure, file names, text-file formats
and ``.mat`` variables (written with :func:`scipy.io.savemat`, struct arrays
with the published field names) as the real download, and returns ``root``.
The loaders cannot tell them from the real thing except by size, so they serve
the data tests, the training tests (e.g. ``experiment=authors_cub`` on a fake
CUB: pass ``num_classes=16, images_per_class=7`` for an 8 x 7 P x K batch) and
anyone trying the pipeline without the download.

Pixel values: image ``n`` of a class is a horizontal/vertical gradient
(red = 16 * x, green = 16 * y) with blue = 8 * (class index mod 32), so crops
can be checked by position.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, width: int = 8, height: int = 8, blue: int = 0) -> Path:
    """A small RGB gradient image (format from the suffix: JPEG at quality 95, or PNG)."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack(
        [np.clip(16 * x, 0, 255), np.clip(16 * y, 0, 255), np.full_like(x, blue % 256)], -1
    ).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(pixels, "RGB")
    if path.suffix.lower() in (".jpg", ".jpeg"):
        img.save(path, quality=95)
    else:
        img.save(path)
    return path


def _savemat(path: Path, variables: dict) -> None:
    from scipy.io import savemat

    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(str(path), variables)


def _struct_array(fields: Sequence[str], rows: Sequence[Sequence[object]]) -> np.ndarray:
    """A 1 x n MATLAB struct array: ``rows[i][k]`` is field ``fields[k]`` of element i."""
    arr = np.zeros((1, len(rows)), dtype=[(f, object) for f in fields])
    for i, row in enumerate(rows):
        arr[0, i] = tuple(row)
    return arr


def _scalar(v: float, dtype: str = "uint16") -> np.ndarray:
    return np.array([[v]], dtype=dtype)


def _cell(strings: Sequence[str]) -> np.ndarray:
    cell = np.empty((1, len(strings)), dtype=object)
    for i, s in enumerate(strings):
        cell[0, i] = np.array([s])
    return cell


# ---------------------------------------------------------------- CUB-200-2011


def make_cub(
    root: str | Path,
    num_classes: int = 4,
    images_per_class: int | Sequence[int] = 3,
    size: int = 8,
) -> Path:
    """A fake ``CUB_200_2011/`` folder: ``num_classes`` classes of ``images_per_class`` JPEGs.

    ``images_per_class`` is one count for every class, or a count per class (e.g. the
    real CUB's uneven classes: 5,864 training and 5,924 test images).

    Image ids run 1.. in class order; image ``k`` of a class is ``size + k``
    pixels wide and ``size`` high; its box in ``bounding_boxes.txt`` is
    ``x = 1, y = 2, w = 4, h = 3`` (written as floats, as in the real file).
    Classes ``1..num_classes // 2`` form the metric-learning train split.
    """
    root = Path(root)
    lines: dict[str, list[str]] = {k: [] for k in ("images", "labels", "classes", "split", "box")}
    counts = (
        [images_per_class] * num_classes
        if isinstance(images_per_class, int)
        else list(images_per_class)
    )
    if len(counts) != num_classes:
        raise ValueError(f"images_per_class has {len(counts)} counts for {num_classes} classes")
    image_id = 0
    for c, count in enumerate(counts, start=1):
        folder = f"{c:03d}.Fake_Bird_{c}"
        lines["classes"].append(f"{c} {folder}")
        for k in range(count):
            image_id += 1
            rel = f"{folder}/Fake_Bird_{c}_{k:04d}_{image_id}.jpg"
            write_image(root / "images" / rel, size + k, size, blue=8 * c)
            lines["images"].append(f"{image_id} {rel}")
            lines["labels"].append(f"{image_id} {c}")
            lines["split"].append(f"{image_id} {image_id % 2}")
            lines["box"].append(f"{image_id} 1.0 2.0 4.0 3.0")
    files = {
        "images": "images.txt",
        "labels": "image_class_labels.txt",
        "classes": "classes.txt",
        "split": "train_test_split.txt",
        "box": "bounding_boxes.txt",
    }
    for key, name in files.items():
        (root / name).write_text("\n".join(lines[key]) + "\n")
    return root


# ---------------------------------------------------------------------- Cars196


def make_cars(
    root: str | Path,
    layout: str = "annos",
    num_classes: int = 4,
    images_per_class: int = 3,
    size: int = 8,
    labels_in_devkit: bool = False,
) -> Path:
    """A fake Cars196 folder in distribution ``annos`` or ``devkit`` (see softmine.data.datasets.cars).

    Images are numbered in class order (class 1 first). Every image is
    ``size + 4`` x ``size`` pixels with the box ``bbox_x1=2, bbox_y1=3,
    bbox_x2=6, bbox_y2=7`` (MATLAB 1-based inclusive, so a 5 x 5 crop). In the
    devkit layout images alternate between ``cars_train/`` and ``cars_test/``
    (the release's own split, which the metric-learning protocol ignores), and
    ``cars_test_annos_withlabels.mat`` goes to the root, or to ``devkit/`` with
    ``labels_in_devkit``. An unlabelled ``devkit/cars_test_annos.mat`` is written too.
    """
    root = Path(root)
    names = [f"Fake Car {c} 2012" for c in range(1, num_classes + 1)]
    box = [_scalar(2), _scalar(3), _scalar(6), _scalar(7)]
    per_image = [(c, n) for c in range(1, num_classes + 1) for n in range(images_per_class)]
    if layout == "annos":
        rows = []
        for i, (c, _) in enumerate(per_image, start=1):
            rel = f"car_ims/{i:06d}.jpg"
            write_image(root / rel, size + 4, size, blue=8 * c)
            rows.append([np.array([rel]), *box, _scalar(c, "uint8"), _scalar(i % 2, "uint8")])
        fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
        _savemat(
            root / "cars_annos.mat",
            {"annotations": _struct_array(fields, rows), "class_names": _cell(names)},
        )
        return root
    if layout != "devkit":
        raise ValueError(f"layout must be 'annos' or 'devkit', got {layout!r}")
    parts: dict[str, list[list[object]]] = {"train": [], "test": []}
    for i, (c, _) in enumerate(per_image):
        part = "train" if i % 2 == 0 else "test"
        fname = f"{len(parts[part]) + 1:05d}.jpg"
        write_image(root / f"cars_{part}" / fname, size + 4, size, blue=8 * c)
        parts[part].append([*box, _scalar(c, "uint8"), np.array([fname])])
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
    devkit = root / "devkit"
    _savemat(
        devkit / "cars_train_annos.mat", {"annotations": _struct_array(fields, parts["train"])}
    )
    labelled = devkit if labels_in_devkit else root
    _savemat(
        labelled / "cars_test_annos_withlabels.mat",
        {"annotations": _struct_array(fields, parts["test"])},
    )
    unlabelled = [[*r[:4], r[5]] for r in parts["test"]]
    _savemat(
        devkit / "cars_test_annos.mat",
        {"annotations": _struct_array([*fields[:4], "fname"], unlabelled)},
    )
    _savemat(devkit / "cars_meta.mat", {"class_names": _cell(names)})
    return root


# ------------------------------------------------------------------------- MARS

# (pid, camera 1..6, number of frames) per tracklet, in the order of the name files.
MARS_TRAIN = [(1, 1, 3), (1, 2, 4), (3, 1, 5), (3, 3, 2), (3, 3, 6), (7, 2, 3), (7, 5, 4)]
MARS_TEST = [
    (-1, 1, 2),  # junk
    (-1, 4, 3),  # junk
    (0, 2, 3),  # distractor
    (0, 6, 2),  # distractor
    (2, 1, 4),
    (2, 2, 3),
    (2, 2, 5),
    (4, 1, 3),
    (4, 3, 2),
    (4, 5, 6),
    (6, 4, 3),
    (6, 6, 4),
]
# 1-based rows of MARS_TEST that are queries: one per (identity, camera) chosen by the publisher.
MARS_QUERY_IDX = [5, 6, 8, 10, 11]


def _mars_part(
    root: Path, part: str, tracks: Sequence[tuple[int, int, int]], size: int
) -> tuple[list[str], np.ndarray]:
    names: list[str] = []
    info = np.zeros((len(tracks), 4), dtype=np.float64)
    counter: dict[tuple[int, int], int] = {}
    for r, (pid, cam, frames) in enumerate(tracks):
        head = "00-1" if pid == -1 else f"{pid:04d}"
        t = counter[pid, cam] = counter.get((pid, cam), 0) + 1
        start = len(names) + 1
        for f in range(1, frames + 1):
            name = f"{head}C{cam}T{t:04d}F{f:03d}.jpg"
            write_image(root / f"bbox_{part}" / head / name, size, 2 * size, blue=8 * (pid + 1))
            names.append(name)
        info[r] = (start, len(names), pid, cam)
    return names, info


def make_mars(
    root: str | Path,
    train: Sequence[tuple[int, int, int]] = MARS_TRAIN,
    test: Sequence[tuple[int, int, int]] = MARS_TEST,
    query_idx: Sequence[int] = MARS_QUERY_IDX,
    size: int = 4,
) -> Path:
    """A fake MARS folder: ``bbox_train/``, ``bbox_test/`` and ``info/`` exactly as published.

    ``train``/``test`` list ``(pid, camera, frames)`` per tracklet (pid -1 junk,
    0 distractor); ``query_idx`` are 1-based rows of ``test``. Frames are
    ``size`` x ``2 * size`` JPEGs named ``PPPPCcTttttFfff.jpg``.
    """
    root = Path(root)
    for part, tracks in (("train", train), ("test", test)):
        names, info = _mars_part(root, part, tracks, size)
        (root / "info").mkdir(parents=True, exist_ok=True)
        (root / "info" / f"{part}_name.txt").write_text("\n".join(names) + "\n")
        _savemat(root / "info" / f"tracks_{part}_info.mat", {f"track_{part}_info": info})
    query = np.asarray(query_idx, dtype=np.float64).reshape(1, -1)
    _savemat(root / "info" / "query_IDX.mat", {"query_IDX": query})
    return root


# -------------------------------------------------------------------- iLIDS-VID

ILIDS_PEOPLE = [1, 2, 4, 5, 7, 8, 10, 13]  # gaps in the numbering, as in the real set


def make_ilidsvid(
    root: str | Path,
    people: Sequence[int] = ILIDS_PEOPLE,
    num_splits: int = 3,
    splits_in_data_folder: bool = False,
    seed: int = 0,
) -> Path:
    """A fake iLIDS-VID folder: ``i-LIDS-VID/sequences/cam{1,2}/personNNN/`` and the split file.

    Person ``p`` has ``3 + p % 4`` frames in cam1 and ``4 + p % 3`` in cam2,
    named ``camC_personNNN_FFFFF.png`` from a person-specific start frame.
    ``ls_set`` is ``num_splits`` random permutations of ``1..len(people)``
    (seeded), stored under ``train-test people splits/`` at the root, or inside
    ``i-LIDS-VID/`` with ``splits_in_data_folder``.
    """
    root = Path(root)
    for cam, extra in ((1, lambda p: 3 + p % 4), (2, lambda p: 4 + p % 3)):
        for p in people:
            folder = root / "i-LIDS-VID" / "sequences" / f"cam{cam}" / f"person{p:03d}"
            first = 100 + 7 * p
            for f in range(first, first + extra(p)):
                write_image(folder / f"cam{cam}_person{p:03d}_{f:05d}.png", 4, 8, blue=8 * p)
    rng = np.random.default_rng(seed)
    ls_set = np.stack([rng.permutation(len(people)) + 1 for _ in range(num_splits)])
    base = root / "i-LIDS-VID" if splits_in_data_folder else root
    _savemat(
        base / "train-test people splits" / "train_test_splits_ilidsvid.mat",
        {"ls_set": ls_set.astype(np.float64)},
    )
    return root


# --------------------------------------------------------------------- PRID2011

# person number -> (frames in cam_a, frames in cam_b); people with < 27 in either camera
# are outside the protocol.
PRID_PEOPLE = {1: (27, 30), 2: (40, 28), 3: (12, 33), 4: (29, 27), 5: (30, 26), 6: (28, 31)}


def make_prid2011(
    root: str | Path,
    people: dict[int, tuple[int, int]] | None = None,
    only_cam_a: Sequence[int] = (),
    only_cam_b: Sequence[int] = (),
    num_splits: int = 3,
    split_location: str = "root",
    seed: int = 0,
) -> Path:
    """A fake PRID2011 folder: ``prid_2011/multi_shot/cam_{a,b}/person_NNNN/NNNN.png`` + splits.

    ``people`` maps person number -> (frames in cam_a, frames in cam_b)
    (default :data:`PRID_PEOPLE`); ``only_cam_a``/``only_cam_b`` add people with
    30 frames in one camera only. ``ls_set`` indexes the people among
    ``person_0001..person_0200`` with >= 27 frames in both cameras, and is saved
    as ``train_test_splits_prid.mat`` at ``split_location``: ``root``,
    ``people_splits`` (``root/train-test people splits/``) or ``ilids_sibling``
    (``root/../ilids-vid/train-test people splits/``).
    """
    root = Path(root)
    people = dict(PRID_PEOPLE if people is None else people)
    cams = {"a": {p: n[0] for p, n in people.items()}, "b": {p: n[1] for p, n in people.items()}}
    cams["a"].update({p: 30 for p in only_cam_a})
    cams["b"].update({p: 30 for p in only_cam_b})
    for cam, counts in cams.items():
        for p, n in counts.items():
            folder = root / "prid_2011" / "multi_shot" / f"cam_{cam}" / f"person_{p:04d}"
            for f in range(1, n + 1):
                write_image(folder / f"{f:04d}.png", 4, 8, blue=8 * p)
    shared = sorted(cams["a"])[:200]
    qualifying = [p for p in shared if min(cams["a"][p], cams["b"].get(p, 0)) >= 27]
    rng = np.random.default_rng(seed)
    ls_set = np.stack([rng.permutation(len(qualifying)) + 1 for _ in range(num_splits)])
    folder = {
        "root": root,
        "people_splits": root / "train-test people splits",
        "ilids_sibling": root.parent / "ilids-vid" / "train-test people splits",
    }[split_location]
    _savemat(folder / "train_test_splits_prid.mat", {"ls_set": ls_set.astype(np.float64)})
    return root


# ---------------------------------------------------------- Stanford Online Products

SOP_SUPER_CLASSES = ("bicycle", "cabinet", "chair", "coffee_maker")


def make_sop(
    root: str | Path, train_classes: int = 3, test_classes: int = 3, images_per_class: int = 2
) -> Path:
    """A fake ``Stanford_Online_Products/`` folder: ``Ebay_train.txt``, ``Ebay_test.txt``, images.

    Class ids run 1..train_classes in ``Ebay_train.txt`` and on in ``Ebay_test.txt``
    (class-disjoint, as published); class ``c`` lies in super-class folder
    ``SOP_SUPER_CLASSES[c % 4] + "_final"`` and its images are
    ``<product id>_<k>.JPG`` (8 x 8 JPEGs).
    """
    root = Path(root)
    image_id = 0
    classes = {"train": range(1, train_classes + 1)}
    classes["test"] = range(train_classes + 1, train_classes + test_classes + 1)
    for part, ids in classes.items():
        lines = ["image_id class_id super_class_id path"]
        for c in ids:
            sup = c % len(SOP_SUPER_CLASSES)
            product = 111000000000 + 37 * c
            for k in range(images_per_class):
                image_id += 1
                rel = f"{SOP_SUPER_CLASSES[sup]}_final/{product}_{k}.JPG"
                write_image(root / rel, 8, 8, blue=8 * c)
                lines.append(f"{image_id} {c} {sup + 1} {rel}")
        (root / f"Ebay_{part}.txt").parent.mkdir(parents=True, exist_ok=True)
        (root / f"Ebay_{part}.txt").write_text("\n".join(lines) + "\n")
    return root


# ------------------------------------------------------------- In-Shop Clothes

# (item number, status, images) per item, in list_eval_partition.txt order; test items have
# query and gallery images, as published.
INSHOP_ITEMS = [
    (2, "train", 3),
    (5, "train", 2),
    (7, "train", 3),
    (8, "query", 2),
    (8, "gallery", 1),
    (10, "query", 1),
    (10, "gallery", 2),
    (12, "query", 2),
    (12, "gallery", 2),
]


def make_inshop(
    root: str | Path,
    items: Sequence[tuple[int, str, int]] = INSHOP_ITEMS,
    images_in_img_folder: bool = True,
    partition_in_eval: bool = True,
) -> Path:
    """A fake "In-shop Clothes Retrieval Benchmark" folder: the partition file and images.

    ``items`` lists ``(item number, train|query|gallery, images)``. Images are
    ``img/WOMEN/Dresses/id_NNNNNNNN/NN_K_front.jpg`` under ``Img/`` (the unpacked
    ``Img/img.zip``), or directly under the root without ``images_in_img_folder``;
    ``list_eval_partition.txt`` goes to ``Eval/`` or, without ``partition_in_eval``,
    to the root. Its first line is the image count, the second the header.
    """
    root = Path(root)
    base = root / "Img" if images_in_img_folder else root
    lines, counter = [], {}
    for item, status, n in items:
        for _ in range(n):
            k = counter[item] = counter.get(item, 0) + 1
            rel = f"img/WOMEN/Dresses/id_{item:08d}/{k:02d}_{k}_front.jpg"
            write_image(base / rel, 8, 8, blue=8 * item)
            lines.append(f"{rel} id_{item:08d} {status}")
    folder = root / "Eval" if partition_in_eval else root
    folder.mkdir(parents=True, exist_ok=True)
    head = [str(len(lines)), "image_name item_id evaluation_status"]
    (folder / "list_eval_partition.txt").write_text("\n".join(head + lines) + "\n")
    return root


# ------------------------------------------------------------------------- LPW

# scene -> view -> person numbers (per scene, not contiguous, as published); scene 1's view 2
# people all appear in view 1 or 3, the other views of the scene.
LPW_PEOPLE = {
    1: {1: [3, 9, 14], 2: [3, 9, 20], 3: [9, 20, 31]},
    2: {1: [4, 6], 2: [4, 11], 3: [6, 11, 15], 4: [15]},
    3: {1: [2], 2: [2, 8], 3: [8], 4: [5, 2]},
}


def make_lpw(
    root: str | Path, people: dict[int, dict[int, list[int]]] | None = None, in_pep: bool = True
) -> Path:
    """A fake LPW copy: ``pep_256x128/scen{S}/view{V}/{PID}/{FRAME}.jpg`` (or no pep_256x128/).

    ``people`` maps scene -> view -> person numbers (default :data:`LPW_PEOPLE`).
    Person ``p`` in view ``v`` has ``2 + (p + v) % 3`` frames, numbered from ``100 * v``.
    """
    root = Path(root)
    base = root / "pep_256x128" if in_pep else root
    for scene, views in (LPW_PEOPLE if people is None else people).items():
        for view, persons in views.items():
            for p in persons:
                first = 100 * view
                for f in range(first, first + 2 + (p + view) % 3):
                    folder = base / f"scen{scene}" / f"view{view}" / str(p)
                    write_image(folder / f"{f}.jpg", 4, 8, blue=8 * p)
    return root


# ------------------------------------------------------------- your own images


def make_image_folder(
    root: str | Path,
    num_classes: int = 10,
    images_per_class: int = 16,
    size: int = 12,
    names: Sequence[str] | None = None,
) -> Path:
    """A folder of class sub-folders (``dataset=imagefolder``): ``ROOT/<name>/img_K.png``.

    Class ``c`` is named ``names[c]`` (default ``class_c``); its images are ``size``
    x ``size`` gradients with blue = 8 * c plus a class-specific stripe, so a small
    network can tell the classes apart.
    """
    root = Path(root)
    for c in range(num_classes):
        name = names[c] if names is not None else f"class_{c}"
        for k in range(images_per_class):
            path = write_image(root / name / f"img_{k}.png", size, size, blue=24 * c + 2 * k)
            pixels = np.asarray(Image.open(path)).copy()
            pixels[(c * size) // num_classes, :, :] = 255  # a row that marks the class
            Image.fromarray(pixels).save(path)
    return root


def make_csv(
    root: str | Path,
    labels: Sequence[int] = (0, 1, 2, 3, 4, 5),
    images_per_label: int = 4,
    query_gallery: bool = True,
    name: str = "dataset.csv",
) -> Path:
    """A CSV list (``dataset=csv``) with its images under ``root/images/``; returns the CSV path.

    Every label gets ``images_per_label`` 8 x 8 PNGs. With ``query_gallery`` the
    first half of the labels train and the rest test, the first image of a test
    label being the query (camera 0) and the others the gallery (camera 1), written
    as the columns ``split,is_query,is_gallery,camera``.
    """
    root = Path(root)
    half = len(labels) // 2
    header = "path,label" + (",split,is_query,is_gallery,camera" if query_gallery else "")
    lines = [header]
    for i, label in enumerate(labels):
        for k in range(images_per_label):
            rel = f"images/{label}/{k}.png"
            write_image(root / rel, 8, 8, blue=16 * i + k)
            row = f"{rel},{label}"
            if query_gallery:
                test = i >= half
                query = test and k == 0
                row += f",{'test' if test else 'train'},{int(query)},{int(test and not query)}"
                row += f",{0 if query else 1}"
            lines.append(row)
    path = root / name
    path.write_text("\n".join(lines) + "\n")
    return path


BUILDERS = {
    "cub": make_cub,
    "cars196": make_cars,
    "mars": make_mars,
    "ilidsvid": make_ilidsvid,
    "prid2011": make_prid2011,
    "sop": make_sop,
    "inshop": make_inshop,
    "lpw": make_lpw,
    "imagefolder": make_image_folder,
    "csv": make_csv,
}
