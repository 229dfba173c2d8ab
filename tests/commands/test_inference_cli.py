"""softmine-embed, softmine-index and softmine-export on real run folders, and their bad-input errors.

Digits (tiny CNN, PNG files written by a helper) for the everyday checks; the
paper's ``experiment=authors_cub`` on fake CUB images for the issue's full chain:
embed -> index (flat, hnsw) -> search by image -> eval -> ONNX export.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from softmine import __version__
from softmine.commands.embed import main as embed_main
from softmine.commands.evaluate import main as eval_main
from softmine.commands.export import main as export_main
from softmine.commands.index import main as index_main
from softmine.commands.report import main as report_main
from softmine.data.datasets.digits import write_pngs
from softmine.testing.fakes import make_cub
from tests.conftest import FAST_DIGITS, compose, run_cli

RETRIEVAL = ("recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from softmine.engine import Trainer

    run_dir = tmp_path_factory.mktemp("run")
    Trainer(compose(["trainer.max_iters=20", "trainer.device=cpu", *FAST_DIGITS]), run_dir).fit()
    return run_dir


@pytest.fixture(scope="module")
def pngs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("png")
    write_pngs(folder, "test")
    return folder


def _ok(main, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:  # noqa: ANN001
    main(argv)
    return capsys.readouterr().out


def _fails(main, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:  # noqa: ANN001
    """Run a command expected to refuse its input; returns its single stderr line."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def _first_png(pngs: Path, label: int) -> Path:
    return sorted((pngs / str(label)).iterdir())[0]


