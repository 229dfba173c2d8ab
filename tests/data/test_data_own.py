"""Your own data: image folders and CSV lists, their splits, errors, and end-to-end runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from softmine.data import CSVDataset, ImageFolder
from softmine.data.build import build_split
from softmine.data.custom import held_out, number_names
from softmine.data.datasets.csvlist import CSVImages, CSVTracklets, read_csv_table
from softmine.data.image_sizes import fitting_resolution, small_images_hint
from softmine.data.sources import natural_key
from softmine.engine.embedding import extract_reid_embeddings
from softmine.engine.evaluator import Evaluator
from softmine.errors import ConfigError, DataError
from softmine.evaluation import reid_metrics
from softmine.models import EmbeddingNet, TinyCNN
from softmine.testing.fakes import make_csv, make_image_folder, write_image
from tests.conftest import compose, run_cli

# ------------------------------------------------------------- ids and splits


def test_integer_names_keep_their_value_others_are_numbered_naturally() -> None:
    assert number_names(["1", "0", "10", "2", "-1"]) == {"-1": -1, "0": 0, "1": 1, "2": 2, "10": 10}
    assert number_names(["cat", "class10", "class2", "ant"]) == {
        "ant": 0,
        "cat": 1,
        "class2": 2,
        "class10": 3,
    }
    assert number_names(["3", "x"]) == {"3": 0, "x": 1}  # mixed: all numbered


def test_names_equal_as_numbers_stay_distinct_classes_in_one_order() -> None:
    # "1" and "01" are two folders / two labels: two classes, numbered in natural order
    # with ties broken by the text, whatever order the names come in
    expected = {"01": 0, "1": 1, "002": 2, "2": 3}
    for names in (["1", "01", "2", "002"], ["002", "2", "01", "1"], ["2", "1", "002", "01"]):
        assert number_names(names) == expected
        assert sorted(names, key=natural_key) == ["01", "1", "002", "2"]
    assert number_names(["07", "8"]) == {"07": 7, "8": 8}  # distinct numbers keep their value


def test_per_image_split_takes_the_ratio_of_every_class_with_a_fixed_seed() -> None:
    ids = np.repeat([4, 7, 9], [10, 4, 1])
    mask = held_out(ids, "images", test_ratio=0.3, split_seed=1)
    # round(0.3 * n): 3 of 10, 1 of 4, 0 of 1 (half to even).
    assert [int(mask[ids == c].sum()) for c in (4, 7, 9)] == [3, 1, 0]
    np.testing.assert_array_equal(mask, held_out(ids, "images", test_ratio=0.3, split_seed=1))
    assert not np.array_equal(mask, held_out(ids, "images", test_ratio=0.3, split_seed=2))


def test_class_split_is_the_zero_shot_protocol() -> None:
    ids = np.repeat([1, 2, 3, 4], 2)
    np.testing.assert_array_equal(held_out(ids, "classes"), np.isin(ids, [3, 4]))
    names = {"a": 1, "b": 2, "c": 3, "d": 4}
    chosen = held_out(ids, "classes", test_classes=["b"], numbering=names)
    np.testing.assert_array_equal(chosen, ids == 2)
    with pytest.raises(ConfigError, match="test_classes names 1 class.*'zebra'"):
        held_out(ids, "classes", test_classes=["zebra"], numbering=names)
    with pytest.raises(ConfigError, match="leaves every class for test"):
        held_out(ids, "classes", test_classes=list(names), numbering=names)
    with pytest.raises(ConfigError, match="test_ratio must lie strictly between 0 and 1"):
        held_out(ids, "images", test_ratio=1.0)
    with pytest.raises(ConfigError, match="split_by must be one of"):
        held_out(ids, "people")


# ------------------------------------------------------------------ ImageFolder


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("own") / "images", 6, 4, size=8)


def test_image_folder_default_splits_every_class_by_image(folder: Path) -> None:
    train, test = ImageFolder(folder, "train"), ImageFolder(folder, "test")
    assert train.classes.tolist() == test.classes.tolist() == list(range(6))
    assert len(train) == len(test) == 12  # 2 of the 4 images of each class test
    paths = [p for p, _ in train.samples + test.samples]
    assert len(set(paths)) == 24 and {Path(p).parent.name for p in paths} == {
        f"class_{c}" for c in range(6)
    }
    assert train.class_names[0] == "class_0"
    image, label = test[0]
    assert tuple(image.shape) == (3, 8, 8) and label == 0


def test_image_folder_class_split_and_two_roots(folder: Path, tmp_path: Path) -> None:
    test = ImageFolder(folder, "test", split_by="classes")
    assert test.classes.tolist() == [3, 4, 5] and len(test) == 12
    named = ImageFolder(folder, "train", split_by="classes", test_classes=["class_1", "class_4"])
    assert named.classes.tolist() == [0, 2, 3, 5]
    other = make_image_folder(tmp_path / "test_images", 2, 3, names=["class_7", "class_8"])
    split = ImageFolder(folder, "test", test_root=other)
    # numbered over both roots in natural order: class_0..5, class_7, class_8 -> 0..7
    assert split.classes.tolist() == [6, 7] and len(split) == 6
    assert len(ImageFolder(folder, "train", test_root=other)) == 24


def test_image_folder_query_and_gallery_roots(tmp_path: Path) -> None:
    query = make_image_folder(tmp_path / "q", 3, 1, names=["0", "1", "2"])
    gallery = make_image_folder(tmp_path / "g", 4, 2, names=["0", "1", "2", "3"])
    train = make_image_folder(tmp_path / "t", 2, 2, names=["10", "11"])
    kw = {"query_root": query, "gallery_root": gallery}
    q, g = ImageFolder(train, "query", **kw), ImageFolder(train, "gallery", **kw)
    assert q.pids.tolist() == [0, 1, 2] and g.pids.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert set(q.camids.tolist()) == {0} and set(g.camids.tolist()) == {1}
    assert q[0][1:] == (0, 0) and g[7][1:] == (3, 1)
    with pytest.raises(ConfigError, match="dataset.query_root is not set"):
        ImageFolder(train, "query")


def test_folders_1_and_01_are_two_classes(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "photos", 3, 4, size=8, names=["1", "01", "2"])
    for split in ("train", "test"):
        data = ImageFolder(root, split)
        assert data.num_classes == 3 and data.class_names == ["01", "1", "2"]
        for path, label in data.samples:  # every image in the class of its own folder
            assert Path(path).parent.name == data.class_names[label]


def test_csv_labels_1_and_01_are_two_classes(tmp_path: Path) -> None:
    file = make_csv(tmp_path, labels=("3", "03", "1", "01"), images_per_label=3)
    train, query = CSVDataset(file, "train"), CSVDataset(file, "query")
    assert train.class_names == ["03", "3"] and len(train) == 6
    assert query.class_names == ["01", "1"] and len(set(query.pids.tolist())) == 2
    for path, label in train.samples:
        assert Path(path).parent.name == train.class_names[label]


def test_held_out_classes_keep_their_names(tmp_path: Path) -> None:
    from softmine.data.splits import ClassSubset

    root = make_image_folder(tmp_path / "photos", 4, 2, size=8, names=["ant", "bee", "cat", "dog"])
    data = ImageFolder(root, "train")
    kept = ClassSubset(data, np.array([1, 3]), relabel=True)  # bee, dog -> labels 0, 1
    assert kept.class_names == ["bee", "dog"] and kept.labels.tolist() == [0, 1]
    assert ClassSubset(data, np.array([1, 3]), relabel=False).class_names == data.class_names


def test_errors_name_a_class_by_its_folder_not_its_id(tmp_path: Path) -> None:
    from softmine.engine.trainer import Trainer

    root = make_image_folder(tmp_path / "photos", 3, 8, size=8, names=["ant", "bee", "cat"])
    for path in sorted((root / "bee").iterdir())[2:]:
        path.unlink()  # bee keeps 2 images: 1 trains, fewer than K = 2
    cfg = compose(["dataset=imagefolder", f"dataset.root={root}", *FAST])
    cfg.sampler.classes_per_batch, cfg.sampler.samples_per_class = 2, 2
    with pytest.raises(ConfigError, match=r"e\.g\. class 'bee'\)"):
        Trainer(cfg, tmp_path / "run")
    bad = ImageFolder(root, "train", on_bad_image="skip")
    for path, _ in bad.samples:
        if Path(path).parent.name == "cat":
            Path(path).write_bytes(b"not an image")
    cat = next(i for i, (p, _) in enumerate(bad.samples) if Path(p).parent.name == "cat")
    with pytest.raises(DataError, match="no readable image left in class 'cat'"):
        bad[cat]


def test_label_noise_and_bad_images_work_as_for_the_published_sets(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "photos", 4, 4, size=8)
    noisy = build_split(
        compose(["dataset=imagefolder", f"dataset.root={root}", "dataset.label_noise=0.5"]).dataset,
        "train",
    )
    assert int(noisy.flipped.sum()) == 4 and (noisy.labels != noisy.clean_labels).sum() == 4
    train = ImageFolder(root, "train")
    broken = Path(train.samples[0][0])
    broken.write_bytes(b"not an image")
    with pytest.raises(DataError, match=f"cannot decode image {broken}"):
        ImageFolder(root, "train")[0]
    skipping = ImageFolder(root, "train", on_bad_image="skip")
    image, label = skipping[0]
    assert label == 0 and str(broken) in skipping.bad_images  # another image of class 0


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="image folder: dataset folder .* does not exist"):
        ImageFolder(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no class sub-folders"):
        ImageFolder(tmp_path / "empty")
    (tmp_path / "text" / "a").mkdir(parents=True)
    (tmp_path / "text" / "a" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="hold no images"):
        ImageFolder(tmp_path / "text")


# -------------------------------------------------------------------- CSV lists


def _write_csv(path: Path, header: str, rows: list[str], images: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if images:
        for row in rows:
            write_image(path.parent / row.split(",")[header.split(",").index("path")], 8, 8)
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_csv_with_split_and_query_gallery_columns(tmp_path: Path) -> None:
    file = make_csv(tmp_path, labels=(0, 1, 2, 3, 4, 5), images_per_label=3)
    train, test = CSVDataset(file, "train"), CSVDataset(file, "test")
    query, gallery = CSVDataset(file, "query"), CSVDataset(file, "gallery")
    assert isinstance(train, CSVImages)
    assert train.classes.tolist() == [0, 1, 2] and len(train) == 9
    assert test.classes.tolist() == [3, 4, 5] and len(test) == 9
    assert query.pids.tolist() == [3, 4, 5] and gallery.pids.tolist() == [3, 3, 4, 4, 5, 5]
    assert query[1][1:] == (4, 0) and gallery[0][1:] == (3, 1)
    assert train.samples[0][0] == str(tmp_path / "images/0/0.png")


def test_csv_flags_without_split_column_and_default_cameras(tmp_path: Path) -> None:
    rows = ["a.png,7,1,0", "b.png,7,0,1", "c.png,8,0,0", "d.png,8,0,0", "e.png,7,0,1"]
    file = _write_csv(tmp_path / "list.csv", "path,label,is_query,is_gallery", rows)
    assert [p.split("/")[-1] for p, _ in CSVDataset(file, "train").samples] == ["c.png", "d.png"]
    query, gallery = CSVDataset(file, "query"), CSVDataset(file, "gallery")
    assert (query.pids.tolist(), query.camids.tolist()) == ([7], [0])
    assert (gallery.pids.tolist(), gallery.camids.tolist()) == ([7, 7], [1, 1])
    both = _write_csv(tmp_path / "both.csv", "path,label,is_query,is_gallery", ["a.png,7,1,1"])
    with pytest.raises(DataError, match=r"both.csv line 2: 1 row\(s\) are both query and gallery"):
        CSVDataset(both, "query")


def test_csv_split_rules_apply_without_split_columns(tmp_path: Path) -> None:
    rows = [f"{c}_{k}.png,{c}" for c in ("dog", "cat", "owl") for k in range(4)]
    file = _write_csv(tmp_path / "plain.csv", "path,label", rows)
    train, test = CSVDataset(file, "train"), CSVDataset(file, "test")
    assert len(train) == len(test) == 6 and train.class_names == ["cat", "dog", "owl"]
    zero_shot = CSVDataset(file, "test", split_by="classes", test_classes=["dog"])
    assert zero_shot.class_names == ["dog"] and len(zero_shot) == 4
    with pytest.raises(DataError, match="has no is_query column, so it has no query split"):
        CSVDataset(file, "query")


def test_csv_oml_validation_split_and_camera(tmp_path: Path) -> None:
    header = "label,path,split,is_query,is_gallery,camera"
    rows = ["5,x/1.png,validation,1,1,0", "5,x/2.png,validation,0,1,1", "6,x/3.png,train,0,0,2"]
    file = _write_csv(tmp_path / "oml.csv", header, rows)
    query, gallery = CSVDataset(file, "query"), CSVDataset(file, "gallery")
    assert query.camids.tolist() == [0] and gallery.camids.tolist() == [0, 1]
    assert gallery.pids.tolist() == [5, 5] and CSVDataset(file, "train").camids.tolist() == [2]


@pytest.mark.parametrize(
    ("header", "rows", "message"),
    [
        ("file,label", ["a.png,1"], r"has no column\(s\) \['path'\]"),
        ("path,label,split", ["a.png,1,dev"], "line 2: split is 'dev'; use train or test"),
        ("path,label,is_query", ["a.png,1,maybe"], "line 2: is_query is 'maybe'"),
        ("path,label,camera", ["a.png,1,0", "b.png,1,left"], "line 3: camera must be an integer"),
        ("path,label", ["a.png,"], "line 2: the path or label is empty"),
    ],
)
def test_csv_format_errors_name_the_line(
    tmp_path: Path, header: str, rows: list[str], message: str
) -> None:
    file = _write_csv(tmp_path / "bad.csv", header, rows, images=False)
    with pytest.raises(DataError, match=message):
        read_csv_table(file)


def test_csv_missing_file_and_missing_image(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"CSV list: missing file 'none.csv' \(looked for"):
        CSVDataset(tmp_path / "none.csv")
    file = make_csv(tmp_path, labels=(0, 1), images_per_label=2, query_gallery=False)
    (tmp_path / "images/1/0.png").unlink()
    errors = []
    for split in ("train", "test"):  # the missing image is in one of the two
        try:
            CSVDataset(file, split)
        except DataError as e:
            errors.append(str(e))
    assert len(errors) == 1 and "1 file(s) listed in" in errors[0]
    assert str(tmp_path / "images/1/0.png") in errors[0]
    kept = sum(len(CSVDataset(file, s, on_bad_image="skip")) for s in ("train", "test"))
    assert kept == 3


def test_own_data_errors_name_dataset_file_and_never_advise_a_download(tmp_path: Path) -> None:
    """The user's own folders and CSV files were never downloaded: no advice to do it again,
    and a CSV is dataset.file (dataset.root is not read for dataset=csv)."""
    file = make_csv(tmp_path / "csv", labels=(0, 1), images_per_label=2, query_gallery=False)
    (tmp_path / "csv/images/1/0.png").unlink()
    bad_split = _write_csv(tmp_path / "bad.csv", "path,label,split", ["a.png,1,dev"], False)
    root = make_image_folder(tmp_path / "photos", 2, 2, size=8)
    (root / "class_1" / "img_0.png").write_bytes(b"not an image")
    messages = []
    for make in (
        lambda: CSVDataset(tmp_path / "none.csv"),
        lambda: [CSVDataset(file, split) for split in ("train", "test")],
        lambda: CSVDataset(bad_split),
        lambda: ImageFolder(tmp_path / "none"),
        lambda: [item for s in ("train", "test") for item in ImageFolder(root, s)],
    ):
        with pytest.raises(DataError) as e:
            make()
        messages.append(str(e.value))
    assert "missing file 'none.csv'" in messages[0] and "cannot decode" in messages[4]
    assert all("download" not in m for m in messages), messages
    assert all("dataset.file" in m and "dataset.root" not in m for m in messages[:3])
    assert "restore them or correct their paths" in messages[1]


def test_csv_sequence_column_gives_tracklets(tmp_path: Path) -> None:
    header = "path,label,sequence,camera,is_query,is_gallery"
    rows = [
        "f/1.png,3,s1,0,1,0",
        "f/2.png,3,s1,0,1,0",
        "f/3.png,3,s2,1,0,1",
        "f/4.png,4,s3,1,0,1",
        "f/5.png,9,s4,0,0,0",
        "f/6.png,9,s4,0,0,0",
        "f/7.png,9,s5,1,0,0",
    ]
    file = _write_csv(tmp_path / "video.csv", header, rows)
    train = CSVDataset(file, "train", seq_len=2)
    assert isinstance(train, CSVTracklets) and len(train) == 2 and train.labels.tolist() == [0, 0]
    query, gallery = CSVDataset(file, "query", seq_len=2), CSVDataset(file, "gallery", seq_len=2)
    assert [len(t[0]) for t in query.tracklets] == [2] and query.pids.tolist() == [3]
    assert gallery.pids.tolist() == [3, 4] and gallery.camids.tolist() == [1, 1]
    clip, pid, camid = query[0]
    assert clip.shape == (1, 2, 3, 8, 8) and (pid, camid) == (3, 0)
    split = _write_csv(tmp_path / "split.csv", header, [rows[0], "f/2.png,3,s1,0,0,0"])
    with pytest.raises(DataError, match="has rows inside and outside the query split"):
        CSVDataset(split, "query")
    with pytest.raises(ConfigError, match="set dataset.eval_protocol=reid"):
        CSVDataset(file, "test")


# --------------------------------------------------- evaluation through the configs


def _model() -> EmbeddingNet:
    torch.manual_seed(0)
    return EmbeddingNet(TinyCNN(in_channels=3, width=4), embedding_dim=8)


SMALL = ["dataset.transform.resize=16", "dataset.transform.crop_size=16", "trainer.device=cpu"]


def _evaluate(overrides: list[str]) -> dict[str, float]:
    cfg = compose(overrides + SMALL)
    return Evaluator(cfg, torch.device("cpu")).evaluate(_model())


def test_zero_based_and_one_based_identities_give_the_same_cmc_and_map(tmp_path: Path) -> None:
    zero = make_csv(tmp_path / "zero", labels=(0, 1, 2, 3, 4, 5), images_per_label=3)
    one = make_csv(tmp_path / "one", labels=(1, 2, 3, 4, 5, 6), images_per_label=3)
    # Same images (make_csv draws them from the label's position), ids shifted by one.
    common = ["dataset=csv", "dataset.eval_protocol=reid"]
    m0 = _evaluate([*common, f"dataset.file={zero}"])
    m1 = _evaluate([*common, f"dataset.file={one}"])
    assert m0 == m1 and m0["num_skipped_queries"] == 0
    assert set(m0) == {"cmc@1", "cmc@5", "cmc@10", "cmc@20", "mAP", "num_skipped_queries"}


def test_evaluator_passes_the_dataset_junk_and_distractor_ids(tmp_path: Path) -> None:
    file = make_csv(tmp_path, labels=(0, 1, 2, 3, 4, 5), images_per_label=3)
    common = ["dataset=csv", f"dataset.file={file}", "dataset.eval_protocol=reid"]
    plain = _evaluate(common)
    marked = _evaluate([*common, "dataset.junk_pids=[4]", "dataset.distractor_pids=[3]"])
    cfg = compose(common + SMALL)
    sets = [build_split(cfg.dataset, s) for s in ("query", "gallery")]
    (q, qp, qc), (g, gp, gc) = (
        extract_reid_embeddings(_model(), s, device=torch.device("cpu")) for s in sets
    )
    want = reid_metrics(q, qp, qc, g, gp, gc, junk_pids=(4,), distractor_pids=(3,))
    assert marked == pytest.approx(want) and plain == pytest.approx(
        reid_metrics(q, qp, qc, g, gp, gc)
    )
    assert marked["num_skipped_queries"] == 2  # the queries of ids 3 and 4 have no match left


def test_query_gallery_retrieval_of_a_csv(tmp_path: Path) -> None:
    file = make_csv(tmp_path, labels=(0, 1, 2, 3, 4, 5), images_per_label=3)
    m = _evaluate(["dataset=csv", f"dataset.file={file}", "dataset.eval_protocol=query_gallery"])
    assert set(m) == {"recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision"}
    assert m["recall@8"] == 1.0  # 6 gallery items: every query's two matches are in its top 8


def test_eval_protocol_needs_its_nodes() -> None:
    with pytest.raises(ConfigError, match="eval_protocol=retrieval needs the dataset config node"):
        Evaluator(compose(["dataset=mars", "dataset.eval_protocol=retrieval"]), torch.device("cpu"))
    with pytest.raises(ConfigError, match="eval_protocol must be one of"):
        Evaluator(compose(["dataset=mars", "dataset.eval_protocol=cmc"]), torch.device("cpu"))


# --------------------------------------------------------------- end to end (CLI)

FAST = [
    "backbone.pretrained=false",  # the own-data default ResNet-50, never downloaded in a test
    "trainer.max_iters=2",
    "trainer.progress_bar=false",
    "trainer.plots=false",
    "trainer.tensorboard=false",
    "trainer.num_workers=0",
    "dataset.transform.resize=24",
    "dataset.transform.crop_size=24",
]


@pytest.mark.slow
def test_image_folder_trains_and_evaluates_with_only_its_root(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "photos", num_classes=10, images_per_class=16)
    run = tmp_path / "run"
    res = run_cli(
        [
            "softmine.commands.train",
            "dataset=imagefolder",
            f"dataset.root={root}",
            f"hydra.run.dir={run}",
        ]
        + FAST,
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"recall@1", "recall@8", "map@r", "nmi"} <= set(metrics)
    assert 0.0 <= metrics["recall@1"] <= 1.0


@pytest.mark.slow
def test_csv_with_query_gallery_columns_trains_and_reports_cmc_map(tmp_path: Path) -> None:
    file = make_csv(tmp_path, labels=tuple(range(16)), images_per_label=8)
    run = tmp_path / "run"
    res = run_cli(
        [
            "softmine.commands.train",
            "dataset=csv",
            f"dataset.file={file}",
            "dataset.eval_protocol=reid",
            f"hydra.run.dir={run}",
        ]
        + FAST,
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"cmc@1", "cmc@20", "mAP"} <= set(metrics) and metrics["num_skipped_queries"] == 0


def test_training_on_a_missing_csv_is_one_line_and_exit_2(tmp_path: Path) -> None:
    res = run_cli(
        ["softmine.commands.train", "dataset=csv", "dataset.file=/nowhere/list.csv"], tmp_path
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "CSV list: missing file 'list.csv'" in errors[0]


# ------------------------------------------------------------- own-data defaults


@pytest.mark.parametrize("name", ["imagefolder", "csv"])
def test_own_data_defaults_to_a_pretrained_resnet50_and_a_fitted_sampler(name: str) -> None:
    """Composed only (no training): ImageNet ResNet-50, 512-d, the DML transform, P x K auto."""
    cfg = compose([f"dataset={name}"])
    b = cfg.backbone
    assert (b.name, b.pretrained, b.embedding_dim) == ("resnet50", True, 512)
    assert b.trunk._target_ == "softmine.models.TorchvisionTrunk" and b.trunk.pretrained is True
    t = cfg.dataset.transform
    assert (t.resize, t.crop_size, list(t.scale), t.flip) == (256, 224, [0.08, 1.0], 0.5)
    assert (cfg.sampler.classes_per_batch, cfg.sampler.samples_per_class) == ("auto", "auto")
    assert cfg.trainer.time_estimate == "auto"
    # the command line, or an experiment, still picks any other backbone and sampler
    assert compose([f"dataset={name}", "backbone=resnet18"]).backbone.name == "resnet18"
    assert compose([f"dataset={name}", "backbone=tiny"]).backbone.name == "tiny"
    fixed = compose([f"dataset={name}", "sampler=pk"]).sampler
    assert (fixed.classes_per_batch, fixed.samples_per_class) == (8, 8)
    modern = compose([f"dataset={name}", "experiment=modern_cub"])
    assert modern.dataset.name == name and modern.sampler.classes_per_batch == 15
    digits = compose([])  # the digits demo keeps its small CNN and 8 x 8 batches
    assert digits.backbone.name == "tiny" and digits.sampler.classes_per_batch == 8


def test_without_network_the_default_backbone_says_how_to_go_on_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """softmine-train dataset=imagefolder with the download failing (offline): exit 2, one line
    naming the file, the TORCH_HOME cache, backbone.pretrained=<file> and pretrained=false."""
    import sys
    from urllib.error import URLError

    import torchvision.models._api as api

    from softmine.commands.train import main

    def offline(*args: object, **kwargs: object) -> None:
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("SOFTMINE_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    root = make_image_folder(tmp_path / "photos", num_classes=10, images_per_class=4, size=8)
    args = ["dataset=imagefolder", f"dataset.root={root}", "trainer.device=cpu"]
    monkeypatch.setattr(sys, "argv", ["softmine-train", *args, f"hydra.run.dir={tmp_path / 'run'}"])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("error: could not download the resnet50 ImageNet weights")
    for part in (
        "TORCH_HOME",
        "backbone.pretrained=/path/to/resnet50-",
        "backbone.pretrained=false",
    ):
        assert part in err[0]


def test_images_far_smaller_than_the_crop_get_a_resolution_that_fits_them() -> None:
    assert fitting_resolution(12, 256, 224) == (32, 32)
    assert fitting_resolution(100, 256, 224) == (96, 80)  # 2x upscaled at 224: fit them
    assert fitting_resolution(150, 256, 224) is None  # photos: the DML 256 / 224 stays
    assert fitting_resolution(12, 24, 24) is None  # already small: nothing smaller to say


def test_small_own_images_name_the_transform_keys_before_training(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """12 px images under the default 224 px crop: one warning naming the keys that fit them."""
    import logging

    from softmine.engine.trainer import Trainer

    root = make_image_folder(tmp_path / "photos", num_classes=10, images_per_class=16)
    cfg = compose(["dataset=imagefolder", f"dataset.root={root}", *FAST])
    assert small_images_hint(build_split(cfg.dataset, "train"), cfg.dataset.transform) is None
    cfg = compose(["dataset=imagefolder", f"dataset.root={root}", "backbone.pretrained=false"])
    hint = small_images_hint(build_split(cfg.dataset, "train"), cfg.dataset.transform)
    assert hint is not None and "short side 12 px" in hint
    assert "dataset.transform.resize=32 dataset.transform.crop_size=32 fits them (49x" in hint
    with caplog.at_level(logging.WARNING, logger="softmine"):
        Trainer(cfg, tmp_path / "run")
    assert [r.getMessage() for r in caplog.records if "images are small" in r.getMessage()] == [
        hint
    ]
