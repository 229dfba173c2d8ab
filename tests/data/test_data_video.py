"""MARS, iLIDS-VID and PRID2011 read from fake copies in the published layouts; clip sampling.

Expected values are worked out by hand from the fakes (softmine.testing.fakes):
MARS_TRAIN / MARS_TEST / MARS_QUERY_IDX, ILIDS_PEOPLE, PRID_PEOPLE.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import loadmat
from torchvision.transforms import v2

from softmine.data import ILIDSVID, MARS, PRID2011, PKSampler
from softmine.data.tracklets import clip_indices
from softmine.errors import ConfigError, DataError
from softmine.testing.fakes import make_ilidsvid, make_mars, make_prid2011


@pytest.fixture(scope="module")
def mars(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_mars(tmp_path_factory.mktemp("data") / "mars")


@pytest.fixture(scope="module")
def ilids(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_ilidsvid(tmp_path_factory.mktemp("data") / "ilids-vid")


@pytest.fixture(scope="module")
def prid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_prid2011(tmp_path_factory.mktemp("data") / "prid2011")


# ---------------------------------------------------------------- clip sampling


def test_evenly_takes_segment_centres() -> None:
    # 10 frames, 4 segments of 2.5: centres 1.25, 3.75, 6.25, 8.75
    assert clip_indices(10, 4, "evenly").tolist() == [1, 3, 6, 8]
    # 3 frames stretched over 5: centres 0.3, 0.9, 1.5, 2.1, 2.7
    assert clip_indices(3, 5, "evenly").tolist() == [0, 0, 1, 2, 2]
    assert clip_indices(4, 4, "evenly").tolist() == [0, 1, 2, 3]


def test_random_is_sorted_distinct_and_seeded() -> None:
    torch.manual_seed(0)
    draws = [clip_indices(20, 8, "random") for _ in range(50)]
    for d in draws:
        assert len(d) == 8 and len(set(d.tolist())) == 8
        assert (np.diff(d) > 0).all() and d.min() >= 0 and d.max() < 20
    assert len({tuple(d) for d in draws}) > 40  # actually random
    seen = np.zeros(20, bool)
    seen[np.concatenate(draws)] = True
    assert seen.all()
    torch.manual_seed(0)
    assert all((clip_indices(20, 8, "random") == d).all() for d in draws)


def test_random_on_a_short_tracklet_draws_with_replacement() -> None:
    torch.manual_seed(1)
    for _ in range(20):
        d = clip_indices(3, 8, "random")
        assert len(d) == 8 and (np.diff(d) >= 0).all() and set(d.tolist()) <= {0, 1, 2}


def test_all_is_chunked_and_padded_with_the_last_frame() -> None:
    assert clip_indices(10, 4, "all").tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 9, 9]]
    assert clip_indices(4, 4, "all").tolist() == [[0, 1, 2, 3]]
    assert clip_indices(1, 3, "all").tolist() == [[0, 0, 0]]


def test_unknown_sampling_is_a_config_error(mars: Path) -> None:
    with pytest.raises(ConfigError, match="sampling must be one of"):
        clip_indices(5, 2, "dense")
    with pytest.raises(ConfigError, match="sampling must be one of"):
        MARS(mars, "train", sampling="dense")


# ------------------------------------------------------------------------- MARS


def test_mars_train_tracklets_pids_cameras_and_labels(mars: Path) -> None:
    ds = MARS(mars, "train")
    assert ds.pids.tolist() == [1, 1, 3, 3, 3, 7, 7]
    assert ds.camids.tolist() == [0, 1, 0, 2, 2, 1, 4]  # published cameras 1..6 -> 0..5
    assert ds.labels.tolist() == [0, 0, 1, 1, 1, 2, 2]
    assert ds.num_classes == 3
    frames, pid, camid = ds.tracklets[4]  # second tracklet of person 3 in camera 3, 6 frames
    assert (pid, camid) == (3, 2)
    assert [Path(f).relative_to(mars).as_posix() for f in frames] == [
        f"bbox_train/0003/0003C3T0002F{f:03d}.jpg" for f in range(1, 7)
    ]


def test_mars_query_is_query_idx_without_junk(mars: Path) -> None:
    q = MARS(mars, "query")
    assert q.rows.tolist() == [4, 5, 7, 9, 10]  # query_IDX [5, 6, 8, 10, 11] - 1
    assert q.pids.tolist() == [2, 2, 4, 4, 6]
    assert q.camids.tolist() == [0, 1, 0, 4, 3]
    assert q.labels.tolist() == q.pids.tolist()  # test splits keep the published identities


def test_mars_official_gallery_holds_every_test_tracklet_but_junk(mars: Path) -> None:
    g = MARS(mars, "gallery")
    assert g.rows.tolist() == list(range(2, 12))  # rows 0, 1 are junk (pid -1)
    assert g.pids.tolist() == [0, 0, 2, 2, 2, 4, 4, 4, 6, 6]  # distractors (pid 0) kept
    assert -1 not in g.pids
    assert set(MARS(mars, "query").rows) <= set(g.rows.tolist())
    assert all("/00-1/" not in f for t in g.tracklets for f in t[0])


def test_mars_torchreid_gallery_also_drops_the_queries(mars: Path) -> None:
    g = MARS(mars, "gallery", gallery_includes_query=False)
    assert g.rows.tolist() == [2, 3, 6, 8, 11]
    assert g.pids.tolist() == [0, 0, 2, 4, 6]


def test_mars_items_train_vs_test(mars: Path) -> None:
    clip, label = MARS(mars, "train", seq_len=5, sampling="evenly")[2]
    assert clip.shape == (5, 3, 8, 4) and clip.dtype == torch.uint8 and label == 1
    clip, pid, camid = MARS(mars, "query", seq_len=3, sampling="all")[0]  # 4 frames -> 2 chunks
    assert clip.shape == (2, 3, 3, 8, 4) and (pid, camid) == (2, 0)
    assert torch.equal(clip[1, 1], clip[1, 0])  # padding repeats the last frame


def test_mars_clip_frames_come_in_temporal_order(mars: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(mars, tmp_path / "mars")
    folder = copy / "bbox_train" / "0003"
    for f in range(1, 7):  # tracklet 4: give frame f the solid red 30 * f
        Image.new("RGB", (4, 8), (30 * f, 0, 0)).save(folder / f"0003C3T0002F{f:03d}.jpg")
    clip, _ = MARS(copy, "train", seq_len=3, sampling="evenly")[4]
    # 6 frames in 3 segments: centres 1, 3, 5 -> frames F002, F004, F006
    reds = clip[:, 0].float().mean(dim=(1, 2)).tolist()
    assert reds == pytest.approx([60, 120, 180], abs=3)
    clip, *_ = MARS(copy, "train", seq_len=4, sampling="all")[4]
    reds = clip[:, :, 0].float().mean(dim=(2, 3)).flatten().tolist()
    assert reds == pytest.approx([30, 60, 90, 120, 150, 180, 180, 180], abs=3)


def test_video_transform_is_applied_once_per_clip(mars: Path) -> None:
    erase = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.RandomErasing(p=1.0, value=-1.0)])
    torch.manual_seed(0)
    ds = MARS(mars, "train", seq_len=4, sampling="evenly", transform=erase)
    for i in range(len(ds)):
        clip, _ = ds[i]
        erased = clip == -1.0
        assert erased.any()
        assert all(torch.equal(erased[0], erased[t]) for t in range(4))  # same box every frame


def test_mars_missing_info_file_only_matters_for_the_split_that_reads_it(
    mars: Path, tmp_path: Path
) -> None:
    copy = shutil.copytree(mars, tmp_path / "mars")
    (copy / "info" / "query_IDX.mat").unlink()
    assert len(MARS(copy, "train")) == 7
    with pytest.raises(DataError, match="missing file 'query_IDX.mat'") as e:
        MARS(copy, "gallery")
    assert str(copy / "info" / "query_IDX.mat") in str(e.value)
    assert "github.com/liangzheng06/MARS-evaluation" in str(e.value)


def test_mars_name_file_that_does_not_match_the_info(mars: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(mars, tmp_path / "mars")
    names = (copy / "info" / "test_name.txt").read_text().splitlines()
    (copy / "info" / "test_name.txt").write_text("\n".join(names[:-3]) + "\n")
    with pytest.raises(DataError, match="row 12 of track_test_info spans lines 37..40"):
        MARS(copy, "query")
    (copy / "info" / "test_name.txt").write_text("\n".join(names[1:] + names[:1]) + "\n")
    with pytest.raises(DataError, match="do not belong together"):
        MARS(copy, "query")


def test_mars_missing_person_folder_is_named(mars: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(mars, tmp_path / "mars")
    shutil.rmtree(copy / "bbox_test" / "0004")
    with pytest.raises(DataError, match="missing") as e:
        MARS(copy, "gallery")
    assert str(copy / "bbox_test" / "0004") in str(e.value)


def test_mars_unreadable_frame_error_or_nearest_frame(mars: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(mars, tmp_path / "mars")
    bad = copy / "bbox_train/0001/0001C1T0001F002.jpg"
    bad.write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot decode image") as e:
        MARS(copy, "train", seq_len=3, sampling="evenly")[0]
    assert str(bad) in str(e.value)
    ds = MARS(copy, "train", seq_len=3, sampling="evenly", on_bad_image="skip")
    clip, label = ds[0]
    assert clip.shape == (3, 3, 8, 4) and label == 0
    assert ds.bad_images == {str(bad)}


def test_identity_sampler_over_mars_tracklets(mars: Path) -> None:
    ds = MARS(mars, "train")
    sampler = PKSampler(ds.labels, classes_per_batch=2, samples_per_class=2, seed=0)
    for batch in sampler:
        labels = ds.labels[batch]
        assert len(set(labels.tolist())) == 2 and np.bincount(labels).max() == 2


# -------------------------------------------------------------------- iLIDS-VID


def _ls_set_people(mat: Path, people: list[str], split_id: int) -> tuple[list[str], list[str]]:
    row = loadmat(str(mat))["ls_set"][split_id].astype(int)
    half = len(row) // 2
    return sorted(people[i - 1] for i in row[half:]), sorted(people[i - 1] for i in row[:half])


ILIDS_FOLDERS = [f"person{p:03d}" for p in (1, 2, 4, 5, 7, 8, 10, 13)]


@pytest.mark.parametrize("split_id", [0, 2])
def test_ilidsvid_split_follows_ls_set(ilids: Path, split_id: int) -> None:
    mat = ilids / "train-test people splits" / "train_test_splits_ilidsvid.mat"
    train_people, test_people = _ls_set_people(mat, ILIDS_FOLDERS, split_id)
    train = ILIDSVID(ilids, "train", split_id=split_id)
    query = ILIDSVID(ilids, "query", split_id=split_id)
    gallery = ILIDSVID(ilids, "gallery", split_id=split_id)
    assert train.train_people == train_people and train.test_people == test_people
    train_numbers = [int(p[6:]) for p in train_people]
    assert train.pids.tolist() == [n for n in train_numbers for _ in (1, 2)]
    assert train.camids.tolist() == [0, 1] * 4
    assert train.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    test_numbers = [int(p[6:]) for p in test_people]
    assert query.pids.tolist() == gallery.pids.tolist() == test_numbers
    assert set(query.camids.tolist()) == {0} and set(gallery.camids.tolist()) == {1}
    assert not set(train_numbers) & set(test_numbers)


def test_ilidsvid_splits_differ_and_frames_are_ordered(ilids: Path) -> None:
    a, b = ILIDSVID(ilids, "query", split_id=0), ILIDSVID(ilids, "query", split_id=1)
    assert a.pids.tolist() != b.pids.tolist()
    frames, pid, _ = ILIDSVID(ilids, "gallery").tracklets[0]
    first = 100 + 7 * pid  # the fake's start frame; cam2 has 4 + pid % 3 frames
    assert [Path(f).name for f in frames] == [
        f"cam2_person{pid:03d}_{f:05d}.png" for f in range(first, first + 4 + pid % 3)
    ]


def test_ilidsvid_split_file_inside_the_data_folder(tmp_path: Path) -> None:
    root = make_ilidsvid(tmp_path / "ilids-vid", splits_in_data_folder=True)
    assert not (root / "train-test people splits").exists()
    assert len(ILIDSVID(root, "train")) == 8


def test_ilidsvid_split_id_out_of_range(ilids: Path) -> None:
    with pytest.raises(ConfigError, match=r"split_id must lie in 0..2"):
        ILIDSVID(ilids, "train", split_id=3)


def test_ilidsvid_person_in_one_camera_only(ilids: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(ilids, tmp_path / "ilids-vid")
    shutil.rmtree(copy / "i-LIDS-VID/sequences/cam2/person013")
    with pytest.raises(DataError, match="person013 exists in only one of"):
        ILIDSVID(copy, "train")


def test_ilidsvid_split_file_for_a_different_number_of_people(ilids: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(ilids, tmp_path / "ilids-vid")
    for cam in ("cam1", "cam2"):
        shutil.rmtree(copy / f"i-LIDS-VID/sequences/{cam}/person013")
    with pytest.raises(DataError, match="splits 8 people but 7 qualify"):
        ILIDSVID(copy, "train")


def test_ilidsvid_missing_split_file_lists_where_it_looked(ilids: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(ilids, tmp_path / "ilids-vid")
    shutil.rmtree(copy / "train-test people splits")
    with pytest.raises(DataError, match="missing file 'train_test_splits_ilidsvid.mat'") as e:
        ILIDSVID(copy, "query")
    assert str(copy / "i-LIDS-VID" / "train-test people splits") in str(e.value)


# --------------------------------------------------------------------- PRID2011

# PRID_PEOPLE: frames (cam_a, cam_b) = 1: (27, 30), 2: (40, 28), 3: (12, 33), 4: (29, 27),
# 5: (30, 26), 6: (28, 31); >= 27 in both cameras: people 1, 2, 4, 6.
PRID_KEPT = ["person_0001", "person_0002", "person_0004", "person_0006"]


def test_prid_keeps_people_with_27_frames_in_both_cameras(prid: Path) -> None:
    mat = prid / "train_test_splits_prid.mat"
    train_people, test_people = _ls_set_people(mat, PRID_KEPT, 0)
    train, query = PRID2011(prid, "train"), PRID2011(prid, "query")
    gallery = PRID2011(prid, "gallery")
    assert train.people == PRID_KEPT
    assert train.train_people == train_people and train.test_people == test_people
    assert train.pids.tolist() == [int(p[7:]) for p in train_people for _ in (1, 2)]
    assert train.labels.tolist() == [0, 0, 1, 1]
    assert query.pids.tolist() == gallery.pids.tolist() == [int(p[7:]) for p in test_people]
    assert set(query.camids.tolist()) == {0} and set(gallery.camids.tolist()) == {1}
    frames = query.tracklets[0][0]
    assert [Path(f).parent.parent.name for f in frames] == ["cam_a"] * len(frames)
    assert [Path(f).name for f in frames][:3] == ["0001.png", "0002.png", "0003.png"]


def test_prid_only_the_first_200_people_are_shared(tmp_path: Path) -> None:
    people = {p: (1, 1) for p in range(7, 201)}  # too short: outside the protocol
    people.update({1: (27, 30), 2: (40, 28), 3: (12, 33), 4: (29, 27), 5: (30, 26), 6: (28, 31)})
    root = make_prid2011(
        tmp_path / "prid2011", people=people, only_cam_a=(201, 202), only_cam_b=(201, 203)
    )
    # person_0201 has 30 frames in both folders but is a different person in each camera
    assert PRID2011(root, "train").people == PRID_KEPT


@pytest.mark.parametrize("where", ["people_splits", "ilids_sibling"])
def test_prid_split_file_locations(tmp_path: Path, where: str) -> None:
    root = make_prid2011(tmp_path / "prid2011", split_location=where)
    assert len(PRID2011(root, "query")) == 2


def test_prid_explicit_split_file(prid: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(prid, tmp_path / "prid2011")
    moved = shutil.move(copy / "train_test_splits_prid.mat", tmp_path / "splits.mat")
    with pytest.raises(DataError, match="missing file 'train_test_splits_prid.mat'") as e:
        PRID2011(copy, "train")
    assert "ilids-vid" in str(e.value)
    assert len(PRID2011(copy, "train", split_file=moved)) == 4


def test_prid_min_frames_must_match_the_split_file(prid: Path) -> None:
    # with 26 frames person 5 qualifies too, and ls_set (4 people) no longer fits
    with pytest.raises(DataError, match="splits 4 people but 5 qualify"):
        PRID2011(prid, "train", min_frames=26)


def test_video_split_names_are_checked(prid: Path) -> None:
    with pytest.raises(ConfigError, match="split must be one of"):
        PRID2011(prid, "test")
    with pytest.raises(ConfigError, match="seq_len must be >= 1"):
        PRID2011(prid, "train", seq_len=0)
