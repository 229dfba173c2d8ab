"""The dataset configs build working datasets; softmine-data check; the CLI's data error."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader

from softmine.config import build
from softmine.data import PKSampler
from softmine.data.build import build_split
from softmine.data.check import check
from softmine.data.download import DOWNLOADS
from softmine.data.sources import SOURCES, check_root
from softmine.errors import DataError
from softmine.testing.fakes import BUILDERS
from tests.conftest import run_forked

REPO = Path(__file__).resolve().parents[2]
CONFIGS = str(REPO / "configs")


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.fixture(scope="module")
def fakes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("data")
    folders = {
        "cub": "CUB_200_2011",
        "cars196": "cars196",
        "mars": "mars",
        "ilidsvid": "ilids-vid",
        "prid2011": "prid2011",
    }
    return {name: BUILDERS[name](base / folder) for name, folder in folders.items()}


@pytest.mark.parametrize(
    ("name", "root"),
    [
        ("cub", "data/CUB_200_2011"),
        ("cars196", "data/cars196"),
        ("mars", "data/mars"),
        ("ilidsvid", "data/ilids-vid"),
        ("prid2011", "data/prid2011"),
    ],
)
@pytest.mark.slow
def test_default_roots(name: str, root: str) -> None:
    assert _cfg(f"dataset={name}").dataset.root == root


@pytest.mark.parametrize("name", ["cub", "cars196"])
@pytest.mark.slow
def test_image_configs_build_uint8_224_crops(fakes: dict[str, Path], name: str) -> None:
    cfg = _cfg(f"dataset={name}", f"dataset.root={fakes[name]}")
    train, test = build_split(cfg.dataset, "train"), build_split(cfg.dataset, "test")
    x, y = train[0]
    # uint8 out of the workers; the trainer makes floats on the device, the backbone normalises
    assert x.shape == (3, 224, 224) and x.dtype == torch.uint8 and y == 0
    t, _ = test[0]
    assert t.shape == (3, 224, 224) and t.dtype == torch.uint8
    big = build_split(
        _cfg(
            f"dataset={name}", f"dataset.root={fakes[name]}", "dataset.transform.crop_size=227"
        ).dataset,
        "test",
    )
    assert big[0][0].shape == (3, 227, 227)


def test_image_config_trains_through_a_pk_loader(fakes: dict[str, Path]) -> None:
    cfg = _cfg("dataset=cub", f"dataset.root={fakes['cub']}", "dataset.crop=true")
    train = build_split(cfg.dataset, "train")
    sampler = PKSampler(train.labels, classes_per_batch=2, samples_per_class=3, seed=0)
    x, y = next(iter(DataLoader(train, batch_sampler=sampler)))
    assert x.shape == (6, 3, 224, 224) and sorted(y.tolist()) == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("name", ["mars", "ilidsvid", "prid2011"])
def test_video_configs_build_train_query_gallery(fakes: dict[str, Path], name: str) -> None:
    cfg = _cfg(f"dataset={name}", f"dataset.root={fakes[name]}", "dataset.seq_len=4")
    assert "test" not in cfg.dataset
    clip, label = build_split(cfg.dataset, "train")[0]
    assert clip.shape == (4, 3, 256, 128) and clip.dtype == torch.uint8 and label == 0
    query, gallery = build_split(cfg.dataset, "query"), build_split(cfg.dataset, "gallery")
    clip, pid, camid = query[0]
    frames = len(query.tracklets[0][0])
    assert clip.shape == (-(-frames // 4), 4, 3, 256, 128) and camid == query.camids[0]
    assert set(query.pids.tolist()) <= set(gallery.pids.tolist())


def test_mars_gallery_switch(fakes: dict[str, Path]) -> None:
    root = f"dataset.root={fakes['mars']}"
    official = build_split(_cfg("dataset=mars", root).dataset, "gallery")
    variant = build_split(
        _cfg("dataset=mars", root, "dataset.gallery_includes_query=false").dataset, "gallery"
    )
    assert len(official) == 10 and len(variant) == 5


def test_identity_sampler_config_over_video_labels(fakes: dict[str, Path]) -> None:
    cfg = _cfg(
        "dataset=ilidsvid",
        f"dataset.root={fakes['ilidsvid']}",
        "sampler=identity",
        "sampler.classes_per_batch=2",
    )
    train = build_split(cfg.dataset, "train")
    sampler = build(cfg.sampler, "sampler", labels=train.labels, seed=0)
    batches = list(sampler)
    assert batches and all(
        len(b) == 8 for b in batches
    )  # 2 identities x 4 tracklets (with repeats)


def test_transform_group_can_be_swapped(fakes: dict[str, Path]) -> None:
    cfg = _cfg(
        "dataset=cub",
        f"dataset.root={fakes['cub']}",
        "dataset/transform=reid",
        "dataset.transform.erasing=0",
    )
    x, _ = build_split(cfg.dataset, "train")[0]
    assert x.shape == (3, 256, 128)


# ------------------------------------------------------------------- softmine-data check


def _script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``softmine-data check ARGS`` (a command every install has, unlike a repository script)."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return run_forked(
        [sys.executable, "-m", "softmine.commands.data", "check", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_check_data_reports_counts_against_the_published_ones(
    fakes: dict[str, Path], tmp_path: Path
) -> None:
    res = _script("cub", str(fakes["cub"]), "--workers", "1", cwd=tmp_path)
    assert res.returncode == 1
    assert "train_images: 6, but the published count is 5,864" in res.stdout
    assert (
        "all 12 image files present" in res.stdout and "all 12 present images decode" in res.stdout
    )


@pytest.mark.parametrize(
    ("name", "counts"),
    [
        ("cub", {"images": 12, "classes": 4, "train_images": 6, "test_images": 6}),
        ("cars196", {"images": 12, "classes": 4, "train_images": 6, "test_images": 6}),
        (
            "mars",
            {
                "train_tracklets": 7,
                "train_identities": 3,
                "test_tracklets": 12,
                "query_tracklets": 5,
                "gallery_tracklets": 10,
                "gallery_tracklets_without_query": 5,
                "train_frames": 27,
                "test_frames": 40,
            },
        ),
        (
            "ilidsvid",
            {
                "identities": 8,
                "tracklets": 16,
                "splits": 3,
                "train_identities": 4,
                "test_identities": 4,
            },
        ),
        (
            "prid2011",
            {
                "identities": 4,
                "tracklets": 8,
                "splits": 3,
                "train_identities": 2,
                "test_identities": 2,
            },
        ),
    ],
)
def test_check_passes_a_complete_copy(fakes: dict[str, Path], name: str, counts: dict) -> None:
    report = check(name, fakes[name], expected=counts)
    assert report.ok, report.render()


def test_check_names_corrupt_and_missing_files(fakes: dict[str, Path], tmp_path: Path) -> None:
    copy = shutil.copytree(fakes["mars"], tmp_path / "mars")
    bad = copy / "bbox_test/00-1/00-1C1T0001F001.jpg"  # a junk frame: only the check reads it
    bad.write_bytes(b"not an image")
    gone = copy / "bbox_train/0007/0007C5T0001F004.jpg"
    gone.unlink()
    report = check("mars", copy, expected={})
    text = report.render()
    assert not report.ok
    assert f"1 of 67 image files missing, e.g. {gone}" in text
    assert str(bad) in text and "1 of all 66 present images do not decode" in text


def test_check_data_missing_root_is_one_clear_failure(tmp_path: Path) -> None:
    res = _script("prid2011", str(tmp_path / "nope"), cwd=tmp_path)
    assert res.returncode == 1
    assert "[FAIL] PRID2011: dataset folder" in res.stdout and "tugraz.at" in res.stdout
    assert "Traceback" not in res.stderr


# -------------------------------------------------------------------- the CLI


def test_train_on_a_missing_dataset_is_one_line_and_exit_2(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "SOFTMINE_DEBUG": ""}
    res = run_forked(
        [sys.executable, "-m", "softmine.commands.train", "dataset=cub", "dataset.root=/nowhere"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    msg = errors[0]
    assert "CUB-200-2011: dataset folder /nowhere does not exist" in msg
    assert "images.txt" in msg and "vision.caltech.edu" in msg
    # commands a wheel install has: the download that fits dataset.root, and the check
    assert "Download it with `softmine-data download cub --root DIR`, then set " in msg
    assert "dataset.root=DIR/CUB_200_2011" in msg
    assert "Check a copy with `softmine-data check cub ROOT`" in msg and "scripts/" not in msg


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_a_missing_set_names_the_commands_that_get_and_check_it(name: str, tmp_path: Path) -> None:
    """Every data error ends with `softmine-data check` (scripts/check_data.py is not in a
    wheel); a missing folder also names `softmine-data download` where it knows the set."""
    with pytest.raises(DataError) as e:
        check_root(SOURCES[name], tmp_path / "data" / SOURCES[name].folder.split("/")[-1])
    msg = str(e.value)
    assert f"Check a copy with `softmine-data check {name} ROOT`." in msg
    if name in ("cub", "sop"):  # verified archives: the command downloads into dataset.root
        assert (
            f"Download it with `softmine-data download {name} --root {tmp_path / 'data'}`." in msg
        )
    elif name in DOWNLOADS:  # behind a form: the command says where and how
        assert f"`softmine-data download {name}` says where to get it and how to unpack it." in msg
    else:  # the user's own folders and files
        assert "softmine-data download" not in msg


@pytest.mark.parametrize("name", ["cub", "mars"])
@pytest.mark.slow
def test_label_noise_on_real_set_configs(fakes: dict[str, Path], name: str) -> None:
    root = f"dataset.root={fakes[name]}"
    clean = build_split(_cfg(f"dataset={name}", root).dataset, "train")
    noisy = build_split(_cfg(f"dataset={name}", root, "dataset.label_noise=0.5").dataset, "train")
    n = len(clean.labels)
    assert int(noisy.flipped.sum()) == round(0.5 * n) and not clean.flipped.any()
    assert (noisy.labels != clean.labels).sum() == round(0.5 * n)
    i = int(np.flatnonzero(noisy.flipped)[0])
    assert noisy[i][1] == noisy.labels[i] != clean.labels[i]  # items carry the noisy label
    test_node = "test" if name == "cub" else "query"
    a = build_split(_cfg(f"dataset={name}", root).dataset, test_node)
    b = build_split(_cfg(f"dataset={name}", root, "dataset.label_noise=0.5").dataset, test_node)
    assert np.array_equal(a.labels, b.labels)  # evaluation labels are never touched
