"""The loading options of a dataset config, given once at its top level, reach every split.

``configs/dataset/*.yaml`` give ``root``, ``on_bad_image``, ``cache``, ``cache_size`` and
``cache_dir`` once; :func:`softmine.data.build.build_split` hands them to the reader of
every split node. Each config is composed with the overrides a user types and every
split is built on the fake copy of its data set (:mod:`softmine.testing.fakes`).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from softmine.config import loading_option
from softmine.data.build import build_split, split_node, wrapper_chain
from softmine.data.file_check import base_dataset
from softmine.testing.fakes import BUILDERS
from tests.conftest import compose

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "dataset"

#: The loading options each dataset config offers, read off the readers' arguments by hand.
CACHED = {"root", "on_bad_image", "cache", "cache_size", "cache_dir"}
OPTIONS = {
    "cub": CACHED,
    "cars196": CACHED,
    "mars": CACHED,
    "ilidsvid": CACHED,
    "prid2011": CACHED,
    "sop": {"root", "on_bad_image"},
    "inshop": {"root", "on_bad_image"},
    "lpw": {"root", "on_bad_image"},
    "imagefolder": {"root", "on_bad_image"},
    "csv": {"on_bad_image"},  # its list is `dataset.file`; no cache
    "digits": {"root"},  # root: unused, the data ship inside scikit-learn
    "digits_pairs": {"root"},
    "digits_zeroshot": {"root"},
}
VIDEO = {"mars", "ilidsvid", "prid2011", "lpw"}
SPLITS = ("train", "test", "query", "gallery")


def test_every_dataset_config_is_listed() -> None:
    assert {p.stem for p in CONFIGS.glob("*.yaml")} == set(OPTIONS)


def test_no_split_node_forwards_a_loading_option() -> None:
    """The options are given once: no split node of a shipped config repeats one."""
    for path in CONFIGS.glob("*.yaml"):
        for line in path.read_text().splitlines():
            key = line.split(":", 1)[0].strip()
            if line.startswith(" ") and key in CACHED:
                raise AssertionError(f"{path.name}: a split node sets {key}: {line.strip()}")


@pytest.fixture(scope="module")
def fake_roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("data")
    return {name: BUILDERS[name](base / name) for name in BUILDERS}


def _given(name: str, root: Path, cache_dir: Path) -> tuple[list[str], dict[str, object]]:
    """The command-line overrides of every option ``name`` offers, and the values they set."""
    options = OPTIONS[name]
    values: dict[str, object] = {
        "root": str(root),
        "on_bad_image": "skip",
        "cache": "ram",
        "cache_size": [12, 10],
        "cache_dir": str(cache_dir),
    }
    values = {k: v for k, v in values.items() if k in options}
    given = [f"dataset={name}"]
    given += [f"dataset.{k}={v}" for k, v in values.items() if k != "cache_size"]
    if "cache_size" in values:
        given.append("dataset.cache_size=[12,10]")
    if name == "csv":
        given.append(f"dataset.file={root}")
    if name == "imagefolder":  # its query and gallery need folders of their own
        given += [f"dataset.query_root={root}", f"dataset.gallery_root={root}"]
    if name in VIDEO:
        given.append("dataset.seq_len=2")
    return given, values


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_the_options_reach_every_split_node(name: str, tmp_path: Path) -> None:
    given, values = _given(name, tmp_path / "data", tmp_path / "cache")
    dataset = compose(given).dataset
    splits = [s for s in SPLITS if s in dataset]
    assert splits
    for split in splits:
        reader = wrapper_chain(split_node(dataset, split))[-1]
        assert {k: reader[k] for k in values} == values, split


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_the_options_reach_every_split_dataset(
    name: str, fake_roots: dict[str, Path], tmp_path: Path
) -> None:
    """``dataset.cache=ram dataset.on_bad_image=skip dataset.root=X`` (and the cache size and
    folder) are what every split's dataset object was built with."""
    given, values = _given(name, fake_roots[name], tmp_path / "cache")
    dataset = compose(given).dataset
    for split in (s for s in SPLITS if s in dataset):
        built = base_dataset(build_split(dataset, split))
        assert built is not None, split
        assert built.on_bad_image == "skip", split
        if "root" in values:
            assert Path(built.root) == fake_roots[name], split
        if "cache" in values:
            assert built.cache_options.mode == "ram" and built.cache is not None, split
            assert built.cache_options.size == (12, 10), split
            assert built.cache_options.folder == str(tmp_path / "cache"), split


def test_a_split_node_that_sets_an_option_keeps_its_own(fake_roots: dict[str, Path]) -> None:
    """A config written before the options were given once forwards them in its split nodes;
    a node's own value wins over the dataset's (here the test split stays uncached)."""
    given = [
        "dataset=cub",
        f"dataset.root={fake_roots['cub']}",
        "dataset.cache=ram",
        "+dataset.test.cache=none",
    ]
    dataset = compose(given).dataset
    assert base_dataset(build_split(dataset, "train")).cache is not None
    assert base_dataset(build_split(dataset, "test")).cache is None


def test_a_reader_gets_only_the_options_it_takes(fake_roots: dict[str, Path]) -> None:
    """SOP's reader has no cache: a `cache` key added to its config is not handed to it."""
    given = ["dataset=sop", f"dataset.root={fake_roots['sop']}", "+dataset.cache=ram"]
    dataset = compose(given).dataset
    assert "cache" not in wrapper_chain(split_node(dataset, "train"))[-1]
    assert len(build_split(dataset, "test")) > 0


@pytest.mark.parametrize(
    ("key", "option"),
    [
        ("dataset.test.root", "dataset.root"),
        ("dataset.query.on_bad_image", "dataset.on_bad_image"),
        ("dataset.train.dataset.cache_dir", "dataset.cache_dir"),
        ("dataset.train.dataset.dataset.cache", "dataset.cache"),
        ("dataset.root", None),
        ("dataset.test.crop", None),
        ("dataset.train.fraction", None),
        ("dataset.transform.train.root", None),
        ("model.test.root", None),
    ],
)
def test_loading_option_names_the_key_a_split_reads(key: str, option: str | None) -> None:
    assert loading_option(key) == option


@pytest.mark.parametrize("old_layout", [False, True])
def test_embedding_a_run_split_moves_the_root_and_the_policy(
    old_layout: bool, fake_roots: dict[str, Path]
) -> None:
    """``softmine-embed RUN --dataset-split test --dataset-root X``: the run's recorded root is
    gone; the split reads X, with the policy given, in either layout of the run's config."""
    from omegaconf import OmegaConf

    from softmine.inference.extract import run_split

    config = compose(["dataset=cub", "dataset.root=/moved/away", "dataset.cache=ram"])
    if old_layout:  # the split node forwards the options itself, as recorded before
        OmegaConf.set_struct(config, False)
        for key in ("root", "on_bad_image", "cache"):
            config.dataset.test[key] = "${.." + key + "}"
    loaded = SimpleNamespace(config=config)
    built = run_split(loaded, "test", root=str(fake_roots["cub"]), on_bad_image="skip")
    assert Path(built.root) == fake_roots["cub"]
    assert built.on_bad_image == "skip" and built.cache is not None
