"""Unreadable images: all found before training, left out of evaluation (never a stand-in),
named in one line, and no leftovers of a killed cache build.

The checks run over every dataset config that reads image files, on the fakes of
:mod:`softmine.testing.fakes`, in-process on the built datasets (no training) except for
two short runs that check what a user sees: the exit code, ``metrics.json``,
``report.html`` and ``bad_images.txt``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from softmine.config import build
from softmine.data import CUB200, file_check
from softmine.data import cache as cache_module
from softmine.data.decode import BadImageError, image_header, read_image
from softmine.data.file_check import item_files
from softmine.data.splits import build_train_and_validation
from softmine.engine.evaluator import Evaluator, eval_protocol
from softmine.evaluation import query_gallery_metrics, retrieval_metrics
from softmine.testing.fakes import BUILDERS, make_cub
from tests.conftest import FAST_CUB, compose, run_cli

REPO = Path(__file__).resolve().parents[2]

#: Every dataset config that reads image files -> how its fake is passed to it.
IMAGE_CONFIGS = {
    "cub": "dataset.root",
    "cars196": "dataset.root",
    "sop": "dataset.root",
    "inshop": "dataset.root",
    "imagefolder": "dataset.root",
    "csv": "dataset.file",
    "mars": "dataset.root",
    "ilidsvid": "dataset.root",
    "prid2011": "dataset.root",
    "lpw": "dataset.root",
}


@pytest.fixture(scope="module")
def fakes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One untouched fake of every set; a test breaks files in its own copy."""
    base = tmp_path_factory.mktemp("fakes")
    for name in IMAGE_CONFIGS:
        BUILDERS[name](base / name)
    return base


def _copy(fakes: Path, name: str, tmp_path: Path) -> str:
    """A copy of the fake ``name``; returns what its config key takes (the folder, or the CSV)."""
    root = shutil.copytree(fakes / name, tmp_path / name)
    return str(root / "dataset.csv") if name == "csv" else str(root)


def _sets(name: str, where: str, policy: str, *extra: str):
    """(config, training set, evaluator) of dataset config ``name`` on the fake at ``where``."""
    cfg = compose(
        [f"dataset={name}", f"{IMAGE_CONFIGS[name]}={where}", f"data.on_bad_image={policy}", *extra]
    )
    train, validation = build_train_and_validation(
        cfg.dataset, reid=eval_protocol(cfg.dataset) == "reid"
    )
    return cfg, train, Evaluator(cfg, torch.device("cpu"), validation=validation)


