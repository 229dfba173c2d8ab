"""Stanford Online Products, In-Shop Clothes and LPW from fake copies in their published layouts."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from softmine.data import LPW, InShop, StanfordOnlineProducts
from softmine.data.build import build_split
from softmine.data.check import check
from softmine.errors import DataError
from softmine.testing.fakes import INSHOP_ITEMS, LPW_PEOPLE, make_inshop, make_lpw, make_sop
from tests.conftest import REPO, compose, run_forked


@pytest.mark.parametrize(
    ("name", "root"),
    [
        ("sop", "data/Stanford_Online_Products"),
        ("inshop", "data/inshop"),
        ("lpw", "data/lpw"),
        ("imagefolder", "data/images"),
    ],
)
def test_default_roots(name: str, root: str) -> None:
    # `softmine-data download NAME --root data/` and the manual instructions unpack here.
    assert compose([f"dataset={name}"]).dataset.root == root


# ------------------------------------------------------------------------- SOP


@pytest.fixture(scope="module")
def sop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_sop(tmp_path_factory.mktemp("sop") / "Stanford_Online_Products", 3, 4, 2)


def test_sop_splits_are_the_two_ebay_lists(sop: Path) -> None:
    train, test = StanfordOnlineProducts(sop, "train"), StanfordOnlineProducts(sop, "test")
    # make_sop: classes 1..3 in Ebay_train.txt, 4..7 in Ebay_test.txt, 2 images each.
    assert len(train) == 6 and train.classes.tolist() == [1, 2, 3]
    assert len(test) == 8 and test.classes.tolist() == [4, 5, 6, 7]
    assert train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert test.samples[0][0] == str(sop / "bicycle_final/111000000148_0.JPG")  # class 4
    assert train.super_classes == [2, 2, 3, 3, 4, 4]
    image, label = test[2]
    assert tuple(image.shape) == (3, 8, 8) and label == 1


def test_sop_missing_list_and_missing_image_are_one_clear_error(sop: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing file 'Ebay_train.txt'.*Ebay_test.txt"):
        StanfordOnlineProducts(tmp_path, "train")
    copy = make_sop(tmp_path / "copy")
    (copy / "chair_final/111000000074_1.JPG").unlink()
    with pytest.raises(DataError, match=r"1 file\(s\) listed in Ebay_train.txt are missing"):
        StanfordOnlineProducts(copy, "train")
    assert len(StanfordOnlineProducts(copy, "train", on_bad_image="skip")) == 5


def test_sop_config_reports_the_literature_recall_ks(sop: Path) -> None:
    cfg = compose(["dataset=sop", f"dataset.root={sop}"])
    assert list(cfg.evaluation.ks) == [1, 10, 100, 1000]
    x, y = build_split(cfg.dataset, "train")[0]
    assert x.shape == (3, 224, 224) and x.dtype == torch.uint8 and y == 0
    assert len(build_split(cfg.dataset, "test")) == 8
    override = compose(["dataset=sop", "evaluation.ks=[1,5]"])
    assert list(override.evaluation.ks) == [1, 5]


# --------------------------------------------------------------------- In-Shop


@pytest.fixture(scope="module")
def inshop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_inshop(tmp_path_factory.mktemp("inshop"))


def test_inshop_partition(inshop: Path) -> None:
    train = InShop(inshop, "train")
    query, gallery = InShop(inshop, "query"), InShop(inshop, "gallery")
    # INSHOP_ITEMS: items 2, 5, 7 train (3 + 2 + 3 images); 8, 10, 12 split into query/gallery.
    assert len(train) == 8 and train.classes.tolist() == [2, 5, 7]
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert query.pids.tolist() == [8, 8, 10, 12, 12] and set(query.camids.tolist()) == {0}
    assert gallery.pids.tolist() == [8, 10, 10, 12, 12] and set(gallery.camids.tolist()) == {1}
    image, item, camera = gallery[1]
    assert tuple(image.shape) == (3, 8, 8) and (item, camera) == (10, 1)
    assert train[3][1] == 1  # training items carry the 0..C-1 label
    test = InShop(inshop, "test")
    assert len(test) == 10 and test.classes.tolist() == [8, 10, 12]
    assert query.samples[0][0] == str(inshop / "Img/img/WOMEN/Dresses/id_00000008/01_1_front.jpg")


def test_inshop_other_layout_and_errors(tmp_path: Path) -> None:
    flat = make_inshop(tmp_path / "flat", images_in_img_folder=False, partition_in_eval=False)
    assert len(InShop(flat, "gallery")) == sum(n for _, s, n in INSHOP_ITEMS if s == "gallery")
    with pytest.raises(DataError, match=r"missing file 'list_eval_partition.txt' \(looked for"):
        InShop(tmp_path, "train")
    damaged = make_inshop(tmp_path / "damaged")
    partition = damaged / "Eval/list_eval_partition.txt"
    lines = partition.read_text().splitlines()
    partition.write_text("\n".join(lines[:-1]) + "\n")  # count line now says one more
    with pytest.raises(DataError, match="announces 18 images but lists 17"):
        InShop(damaged, "train")
    partition.write_text("\n".join([*lines[:2], "img/x.jpg id_00000001 validation"]) + "\n")
    with pytest.raises(DataError, match="line 3 is 'img/x.jpg id_00000001 validation'"):
        InShop(damaged, "train")


def test_inshop_config_is_query_gallery_retrieval(inshop: Path) -> None:
    cfg = compose(["dataset=inshop", f"dataset.root={inshop}"])
    assert cfg.dataset.eval_protocol == "query_gallery" and "test" not in cfg.dataset
    assert list(cfg.evaluation.ks) == [1, 10, 20, 30, 40, 50]
    x, item, camera = build_split(cfg.dataset, "query")[0]
    assert x.shape == (3, 224, 224) and (item, camera) == (8, 0)


# ------------------------------------------------------------------------- LPW


@pytest.fixture(scope="module")
def lpw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lpw(tmp_path_factory.mktemp("lpw"))


def _frames(scene: int, view: int, person: int) -> int:
    return 2 + (person + view) % 3  # make_lpw's frame count


def test_lpw_protocol_scene1_view2_queries_the_other_views(lpw: Path) -> None:
    train, query, gallery = (LPW(lpw, s, seq_len=2) for s in ("train", "query", "gallery"))
    scene1 = LPW_PEOPLE[1]
    assert query.pids.tolist() == [100000 + p for p in scene1[2]]
    assert set(query.views) == {2} and set(query.camids.tolist()) == {1}
    other = [(v, p) for v in (1, 3) for p in scene1[v]]
    assert gallery.pids.tolist() == [100000 + p for _, p in other]
    assert gallery.camids.tolist() == [v - 1 for v, _ in other]
    trained = [(s, v, p) for s in (2, 3) for v, ps in LPW_PEOPLE[s].items() for p in sorted(ps)]
    assert len(train) == len(trained) and set(train.scenes) == {2, 3}
    assert train.pids.tolist() == [100000 * s + p for s, _, p in trained]
    # Person numbers are per scene: person 2 of scene 3 is not person 2 of any other scene.
    assert train.num_classes == len({(s, p) for s, _, p in trained})
    assert sorted(set(train.labels.tolist())) == list(range(train.num_classes))
    frames = query.tracklets[0][0]
    assert len(frames) == _frames(1, 2, 3) and frames[0].endswith("scen1/view2/3/200.jpg")
    clip, pid, camid = query[0]
    assert clip.shape[-4:] == (2, 3, 8, 4) and (pid, camid) == (100003, 1)


def test_lpw_without_pep_folder_and_missing_scene(tmp_path: Path) -> None:
    bare = make_lpw(tmp_path / "bare", in_pep=False)
    assert len(LPW(bare, "query")) == len(LPW_PEOPLE[1][2])
    with pytest.raises(DataError, match=r"LPW .*missing folder 'scen1'.*liuyu.us"):
        LPW(tmp_path / "bare" / "scen1", "train")
    partial = make_lpw(tmp_path / "partial", people={1: LPW_PEOPLE[1]})
    with pytest.raises(DataError, match="missing folder 'scen2'"):
        LPW(partial, "train")


def test_lpw_config_builds_clips(lpw: Path) -> None:
    cfg = compose(["dataset=lpw", f"dataset.root={lpw}", "dataset.seq_len=2"])
    assert cfg.dataset.eval_protocol == "reid" and list(cfg.dataset.junk_pids) == []
    clip, label = build_split(cfg.dataset, "train")[0]
    assert clip.shape == (2, 3, 256, 128) and label == 0


def test_authors_lpw_has_the_authors_settings() -> None:
    cfg = compose(["experiment=authors_lpw"])
    assert cfg.dataset.name == "lpw" and cfg.loss.sigma == 0.6 and cfg.loss.margin == 1.2
    assert cfg.trainer.max_iters == 65000
    assert (cfg.trainer.eval_every_iters, cfg.trainer.eval_start_iter) == (5000, 50000)
    assert list(cfg.scheduler.milestones) == [30000, 40000, 50000]
    assert cfg.optimizer.weight_decay == 0.0001 and cfg.seed == 123
    frames = cfg.sampler.classes_per_batch * cfg.sampler.samples_per_class * cfg.dataset.seq_len
    assert frames == 54  # train.prototxt: input_dim 54 frames, 6 tracklets


# ------------------------------------------------------------------- softmine-data check


@pytest.mark.parametrize(
    ("name", "counts"),
    [
        (
            "sop",
            {
                "images": 14,
                "classes": 7,
                "train_images": 6,
                "train_classes": 3,
                "test_images": 8,
                "test_classes": 4,
            },
        ),
        (
            "inshop",
            {
                "images": 18,
                "train_images": 8,
                "train_items": 3,
                "query_images": 5,
                "gallery_images": 5,
                "test_items": 3,
            },
        ),
        (
            "lpw",
            {
                "identities": 12,
                "tracklets": 23,
                "train_identities": 7,
                "train_tracklets": 14,
                "query_tracklets": 3,
                "gallery_tracklets": 6,
            },
        ),
    ],
)
def test_check_passes_complete_copies(
    sop: Path, inshop: Path, lpw: Path, name: str, counts: dict
) -> None:
    root = {"sop": sop, "inshop": inshop, "lpw": lpw}[name]
    report = check(name, root, expected=counts)
    assert report.ok, report.render()


def test_softmine_data_check_knows_the_published_counts(sop: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    res = run_forked(
        [
            sys.executable,
            "-m",
            "softmine.commands.data",
            "check",
            "sop",
            str(sop),
            "--workers",
            "1",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 1
    assert "train_classes: 3, but the published count is 11,318" in res.stdout
    assert "test_images: 8, but the published count is 60,502" in res.stdout
    assert "all 14 present images decode" in res.stdout


def test_lpw_frame_counts_in_check(lpw: Path) -> None:
    report = check("lpw", lpw, expected={})
    text = report.render()
    query_frames = sum(_frames(1, 2, p) for p in LPW_PEOPLE[1][2])
    assert f"query_frames: {query_frames}" in text and report.ok
