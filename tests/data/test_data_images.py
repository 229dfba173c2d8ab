"""CUB-200-2011 and Cars196 read from fake copies in the published layouts.

Expected values are worked out by hand from the fakes' construction
(softmine.testing.fakes): 4 classes x 3 images, classes 1-2 train, 3-4 test.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.io import savemat

from softmine.data import CUB200, Cars196
from softmine.errors import ConfigError, DataError
from softmine.testing.fakes import make_cars, make_cub


@pytest.fixture(scope="module")
def cub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cub(tmp_path_factory.mktemp("data") / "CUB_200_2011")


@pytest.fixture(scope="module")
def cars_annos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cars(tmp_path_factory.mktemp("data") / "cars196", layout="annos")


@pytest.fixture(scope="module")
def cars_devkit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cars(tmp_path_factory.mktemp("data") / "cars196", layout="devkit")


def _rel(root: Path, samples: list[tuple[str, int]]) -> list[tuple[str, int]]:
    return [(str(Path(p).relative_to(root)), y) for p, y in samples]


# ------------------------------------------------------------------------- CUB


def test_cub_split_is_by_class_and_labels_are_contiguous(cub: Path) -> None:
    train, test = CUB200(cub, "train"), CUB200(cub, "test")
    assert _rel(cub, train.samples) == [
        ("images/001.Fake_Bird_1/Fake_Bird_1_0000_1.jpg", 0),
        ("images/001.Fake_Bird_1/Fake_Bird_1_0001_2.jpg", 0),
        ("images/001.Fake_Bird_1/Fake_Bird_1_0002_3.jpg", 0),
        ("images/002.Fake_Bird_2/Fake_Bird_2_0000_4.jpg", 1),
        ("images/002.Fake_Bird_2/Fake_Bird_2_0001_5.jpg", 1),
        ("images/002.Fake_Bird_2/Fake_Bird_2_0002_6.jpg", 1),
    ]
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert test.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert test.classes.tolist() == [3, 4]
    assert test.class_names == ["003.Fake_Bird_3", "004.Fake_Bird_4"]
    assert train.num_classes == test.num_classes == 2
    assert test.samples[0][0].endswith("Fake_Bird_3_0000_7.jpg")


def test_cub_items_are_rgb_images_with_labels_and_take_a_transform(cub: Path) -> None:
    img, label = CUB200(cub, "test")[4]
    # image k=1 of class 4: 9 x 8, a uint8 RGB tensor (3, H, W)
    assert (img.dtype, tuple(img.shape), label) == (torch.uint8, (3, 8, 9), 1)
    sized = CUB200(cub, "test", transform=lambda im: tuple(im.shape))
    assert sized[2] == ((3, 8, 10), 0)


def test_cub_crop_uses_the_bounding_box(cub: Path) -> None:
    img, _ = CUB200(cub, "train", crop=True)[0]
    assert tuple(img.shape) == (3, 3, 4)  # x=1, y=2, w=4, h=3
    px = img.permute(1, 2, 0).numpy().astype(int)
    # the fake's red = 16 * x and green = 16 * y, so the crop starts at (x, y) = (1, 2)
    assert abs(px[0, 0, 0] - 16) <= 4 and abs(px[0, 0, 1] - 32) <= 4
    assert abs(px[2, 3, 0] - 64) <= 4 and abs(px[2, 3, 1] - 64) <= 4


def test_cub_missing_root_names_folder_layout_and_publisher(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        CUB200(tmp_path / "nowhere", "train")
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg and "does not exist" in msg
    assert "image_class_labels.txt" in msg  # the expected layout
    assert "vision.caltech.edu" in msg  # where it is published
    assert "\n" not in msg


def test_cub_missing_index_file_names_it(cub: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(cub, tmp_path / "CUB_200_2011")
    (copy / "image_class_labels.txt").unlink()
    with pytest.raises(DataError, match="missing file 'image_class_labels.txt'") as e:
        CUB200(copy, "train")
    assert str(copy / "image_class_labels.txt") in str(e.value)
    # bounding_boxes.txt is needed only for the crop
    (copy / "bounding_boxes.txt").unlink()
    shutil.copy(cub / "image_class_labels.txt", copy)
    assert len(CUB200(copy, "train")) == 6
    with pytest.raises(DataError, match="missing file 'bounding_boxes.txt'"):
        CUB200(copy, "train", crop=True)


def test_cub_missing_image_is_an_error_or_skipped(cub: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(cub, tmp_path / "CUB_200_2011")
    gone = copy / "images/002.Fake_Bird_2/Fake_Bird_2_0001_5.jpg"
    gone.unlink()
    with pytest.raises(DataError, match="listed in images.txt are missing") as e:
        CUB200(copy, "train")
    assert str(gone) in str(e.value)
    ds = CUB200(copy, "train", on_bad_image="skip")
    assert len(ds) == 5 and ds.labels.tolist() == [0, 0, 0, 1, 1]
    assert ds.bad_images == {str(gone)}


def test_corrupt_image_names_the_file_or_is_replaced_within_its_class(
    cub: Path, tmp_path: Path
) -> None:
    copy = shutil.copytree(cub, tmp_path / "CUB_200_2011")
    bad = copy / "images/001.Fake_Bird_1/Fake_Bird_1_0001_2.jpg"
    bad.write_bytes(b"this is not a jpeg")
    ds = CUB200(copy, "train")
    with pytest.raises(DataError, match="cannot decode image") as e:
        ds[1]
    assert str(bad) in str(e.value)
    skip = CUB200(copy, "train", on_bad_image="skip", transform=lambda im: tuple(im.shape))
    assert skip[1] == ((3, 8, 10), 0)  # the next image of class 1 (k=2: 10 x 8), same label
    assert skip.bad_images == {str(bad)}
    assert skip[0] == ((3, 8, 8), 0)  # readable items are untouched


def test_class_with_only_unreadable_images_is_a_clear_error(cub: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(cub, tmp_path / "CUB_200_2011")
    for f in (copy / "images/002.Fake_Bird_2").iterdir():
        f.write_bytes(b"junk")
    ds = CUB200(copy, "train", on_bad_image="skip")
    with pytest.raises(DataError, match="no readable image left in class '002.Fake_Bird_2'"):
        ds[4]
    assert len(ds.bad_images) == 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"split": "val"}, "split must be one of"),
        ({"on_bad_image": "ignore"}, "on_bad_image must be one of"),
    ],
)
def test_bad_arguments_are_config_errors(cub: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        CUB200(cub, **{"split": "train", **kwargs})


# ------------------------------------------------------------------------ Cars


def test_cars_annos_layout_pools_and_splits_by_class(cars_annos: Path) -> None:
    train, test = Cars196(cars_annos, "train"), Cars196(cars_annos, "test")
    assert train.layout == "annos"
    assert _rel(cars_annos, train.samples) == [
        (f"car_ims/{i:06d}.jpg", (i - 1) // 3) for i in range(1, 7)
    ]
    assert _rel(cars_annos, test.samples) == [
        (f"car_ims/{i:06d}.jpg", (i - 7) // 3) for i in range(7, 13)
    ]
    assert test.classes.tolist() == [3, 4]
    assert test.class_names == ["Fake Car 3 2012", "Fake Car 4 2012"]


def test_cars_devkit_layout_pools_train_and_test_folders(cars_devkit: Path) -> None:
    train, test = Cars196(cars_devkit, "train"), Cars196(cars_devkit, "test")
    assert train.layout == "devkit"
    # the fake alternates images between cars_train/ and cars_test/ (class = image // 3)
    assert sorted(_rel(cars_devkit, train.samples)) == [
        ("cars_test/00001.jpg", 0),
        ("cars_test/00002.jpg", 1),
        ("cars_test/00003.jpg", 1),
        ("cars_train/00001.jpg", 0),
        ("cars_train/00002.jpg", 0),
        ("cars_train/00003.jpg", 1),
    ]
    assert sorted(_rel(cars_devkit, test.samples)) == [
        ("cars_test/00004.jpg", 0),
        ("cars_test/00005.jpg", 1),
        ("cars_test/00006.jpg", 1),
        ("cars_train/00004.jpg", 0),
        ("cars_train/00005.jpg", 0),
        ("cars_train/00006.jpg", 1),
    ]
    assert test.class_names == ["Fake Car 3 2012", "Fake Car 4 2012"]


def test_cars_both_layouts_give_the_same_split_sizes(cars_annos: Path, cars_devkit: Path) -> None:
    for split in ("train", "test"):
        a, b = Cars196(cars_annos, split), Cars196(cars_devkit, split)
        assert np.bincount(a.labels).tolist() == np.bincount(b.labels).tolist() == [3, 3]


def test_cars_labelled_test_annotations_may_sit_in_devkit(tmp_path: Path) -> None:
    root = make_cars(tmp_path / "cars196", layout="devkit", labels_in_devkit=True)
    assert not (root / "cars_test_annos_withlabels.mat").exists()
    assert len(Cars196(root, "train")) == 6


@pytest.mark.parametrize("layout", ["annos", "devkit"])
def test_cars_crop_converts_matlab_boxes(tmp_path: Path, layout: str) -> None:
    root = make_cars(tmp_path / "cars196", layout=layout)
    img, _ = Cars196(root, "test", crop=True)[0]
    # bbox_x1=2, bbox_y1=3, bbox_x2=6, bbox_y2=7, 1-based inclusive: columns 1..5, rows 2..6
    assert tuple(img.shape) == (3, 5, 5)
    px = img.permute(1, 2, 0).numpy().astype(int)
    assert abs(px[0, 0, 0] - 16) <= 4 and abs(px[0, 0, 1] - 32) <= 4
    assert tuple(Cars196(root, "test")[0][0].shape) == (3, 8, 12)


def test_cars_without_labelled_test_annotations_says_which_file(tmp_path: Path) -> None:
    root = make_cars(tmp_path / "cars196", layout="devkit")
    (root / "cars_test_annos_withlabels.mat").unlink()
    with pytest.raises(DataError, match="missing file 'cars_test_annos_withlabels.mat'") as e:
        Cars196(root, "train")
    assert str(root / "devkit" / "cars_test_annos_withlabels.mat") in str(e.value)


def test_cars_unlabelled_annotations_are_rejected(tmp_path: Path) -> None:
    root = make_cars(tmp_path / "cars196", layout="devkit")
    shutil.copy(root / "devkit/cars_test_annos.mat", root / "cars_test_annos_withlabels.mat")
    with pytest.raises(DataError, match="no 'class' field"):
        Cars196(root, "train")


def test_cars_neither_layout_names_both(tmp_path: Path) -> None:
    (tmp_path / "cars196").mkdir()
    with pytest.raises(DataError, match="neither 'cars_annos.mat'.*nor the 'devkit' folder"):
        Cars196(tmp_path / "cars196", "train")


def test_cars_mat_without_the_published_variable(tmp_path: Path) -> None:
    root = tmp_path / "cars196"
    (root / "car_ims").mkdir(parents=True)
    savemat(str(root / "cars_annos.mat"), {"something_else": np.zeros(3)})
    with pytest.raises(DataError, match=r"has no variable\(s\) \['annotations'\]"):
        Cars196(root, "train")


def test_fake_cub_takes_a_count_per_class(tmp_path: Path) -> None:
    root = make_cub(tmp_path / "CUB_200_2011", num_classes=4, images_per_class=[2, 3, 4, 5])
    train, test = CUB200(root, "train"), CUB200(root, "test")
    assert (len(train), len(test)) == (5, 9)
    assert np.bincount(test.labels).tolist() == [4, 5]
    with pytest.raises(ValueError, match="3 counts for 4 classes"):
        make_cub(tmp_path / "other", num_classes=4, images_per_class=[1, 2, 3])