def _cub_files(root: Path, split: str) -> list[Path]:
    """The image files of a fake CUB's split: classes 1..C/2 train, the others test."""
    classes = sorted(p for p in (root / "images").iterdir())
    half = classes[: len(classes) // 2] if split == "train" else classes[len(classes) // 2 :]
    return [f for c in half for f in sorted(c.iterdir())]


def _break(paths: list[str]) -> None:
    for p in paths:
        Path(p).write_bytes(b"")


def _eval_split(evaluator: Evaluator) -> str:
    return "test" if evaluator.protocol == "retrieval" else "query"


@pytest.mark.parametrize("name", list(IMAGE_CONFIGS))
def test_every_unreadable_file_of_every_split_is_named_before_training(
    fakes: Path, tmp_path: Path, name: str
) -> None:
    where = _copy(fakes, name, tmp_path)
    _, train, evaluator = _sets(name, where, "error")
    split = _eval_split(evaluator)
    train_file = item_files(train)[0][0]
    eval_file = item_files(evaluator._split(split))[-1][-1]
    _break([train_file, eval_file])
    listing = tmp_path / "bad_images.txt"
    with pytest.raises(BadImageError) as e:
        evaluator.check_files(train, listing)
    msg = str(e.value)
    assert "\n" not in msg and "2 image files cannot be read" in msg, msg
    assert f"{train_file} (empty file (0 bytes))" in msg and eval_file in msg
    assert f"train 1, {split} 1" in msg and "found before training" in msg
    assert "data.on_bad_image=skip" in msg


@pytest.mark.parametrize("name", list(IMAGE_CONFIGS))
def test_skip_lists_them_and_leaves_their_items_out_of_every_evaluation_split(
    fakes: Path, tmp_path: Path, name: str
) -> None:
    where = _copy(fakes, name, tmp_path)
    _, train, evaluator = _sets(name, where, "skip")
    split = _eval_split(evaluator)
    before = {n: item_files(evaluator._split(n)) for n in evaluator._slots()}
    gone = before[split][0]  # every file of the first item (a tracklet: all its frames)
    train_file = item_files(train)[0][0]
    _break([*gone, train_file])
    listing = tmp_path / "bad_images.txt"
    evaluator.check_files(train, listing)
    lines = listing.read_text().splitlines()
    assert sorted(lines) == sorted(f"{p}\tempty file (0 bytes)" for p in {*gone, train_file})
    for n, files in before.items():
        # the item leaves every split that holds it (MARS: query and gallery alike)
        expected = sum(item == gone for item in files)
        after = item_files(evaluator._split(n))
        assert len(after) == len(files) - expected and gone not in after, n
        assert evaluator.dropped[n] == expected, n
    assert evaluator.dropped[split] == 1
    assert evaluator.dropped_counts()[f"dropped_items/{split}"] == 1
    assert train_file in file_check.known_bad(train)  # training skips it without retrying


def test_a_missing_test_image_is_counted_and_listed_too(fakes: Path, tmp_path: Path) -> None:
    where = _copy(fakes, "cub", tmp_path)
    gone = _cub_files(Path(where), "test")[0]
    gone.unlink()
    _, train, evaluator = _sets("cub", where, "skip")  # dropped when the split is built
    evaluator.check_files(train, tmp_path / "bad_images.txt")
    assert evaluator.dropped_counts() == {"dropped_items/test": 1}
    assert (tmp_path / "bad_images.txt").read_text() == f"{gone}\tdoes not exist\n"


def test_a_bad_frame_keeps_its_tracklet_in_the_evaluation(fakes: Path, tmp_path: Path) -> None:
    where = _copy(fakes, "mars", tmp_path)
    _, train, evaluator = _sets("mars", where, "skip")
    frames = item_files(evaluator.query_set)[0]
    assert len(frames) > 1
    _break([frames[0]])  # the nearest readable frame of the same tracklet stands in
    n = len(evaluator.query_set)
    evaluator.check_files(train, tmp_path / "bad_images.txt")
    assert len(evaluator.query_set) == n and evaluator.dropped["query"] == 0


def test_the_validation_reading_is_checked_too(fakes: Path, tmp_path: Path) -> None:
    where = _copy(fakes, "cub", tmp_path)
    _, train, evaluator = _sets("cub", where, "skip", "dataset.val_classes=1")
    held = item_files(evaluator.validation.test)
    _break([held[0][0]])
    evaluator.check_files(train, tmp_path / "bad_images.txt")
    assert len(evaluator.validation.test) == len(held) - 1
    assert evaluator.dropped_counts() == {"dropped_items/test": 0, "dropped_items/val": 1}


def test_check_files_can_be_switched_off(fakes: Path, tmp_path: Path) -> None:
    where = _copy(fakes, "cub", tmp_path)
    _, train, evaluator = _sets("cub", where, "error", "data.check_files=false")
    _break([item_files(train)[0][0]])
    evaluator.check_files(train, tmp_path / "bad_images.txt")  # not read: no error here
    assert not (tmp_path / "bad_images.txt").exists()


@pytest.mark.parametrize("name", ["cub", "mars"])
def test_files_of_a_built_cache_are_not_read_again(
    fakes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    where = _copy(fakes, name, tmp_path)
    _, train, _ = _sets(name, where, "skip")
    bad = item_files(train)[1][-1]  # a training image, or the last frame of a tracklet
    _break([bad])
    _, train, evaluator = _sets(name, where, "skip", "dataset.cache=ram")
    calls: list[str] = []
    monkeypatch.setattr(file_check, "image_header", lambda p: calls.append(p))
    evaluator.check_files(train, tmp_path / "bad_images.txt")
    assert calls == []  # the cache's build read every file already
    assert (tmp_path / "bad_images.txt").read_text() == f"{bad}\t{file_check.CACHED}\n"


# ------------------------------------------------------- evaluation scores the readable items


class TinyNet(nn.Module):
    """A fixed random embedding of any RGB image: average-pooled to 4 x 4, then linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(48, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(x).flatten(1))


def _truncated_png(path: Path) -> None:
    """A PNG whose header reads but whose pixel data is cut off (a download that stopped)."""
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 77, np.uint8)).save(buf, "PNG")
    data = buf.getvalue()
    path.write_bytes(data[: data.index(b"IDAT") + 10])


def _by_hand(cfg, model: nn.Module, paths: list[str]) -> np.ndarray:
    """The model on each file, decoded and put through the test transform one at a time."""
    transform = build(cfg.dataset.transform.test, "transform")
    with torch.no_grad():
        x = torch.stack([transform(read_image(p)) for p in paths]).float() / 255
        return model.eval()(x).numpy()


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_test_images_are_dropped_not_replaced_by_their_class(
    tmp_path: Path, workers: int
) -> None:
    root = make_cub(tmp_path / "CUB_200_2011", num_classes=6, images_per_class=4)
    cfg, train, evaluator = _sets("cub", str(root), "skip")
    test_files = [f[0] for f in item_files(evaluator.test_set)]
    labels = np.asarray(evaluator.test_set.labels)
    empty, cut = test_files[0], test_files[5]
    _break([empty])  # found by the header check, before training
    _truncated_png(Path(cut))  # the header reads: found only when decoded
    listing = tmp_path / "bad_images.txt"
    evaluator.check_files(train, listing)
    evaluator.num_workers = workers
    model = TinyNet()
    metrics = evaluator.evaluate(model)
    keep = [i for i, p in enumerate(test_files) if p not in (empty, cut)]
    want = retrieval_metrics(
        _by_hand(cfg, model, [test_files[i] for i in keep]), labels[keep], cfg.evaluation.ks
    )
    assert metrics == pytest.approx(want, abs=1e-6)
    assert len(evaluator.embeddings[1]) == len(test_files) - 2
    assert evaluator.dropped_counts() == {"dropped_items/test": 2}
    listed = dict(line.split("\t") for line in listing.read_text().splitlines())
    assert listed == {empty: "empty file (0 bytes)", cut: "image file is truncated"}
    again = evaluator.evaluate(model)  # later evaluations leave it out too, counted once
    assert again == pytest.approx(want, abs=1e-6) and evaluator.dropped["test"] == 2


def test_query_and_gallery_items_are_dropped_alike(fakes: Path, tmp_path: Path) -> None:
    where = _copy(fakes, "inshop", tmp_path)
    cfg, train, evaluator = _sets("inshop", where, "skip")
    query = [f[0] for f in item_files(evaluator.query_set)]
    gallery = [f[0] for f in item_files(evaluator.gallery_set)]
    q_ids, g_ids = np.asarray(evaluator.query_set.pids), np.asarray(evaluator.gallery_set.pids)
    _break([query[1]])
    _truncated_png(Path(gallery[2]))
    evaluator.check_files(train, tmp_path / "bad_images.txt")
    model = TinyNet()
    metrics = evaluator.evaluate(model)
    qk = [i for i in range(len(query)) if i != 1]
    gk = [i for i in range(len(gallery)) if i != 2]
    want = query_gallery_metrics(
        _by_hand(cfg, model, [query[i] for i in qk]),
        q_ids[qk],
        _by_hand(cfg, model, [gallery[i] for i in gk]),
        g_ids[gk],
        cfg.evaluation.ks,
    )
    assert metrics == pytest.approx(want, abs=1e-6)
    assert evaluator.dropped_counts() == {"dropped_items/query": 1, "dropped_items/gallery": 1}


# ----------------------------------------------------------------------- a run, as a user


@pytest.fixture(scope="module")
def skipped_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(run folder, dataset root, the broken test image) of a short CUB run under skip."""
    from softmine.commands.train import fit_and_report
    from softmine.engine import Trainer

    base = tmp_path_factory.mktemp("skipped")
    root = make_cub(base / "CUB_200_2011", num_classes=8, images_per_class=6)
    bad = _cub_files(root, "test")[3]
    _truncated_png(bad)
    run_dir = base / "run"
    cfg = compose(
        [
            *FAST_CUB,
            f"dataset.root={root}",
            "data.on_bad_image=skip",
            "trainer.epochs=1",
            "dataset.transform.resize=16",
            "dataset.transform.crop_size=16",
        ]
    )
    fit_and_report(Trainer(cfg, run_dir))  # with report.html
    return run_dir, root, bad


def test_a_run_counts_and_lists_what_it_left_out(skipped_run: tuple[Path, Path, Path]) -> None:
    run_dir, _, bad = skipped_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["dropped_items/test"] == 1
    assert (run_dir / "bad_images.txt").read_text() == f"{bad}\timage file is truncated\n"
    html = (run_dir / "report.html").read_text()
    assert 'data-key="dropped_items/test"' in html and "bad_images.txt" in html


def test_embed_split_never_stores_another_images_embedding(
    skipped_run: tuple[Path, Path, Path],
) -> None:
    from softmine.inference import embed_split, load_model

    run_dir, _, bad = skipped_run
    loaded = load_model(run_dir, "cpu")
    result = embed_split(loaded, "test", progress=False, num_workers=0)  # the run's skip
    assert str(bad) not in result.embeddings.paths
    assert result.bad == [(str(bad), "image file is truncated")]
    assert len(result.embeddings) == 23 and len(result.embeddings.labels) == 23
    with pytest.raises(BadImageError, match="image file is truncated"):
        embed_split(loaded, "test", progress=False, num_workers=0, on_bad_image="error")


@pytest.mark.slow
def test_a_bad_test_image_stops_the_run_before_training(tmp_path: Path) -> None:
    root = make_cub(tmp_path / "CUB_200_2011", num_classes=8, images_per_class=6)
    train, test = _cub_files(root, "train"), _cub_files(root, "test")
    train_bad, test_bad = train[1], test[2]
    train_bad.write_bytes(b"")
    test_bad.write_bytes(b"not an image")
    _truncated_png(test[3])  # its header reads: not found before training
    run_dir = tmp_path / "run"
    res = run_cli(
        ["softmine.commands.train", *FAST_CUB, f"dataset.root={root}", f"hydra.run.dir={run_dir}"],
        tmp_path,
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    (error,) = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert "2 image files cannot be read (train 1, test 1)" in error
    assert f"{train_bad} (empty file (0 bytes))" in error
    assert f"{test_bad} (not an image file Pillow can identify" in error
    assert str(test[3]) not in error and "found before training" in error
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "train_log.csv").exists()


# ----------------------------------------------------------- one-line reasons, never a traceback


def _png_bomb(path: Path, side: int = 20000) -> Path:
    """A PNG whose header claims side x side pixels, with a few rows of zeros as its data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit grayscale
    rows = zlib.compress(b"\x00" * (side + 1) * 4)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )
    return path


def test_a_decompression_bomb_is_a_bad_image_with_a_reason(tmp_path: Path) -> None:
    bomb = _png_bomb(tmp_path / "bomb.png")
    for read in (read_image, image_header):
        with pytest.raises(BadImageError, match="decompression bomb") as e:
            read(str(bomb))
        assert str(bomb) in str(e.value) and "\n" not in str(e.value)
    root = make_cub(tmp_path / "CUB_200_2011")
    target = sorted((root / "images").rglob("*.jpg"))[1]  # train
    _png_bomb(target)
    ds = CUB200(root, "train", on_bad_image="skip", transform=lambda im: tuple(im.shape))
    assert ds[0][1] == 0 and ds[1][1] == 0 and str(target) in ds.bad_images  # skipped, no crash
    with pytest.raises(BadImageError, match="decompression bomb"):
        CUB200(root, "train", cache="ram", cache_size=8)


def test_pillows_bomb_warning_range_is_a_bad_image_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)  # 256 pixels: Pillow only warns
    with pytest.warns(Image.DecompressionBombWarning):
        with pytest.raises(BadImageError, match="decompression bomb: 16x16 = 256 pixels"):
            read_image(str(path))


def test_decode_errors_give_the_reason_not_a_python_object(tmp_path: Path) -> None:
    empty, garbage = tmp_path / "empty.png", tmp_path / "garbage.png"
    empty.write_bytes(b"")
    garbage.write_bytes(b"just some text")
    for path, reason in ((empty, "empty file (0 bytes)"), (garbage, "not an image file")):
        for read in (read_image, image_header):
            with pytest.raises(BadImageError) as e:
                read(str(path))
            assert (
                reason in str(e.value)
                and "BytesIO" not in str(e.value)
                and " at 0x" not in str(e.value)
            )


def test_a_symlink_loop_is_named_as_one(tmp_path: Path) -> None:
    loop = tmp_path / "loop.jpg"
    loop.symlink_to(loop)
    for read in (read_image, image_header):
        with pytest.raises(BadImageError, match="symlink loop"):
            read(str(loop))
    root = make_cub(tmp_path / "CUB_200_2011")
    linked = sorted((root / "images").rglob("*.jpg"))[1]
    linked.unlink()
    linked.symlink_to(linked)
    with pytest.raises(BadImageError, match="symlink loop") as e:
        CUB200(root, "train")
    assert str(linked) in str(e.value) and "incomplete" not in str(e.value)
    assert CUB200(root, "train", on_bad_image="skip").bad_images == {str(linked)}


# ------------------------------------------------------------------------- the image cache


def test_cache_build_stops_before_decoding_anything_naming_every_bad_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_cub(tmp_path / "CUB_200_2011", num_classes=4, images_per_class=6)
    train = _cub_files(root, "train")
    train[1].write_bytes(b"")
    train[4].write_bytes(b"not an image")
    decoded: list[str] = []
    real = cache_module._decode

    def spy(path: str, box, size):  # noqa: ANN001, ANN202
        decoded.append(path)
        return real(path, box, size)

    monkeypatch.setattr(cache_module, "_decode", spy)
    for mode in ("ram", "disk"):
        with pytest.raises(BadImageError) as e:
            CUB200(root, "train", cache=mode, cache_size=8)
        assert "2 image files cannot be decoded" in str(e.value)
        assert str(train[1]) in str(e.value) and str(train[4]) in str(e.value)
        assert decoded == []  # the docs: nothing is decoded or written before the error
        assert not [p for p in (root / "cache").glob("*") if not p.name.endswith(".lock")]


def _cache_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*") if ".tmp" in p.name)


@pytest.mark.slow
def test_a_killed_cache_build_leaves_no_temporary_file_behind(tmp_path: Path) -> None:
    root = make_cub(tmp_path / "CUB_200_2011", num_classes=4, images_per_class=4)
    script = (
        "import time, sys\n"
        "from softmine.data import cache, CUB200\n"
        "real = cache._decode\n"
        "def slow(*a):\n"
        "    time.sleep(0.2)\n"
        "    return real(*a)\n"
        "cache._decode = slow\n"
        f"CUB200({str(root)!r}, 'train', cache='disk', cache_size=8)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    folder = root / "cache"
    deadline = time.monotonic() + 60
    while not _cache_leftovers(folder) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert _cache_leftovers(folder), "the build never wrote its temporary file"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    left = _cache_leftovers(folder)
    assert left and all(f.endswith(".tmp") for f in left)  # what a killed build leaks
    (folder / (left[0] + ".npz")).write_bytes(b"a half-written index")  # the other kind
    ds = CUB200(root, "train", cache="disk", cache_size=8)  # the next build
    assert len(ds) == 8 and _cache_leftovers(folder) == []
    (folder / "cub200-train-8-0123456789abcdef.index.npz.4242.tmp").write_bytes(b"x")
    CUB200(root, "train", cache="disk", cache_size=8)  # reused: still cleaned up
    assert _cache_leftovers(folder) == []