@pytest.mark.slow
def test_embed_index_search_export_on_digits(
    run: Path, pngs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    emb = tmp_path / "emb.parquet"
    out = _ok(
        embed_main, [str(run), "--images", str(pngs), "-o", str(emb), "--no-progress"], capsys
    )
    assert re.search(r"wrote 896 embeddings \(64-d, with labels\)", out)
    metrics = json.loads(_ok(eval_main, [str(emb)], capsys))  # the file feeds softmine-eval
    assert set(RETRIEVAL) <= set(metrics)
    for kind in ("flat", "hnsw"):
        out = _ok(
            index_main, ["build", str(emb), "-o", str(tmp_path / kind), "--type", kind], capsys
        )
        assert ("recall@10 against exact search" in out) == (kind == "hnsw")
        query = _first_png(pngs, 7)
        hits = json.loads(
            _ok(
                index_main,
                ["search", str(tmp_path / kind), "--image", str(query), "--json"],
                capsys,
            )
        )
        assert len(hits) == 1 and len(hits[0]) == 10
        assert hits[0][0]["path"] == str(query) and hits[0][0]["score"] >= 0.999
        assert hits[0][0]["rank"] == 1 and hits[0][0]["label"] == 7
        assert [h["rank"] for h in hits[0]] == list(range(1, 11))
        assert all(a["score"] >= b["score"] for a, b in zip(hits[0], hits[0][1:], strict=False))
    text = _ok(
        index_main, ["search", str(tmp_path / "flat"), "--image", str(query), "-k", "3"], capsys
    )
    lines = text.splitlines()
    assert lines[0] == f"query {query}" and len(lines) == 5 and str(query) in lines[2]
    # each embedded image, as a query, finds itself first
    hits = json.loads(
        _ok(
            index_main,
            ["search", str(tmp_path / "flat"), "--embeddings", str(emb), "-k", "1", "--json"],
            capsys,
        )
    )
    assert len(hits) == 896 and sum(h[0]["score"] >= 0.999 for h in hits) == 896
    out = _ok(export_main, [str(run), "--format", "onnx", "-o", str(tmp_path / "m.onnx")], capsys)
    diff = float(re.search(r"max abs difference from PyTorch on random inputs: (\S+)", out)[1])
    assert diff <= 1e-4 and "(N, 1, 8, 8)" in out


def test_embed_dataset_split_equals_the_run_metrics(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    emb = tmp_path / "test.npz"
    _ok(embed_main, [str(run), "--dataset-split", "test", "-o", str(emb)], capsys)
    got = json.loads(_ok(eval_main, [str(emb)], capsys))
    want = json.loads((run / "metrics.json").read_text())
    for k in RETRIEVAL:
        assert got[k] == pytest.approx(want[k], abs=1e-6), k


def test_skipped_images_are_listed(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "imgs"
    write_pngs(folder / "digits", "test")
    (folder / "digits" / "0" / "broken.png").write_bytes(b"\x89PNG but cut")
    emb = tmp_path / "e.npz"
    embed_main(
        [str(run), "--images", str(folder / "digits"), "-o", str(emb), "--on-bad-image", "skip"]
    )
    out, err = capsys.readouterr()
    assert "wrote 896 embeddings" in out
    assert err.startswith("warning: 1 unreadable image(s) skipped") and "broken.png" in err
    listing = (tmp_path / "e.bad_images.txt").read_text().splitlines()
    assert len(listing) == 1 and listing[0].startswith(str(folder / "digits" / "0" / "broken.png"))


@pytest.mark.slow
def test_bad_input_is_one_line_and_exit_2(
    run: Path, pngs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "e.npz")
    # missing model
    err = _fails(embed_main, [str(tmp_path / "nope"), "--images", str(pngs), "-o", out], capsys)
    assert "does not exist" in err
    assert "does not exist" in _fails(
        export_main, [str(tmp_path / "nope"), "--format", "onnx", "-o", "m.onnx"], capsys
    )
    # empty folder
    (tmp_path / "empty").mkdir()
    assert "no image files" in _fails(
        embed_main, [str(run), "--images", str(tmp_path / "empty"), "-o", out], capsys
    )
    # unreadable image
    bad = tmp_path / "bad"
    write_pngs(bad, "test")
    (bad / "3" / "zz.png").write_text("text, not an image")
    err = _fails(embed_main, [str(run), "--images", str(bad), "-o", out], capsys)
    assert "zz.png" in err and "--on-bad-image skip" in err
    # index / model mismatch: the same network with other weights
    _ok(embed_main, [str(run), "--images", str(pngs), "-o", out], capsys)
    _ok(index_main, ["build", out, "-o", str(tmp_path / "idx")], capsys)
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    state["model"]["head.weight"] += 0.01
    torch.save(state, tmp_path / "other.pt")
    query = str(_first_png(pngs, 1))
    err = _fails(
        index_main,
        ["search", str(tmp_path / "idx"), "--image", query, "--model", str(tmp_path / "other.pt")],
        capsys,
    )
    assert "index/model mismatch" in err
    # ... and an unreadable query image, a folder that is not an index, a wrong suffix, usage
    assert "cannot decode" in _fails(
        index_main, ["search", str(tmp_path / "idx"), "--image", str(bad / "3" / "zz.png")], capsys
    )
    assert "not an index folder" in _fails(
        index_main, ["search", str(tmp_path), "--image", query], capsys
    )
    assert ".npz or .parquet" in _fails(
        embed_main, [str(run), "--images", str(pngs), "-o", "e.csv"], capsys
    )
    assert "required" in _fails(embed_main, [str(run), "--images", str(pngs)], capsys)
    assert "does not exist" in _fails(
        index_main, ["build", str(tmp_path / "none.npz"), "-o", "x"], capsys
    )


def test_embed_takes_folders_files_and_patterns(
    run: Path, pngs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from softmine.inference import load_embeddings

    one = _first_png(pngs, 1)
    n_folder, n_pattern = len(list((pngs / "3").iterdir())), len(list((pngs / "7").glob("*.png")))
    emb = tmp_path / "mixed.npz"
    sources = [str(pngs / "3"), str(pngs / "7" / "*.png"), str(one)]
    out = _ok(embed_main, [str(run), "--images", *sources, "-o", str(emb)], capsys)
    n = n_folder + n_pattern + 1
    assert re.search(rf"wrote {n} embeddings \(64-d, without labels\)", out)
    mixed = load_embeddings(emb)
    assert mixed.paths[-1] == str(one) and len(set(mixed.paths)) == n
    _ok(embed_main, [str(run), "--images", str(pngs), "-o", str(tmp_path / "all.npz")], capsys)
    full = load_embeddings(tmp_path / "all.npz")
    row = {p: i for i, p in enumerate(full.paths)}
    want = full.vectors[[row[p] for p in mixed.paths]]
    np.testing.assert_allclose(mixed.vectors, want, atol=1e-5)  # the same images, the same vectors
    err = _fails(embed_main, [str(run), "--images", str(pngs / "*.jpg"), "-o", str(emb)], capsys)
    assert "the pattern matches no image file" in err


def test_commands_print_their_version(capsys: pytest.CaptureFixture[str]) -> None:
    for main, name in (
        (embed_main, "softmine-embed"),
        (index_main, "softmine-index"),
        (export_main, "softmine-export"),
        (eval_main, "softmine-eval"),
        (report_main, "softmine-report"),
    ):
        with pytest.raises(SystemExit) as e:
            main(["--version"])
        assert e.value.code == 0 and capsys.readouterr().out.strip() == f"{name} {__version__}"


def test_as_a_process_errors_have_no_traceback(tmp_path: Path) -> None:
    res = run_cli(
        ["softmine.commands.embed", str(tmp_path / "nope"), "--images", ".", "-o", "e.npz"],
        tmp_path,
    )
    assert res.returncode == 2 and res.stderr.startswith("error: model ")
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    res = run_cli(["softmine.commands.train", "--version"], tmp_path)
    assert res.returncode == 0 and res.stdout.strip() == f"softmine-train {__version__}"


# The authors' transform: whole image to 96 x 96; 4 classes x 3 images a batch (not their 8 x 7)
IMAGE = ["dataset.transform.size=96", "sampler.classes_per_batch=4", "sampler.samples_per_class=3"]
#: What softmine-train imports beyond this module's imports (torchvision's models alone bring
#: in torch._dynamo, about 2 s): imported here, the training command forked by run_cli starts
#: without importing them again.
TRAIN_IMPORTS = (
    "torchvision.models",
    "hydra._internal.hydra",
    "hydra._internal.utils",
    "softmine.commands.train",
    "softmine.engine.trainer",
    "softmine.reporting.artifacts",
    "softmine.runs.sweep",
)


def _noise_images(folder: Path) -> None:
    """Give every fake image its own seeded noise: make_cub's gradients differ only in blue, so
    an untrained network gives near-ties between classes that a self-query must not meet."""
    rng = np.random.default_rng(0)
    for path in sorted(folder.rglob("*.jpg")):
        with Image.open(path) as im:
            w, h = im.size
        Image.fromarray(rng.integers(0, 256, (4 * h, 4 * w, 3), dtype=np.uint8)).save(path)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.load: TorchScript is deprecated
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the input check, a constant
def test_authors_cub_run_embed_index_search_eval_export(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's chain on ``experiment=authors_cub`` trained 2 iterations on fake CUB images
    (8 classes of 4: classes 1-4 train, 5-8 test)."""
    import onnx

    for name in TRAIN_IMPORTS:
        importlib.import_module(name)
    root = make_cub(tmp_path / "CUB_200_2011", num_classes=8, images_per_class=4)
    _noise_images(root / "images")
    run_dir = tmp_path / "run"
    res = run_cli(
        [
            "softmine.commands.train",
            "experiment=authors_cub",
            f"dataset.root={root}",
            f"hydra.run.dir={run_dir}",
            "trainer.max_iters=2",
            "backbone.pretrained=false",
            "trainer.device=cpu",
            "trainer.num_workers=0",
            "trainer.progress_bar=false",
            "trainer.plots=false",
            # running BN statistics = the last batch's: 2 iterations at the authors' momentum
            # (0.001) leave them at their initial values, under which an untrained network maps
            # every image to nearly the same embedding
            "backbone.bn_momentum=1.0",
            *IMAGE,
        ],
        tmp_path,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    emb = tmp_path / "all.parquet"
    out = _ok(embed_main, [str(run_dir), "--images", str(root / "images"), "-o", str(emb)], capsys)
    assert "wrote 32 embeddings" in out
    query = sorted((root / "images").rglob("*.jpg"))[10]
    for kind in ("flat", "hnsw"):
        _ok(index_main, ["build", str(emb), "-o", str(tmp_path / kind), "--type", kind], capsys)
        argv = ["search", str(tmp_path / kind), "--image", str(query), "--json", "-k", "32"]
        (hits,) = json.loads(_ok(index_main, argv, capsys))
        assert hits[0]["path"] == str(query) and hits[0]["score"] >= 0.999, hits[:3]
        assert hits[1]["score"] < hits[0]["score"] - 1e-4  # a real margin, not a rounding tie
        assert hits[0]["label"] == query.parent.name and len(hits) == 32
    # softmine-eval on the run's test images equals the run's own metrics: through the
    # dataset split, and through the image files listed with their labels
    want = json.loads((run_dir / "metrics.json").read_text())
    _ok(
        embed_main, [str(run_dir), "--dataset-split", "test", "-o", str(tmp_path / "t.npz")], capsys
    )
    split = json.loads(_ok(eval_main, [str(tmp_path / "t.npz")], capsys))
    test_classes = {f"{c:03d}.Fake_Bird_{c}" for c in range(5, 9)}
    listed = [p for p in sorted((root / "images").rglob("*.jpg")) if p.parent.name in test_classes]
    (tmp_path / "test.txt").write_text("".join(f"{p}\t{p.parent.name}\n" for p in listed))
    _ok(
        embed_main,
        [str(run_dir), "--list", str(tmp_path / "test.txt"), "-o", str(tmp_path / "l.npz")],
        capsys,
    )
    files = json.loads(_ok(eval_main, [str(tmp_path / "l.npz")], capsys))
    for k in RETRIEVAL:
        assert split[k] == pytest.approx(want[k], abs=1e-6), k
        assert files[k] == pytest.approx(want[k], abs=1e-6), k
    out = _ok(
        export_main, [str(run_dir), "--format", "onnx", "-o", str(tmp_path / "m.onnx")], capsys
    )
    diff = float(re.search(r"max abs difference from PyTorch on random inputs: (\S+)", out)[1])
    assert diff <= 1e-4 and "(N, 3, 96, 96)" in out
    # the ONNX file of a BN-Inception states its preprocessing as the TorchScript file does:
    # the authors' whole-image resize, then in the network Caffe's BGR 0..255 minus their mean
    # pixel (tests/inference/test_inference.py: the statement of the DML transform)
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    spec = json.loads(props["preprocessing"])
    _ok(
        export_main, [str(run_dir), "--format", "torchscript", "-o", str(tmp_path / "m.pt")], capsys
    )
    extra = {"preprocessing.json": ""}
    torch.jit.load(str(tmp_path / "m.pt"), map_location="cpu", _extra_files=extra)
    assert json.loads(extra["preprocessing.json"]) == spec
    assert spec["image_mode"] == "RGB" and spec["input"]["shape"] == ["N", 3, 96, 96]
    assert spec["steps"] == [
        {
            "op": "resize",
            "size": [96, 96],
            "mode": "exact",
            "interpolation": "bicubic",
            "antialias": True,
            "max_size": None,
        }
    ]
    assert (spec["resize"], spec["resize_mode"], spec["crop"]) == ([96, 96], "exact", None)
    norm = spec["normalization"]
    assert norm["in_model"] and norm["channel_order"] == "BGR"
    assert norm["value_range"] == [0.0, 255.0]
    assert norm["mean"] == pytest.approx([104.0, 117.0, 123.0])
    assert norm["std"] == pytest.approx([1.0, 1.0, 1.0])


def test_index_build_and_search_refuse_nonfinite_embeddings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's probe: a NaN item was indexed (never returned) and a NaN query printed
    zero hits with exit 0; softmine-eval already refused such embeddings."""
    from softmine.inference.embeddings import Embeddings, save_embeddings

    rng = np.random.default_rng(0)
    good = rng.normal(size=(20, 8)).astype(np.float32)
    paths = [f"{i}.png" for i in range(20)]
    bad = good.copy()
    bad[5, 2] = np.nan
    save_embeddings(Embeddings(good, paths), tmp_path / "good.npz")
    save_embeddings(Embeddings(bad, paths), tmp_path / "bad.npz")
    err = _fails(
        index_main, ["build", str(tmp_path / "bad.npz"), "-o", str(tmp_path / "i")], capsys
    )
    assert "bad.npz hold NaN or Inf in 1 of 20 rows (the first: 5.png)" in err
    assert not (tmp_path / "i").exists()
    _ok(index_main, ["build", str(tmp_path / "good.npz"), "-o", str(tmp_path / "i")], capsys)
    argv = ["search", str(tmp_path / "i"), "--embeddings", str(tmp_path / "bad.npz")]
    assert "query embeddings in" in _fails(index_main, argv, capsys)
