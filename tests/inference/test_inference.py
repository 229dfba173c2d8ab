"""softmine.inference: model loading, embedding, saved embeddings, faiss index and export.

Checked against numbers computed another way: the model applied by hand to the
tensors a file must decode to, brute-force cosine ranking in NumPy, the run's own
metrics, and onnxruntime / TorchScript against PyTorch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from softmine.data.datasets.digits import Digits, write_pngs
from softmine.errors import ConfigError, DataError
from softmine.evaluation import retrieval_metrics
from softmine.inference import (
    EmbeddingIndex,
    Embeddings,
    collect_images,
    embed_images,
    embed_split,
    export_model,
    list_images,
    load_embeddings,
    load_model,
    read_image_list,
    save_embeddings,
)
from softmine.inference.image_files import encode_labels
from tests.conftest import FAST_DIGITS, compose


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits run folder trained for 20 iterations."""
    from softmine.engine import Trainer

    run_dir = tmp_path_factory.mktemp("run")
    cfg = compose(["trainer.max_iters=20", "trainer.device=cpu", *FAST_DIGITS])
    Trainer(cfg, run_dir).fit()
    return run_dir


@pytest.fixture(scope="module")
def pngs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("png")
    write_pngs(folder, "test")
    return folder


def _digits_by_hand(loaded, paths: list[str]) -> torch.Tensor:
    """The model on the test digits a PNG path names, quantised to 8 bits as the PNG stores them."""
    images = Digits(split="test").images
    index = [int(Path(p).stem.split("_")[1]) for p in paths]
    x = torch.round(images[index] * 255) / 255
    with torch.no_grad():
        return loaded.model(x)


def test_load_model_from_run_folder_and_checkpoint(run: Path) -> None:
    a = load_model(run, "cpu")
    b = load_model(run / "checkpoints" / "last.pt", "cpu")
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 16
    assert a.channels == 1 and a.embedding_dim == 64 and a.transform is None
    assert not a.model.training and a.step == 20
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    for k, v in state["model"].items():
        assert torch.equal(a.model.state_dict()[k], v)


def test_missing_model_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="no checkpoint"):
        load_model(tmp_path)


def test_embed_split_reproduces_the_run_metrics(run: Path) -> None:
    loaded = load_model(run, "cpu")
    emb = embed_split(loaded, "test", batch_size=100, progress=False).embeddings
    want = json.loads((run / "metrics.json").read_text())
    got = retrieval_metrics(emb.vectors, emb.labels, [1, 2, 4, 8])
    for k in ("recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision"):
        assert got[k] == pytest.approx(want[k], abs=1e-6), k
    assert np.array_equal(emb.labels, Digits(split="test").targets)


def test_embed_png_folder_equals_the_model_on_the_decoded_pixels(run: Path, pngs: Path) -> None:
    loaded = load_model(run, "cpu")
    images = list_images(pngs)
    assert len(images.paths) == len(Digits(split="test"))
    result = embed_images(loaded, images, batch_size=128, progress=False)
    emb = result.embeddings
    assert result.bad == [] and emb.vectors.dtype == np.float32
    want = _digits_by_hand(loaded, emb.paths)
    assert np.abs(emb.vectors - want.numpy()).max() < 1e-5
    # labels come from the folder names, which are the digits' own labels
    index = [int(Path(p).stem.split("_")[1]) for p in emb.paths]
    assert emb.classes is None
    assert np.array_equal(emb.labels, Digits(split="test").targets[index])
    assert emb.meta["model"]["fingerprint"] == loaded.fingerprint


def test_flip_is_the_normalised_mean_with_the_mirror_image(run: Path, pngs: Path) -> None:
    loaded = load_model(run, "cpu")
    paths = list_images(pngs).paths[:5]
    got = embed_images(loaded, paths, flip=True, progress=False).embeddings.vectors
    images = Digits(split="test").images
    x = torch.round(images[[int(Path(p).stem.split("_")[1]) for p in paths]] * 255) / 255
    with torch.no_grad():
        want = F.normalize(loaded.model(x) + loaded.model(torch.flip(x, dims=[3])), dim=1)
    assert np.abs(got - want.numpy()).max() < 1e-5
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_bf16_embeddings_are_float32_and_close(run: Path, pngs: Path) -> None:
    loaded = load_model(run, "cpu")
    paths = list_images(pngs).paths[:16]
    full = embed_images(loaded, paths, progress=False).embeddings.vectors
    half = embed_images(loaded, paths, precision="bf16", progress=False).embeddings.vectors
    assert half.dtype == np.float32
    cosine = np.sum(full * half, axis=1) / np.linalg.norm(half, axis=1)
    assert cosine.min() > 0.99


def test_unreadable_images_stop_or_are_skipped_and_listed(run: Path, tmp_path: Path) -> None:
    loaded = load_model(run, "cpu")
    folder = tmp_path / "imgs"
    (folder / "a").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8), "L").save(folder / "a" / f"{i}.png")
    (folder / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"broken\.png.*--on-bad-image skip"):
        embed_images(loaded, list_images(folder), progress=False)
    result = embed_images(loaded, list_images(folder), on_bad_image="skip", progress=False)
    assert [Path(p).name for p, _ in result.bad] == ["broken.png"]
    assert [Path(p).name for p in result.embeddings.paths] == ["0.png", "1.png", "2.png"]


def test_images_of_different_sizes_without_a_resize_are_refused(run: Path, tmp_path: Path) -> None:
    loaded = load_model(run, "cpu")
    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    Image.new("L", (9, 8)).save(tmp_path / "b.png")
    with pytest.raises(DataError, match="different sizes"):
        embed_images(loaded, list_images(tmp_path), progress=False)


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(path)


def test_images_from_folders_files_and_patterns_mixed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("a/1.png", "a/2.jpg", "b/3.png", "loose/x.png", "loose/y.jpg", "deep/s/t/z.png"):
        _image(tmp_path / "photos" / name)
    _image(tmp_path / "more" / "c" / "4.png")
    (tmp_path / "photos" / "loose" / "notes.txt").write_text("not an image")
    monkeypatch.chdir(tmp_path)
    flat = collect_images(["photos/a", "photos/b"])
    assert flat.paths == ["photos/a/1.png", "photos/a/2.jpg", "photos/b/3.png"]
    assert flat.names is None  # files directly in each folder: no sub-folder, no label
    labelled = collect_images(["photos", "more"])  # labelled folders only: labels kept
    assert labelled.names == ["a", "a", "b", "deep", "loose", "loose", "c"]
    assert labelled.paths[-1] == "more/c/4.png"
    pattern = collect_images(["photos/loose/*"])  # the pattern skips notes.txt
    assert pattern.paths == ["photos/loose/x.png", "photos/loose/y.jpg"] and pattern.names is None
    deep = collect_images(["photos/**/*.png"])
    assert [Path(p).name for p in deep.paths] == ["1.png", "3.png", "z.png", "x.png"]
    mixed = collect_images(["photos/loose/x.png", "photos/a", "photos/*/y.jpg", "photos/a/1.png"])
    assert mixed.paths == [  # the order given; a file named twice once
        "photos/loose/x.png",
        "photos/a/1.png",
        "photos/a/2.jpg",
        "photos/loose/y.jpg",
    ]
    assert mixed.names is None  # a file among the sources: no labels
    with pytest.raises(DataError, match=r"--images 'photos/\*\.gif': the pattern matches no image"):
        collect_images(["photos/a", "photos/*.gif"])
    with pytest.raises(DataError, match="no such file or folder"):
        collect_images(["photos/missing.png"])


def test_empty_or_missing_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="no image files"):
        list_images(tmp_path)
    with pytest.raises(DataError, match="no such folder"):
        list_images(tmp_path / "missing")


def test_list_files(tmp_path: Path) -> None:
    (tmp_path / "with.txt").write_text("# header\nx/a.png\tcat\n\n/abs/b.png\tdog\n")
    got = read_image_list(tmp_path / "with.txt")
    assert got.paths == [str(tmp_path / "x" / "a.png"), "/abs/b.png"]
    assert got.names == ["cat", "dog"]
    (tmp_path / "plain.txt").write_text("a.png\nb.png\n")
    assert read_image_list(tmp_path / "plain.txt").names is None
    (tmp_path / "mixed.txt").write_text("a.png\tcat\nb.png\n")
    with pytest.raises(DataError, match="line 2"):
        read_image_list(tmp_path / "mixed.txt")
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(DataError, match="no image paths"):
        read_image_list(tmp_path / "empty.txt")


def test_encode_labels() -> None:
    labels, classes = encode_labels(["3", "10", "3"])
    assert labels.tolist() == [3, 10, 3] and classes is None
    labels, classes = encode_labels(["dog", "cat", "dog"])
    assert classes == ["cat", "dog"] and labels.tolist() == [1, 0, 1]
    labels, classes = encode_labels(["1", "01", "2", "1"])  # folders 1/ and 01/: two classes
    assert classes == ["01", "1", "2"] and labels.tolist() == [1, 0, 2, 1]


@pytest.mark.parametrize("suffix", [".npz", ".parquet"])
def test_embeddings_files_round_trip(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(0)
    emb = Embeddings(
        rng.normal(size=(5, 3)).astype(np.float32),
        [f"img {i}.jpg" for i in range(5)],
        np.array([0, 1, 1, 0, 1]),
        ["cat", "dog"],
        {"model": {"fingerprint": "abc"}, "flip": True},
    )
    back = load_embeddings(save_embeddings(emb, tmp_path / f"e{suffix}"))
    assert np.array_equal(back.vectors, emb.vectors) and back.paths == emb.paths
    assert back.labels.tolist() == [0, 1, 1, 0, 1] and back.classes == ["cat", "dog"]
    assert back.meta == emb.meta and back.label_name(1) == "dog"
    unlabelled = Embeddings(emb.vectors, emb.paths)
    assert load_embeddings(save_embeddings(unlabelled, tmp_path / f"u{suffix}")).labels is None


def test_unknown_output_suffix_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=".npz or .parquet"):
        save_embeddings(Embeddings(np.zeros((1, 2)), ["a"]), tmp_path / "e.csv")


def _clusters(n: int = 600, d: int = 16, seed: int = 0) -> Embeddings:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(12, d))
    labels = rng.integers(0, 12, n)
    x = centres[labels] + 0.3 * rng.normal(size=(n, d))
    return Embeddings(x.astype(np.float32), [f"{i}.png" for i in range(n)], labels)


def _brute_force(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    xu = x / np.linalg.norm(x, axis=1, keepdims=True)
    qu = q / np.linalg.norm(q, axis=1, keepdims=True)
    sims = qu.astype(np.float64) @ xu.T.astype(np.float64)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), order


def test_flat_index_is_exact_cosine_search(tmp_path: Path) -> None:
    emb = _clusters()
    queries = np.random.default_rng(1).normal(size=(7, emb.dim)).astype(np.float32)
    index = EmbeddingIndex.build(emb, "flat")
    hits = EmbeddingIndex.load(index.save(tmp_path / "idx")).search(queries, 5)
    scores, order = _brute_force(emb.vectors, queries, 5)
    assert [[h.item for h in row] for row in hits] == order.tolist()
    assert np.allclose([[h.score for h in row] for row in hits], scores, atol=1e-5)
    assert hits[0][0].rank == 1 and hits[0][0].path == f"{order[0, 0]}.png"
    assert hits[0][0].label == int(emb.labels[order[0, 0]])
    assert "recall@10" not in index.info


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_approximate_indexes_report_recall_against_exact(tmp_path: Path, kind: str) -> None:
    emb = _clusters()
    index = EmbeddingIndex.build(emb, kind)
    _, exact = _brute_force(emb.vectors, emb.vectors, 10)
    _, ids = index.index.search(
        (emb.vectors / np.linalg.norm(emb.vectors, axis=1, keepdims=True)).astype(np.float32), 10
    )
    by_hand = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, ids, strict=True)])
    assert index.info["recall@10"] == pytest.approx(by_hand)
    assert index.info["recall_sample"] == len(emb)
    assert index.info["recall@10"] > (0.9 if kind == "hnsw" else 0.3)
    loaded = EmbeddingIndex.load(index.save(tmp_path / kind))
    assert loaded.info["type"] == kind and len(loaded) == len(emb)


def test_ivfpq_needs_enough_vectors() -> None:
    with pytest.raises(ConfigError, match="at least 256"):
        EmbeddingIndex.build(_clusters(n=100), "ivfpq")


def test_index_refuses_queries_of_another_model(tmp_path: Path) -> None:
    emb = _clusters()
    emb.meta = {"model": {"fingerprint": "aaaa", "embedding_dim": emb.dim, "checkpoint": "x.pt"}}
    index = EmbeddingIndex.build(emb, "flat")
    index.check_queries_from({"fingerprint": "aaaa", "embedding_dim": emb.dim}, "same")
    with pytest.raises(DataError, match="index/model mismatch.*not the model"):
        index.check_queries_from({"fingerprint": "bbbb", "embedding_dim": emb.dim}, "other")
    with pytest.raises(DataError, match="index/model mismatch.*8-d"):
        index.check_queries_from({"embedding_dim": 8}, "other")
    with pytest.raises(DataError, match="dimension 3"):
        index.search(np.zeros((1, 3), np.float32))


def test_not_an_index_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not an index folder"):
        EmbeddingIndex.load(tmp_path)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.load: TorchScript is deprecated
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.slow
def test_export_matches_pytorch_on_real_digits(run: Path, tmp_path: Path, fmt: str) -> None:
    loaded = load_model(run, "cpu")
    out = tmp_path / ("m.onnx" if fmt == "onnx" else "m.pt")
    report = export_model(loaded, fmt, out)
    assert report.input_shape == (1, 8, 8) and report.max_abs_diff <= 1e-4
    x = Digits(split="test").images[:5]  # batch size 5: neither the traced nor a checked one
    with torch.no_grad():
        want = loaded.model(x).numpy()
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = session.run(["embeddings"], {"images": x.numpy()})[0]
    else:
        got = torch.jit.load(str(out)).eval()(x).detach().numpy()
    assert got.shape == (5, 64) and np.abs(got - want).max() <= 1e-4


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_a_video_model_embeds_an_image_as_a_one_frame_tracklet(pooling: str) -> None:
    from softmine.inference.model import ImageEmbedder
    from softmine.models import TinyCNN
    from softmine.models.video import VideoEmbeddingNet

    torch.manual_seed(0)
    video = VideoEmbeddingNet(TinyCNN(3, 4), 8, head_bn=True, eval_pooling=pooling).eval()
    x = torch.rand(5, 3, 16, 8)
    with torch.no_grad():
        want = video(x[:, None])  # 5 clips of one frame each
        got = ImageEmbedder(video)(x)
    assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_index_refuses_nonfinite_embeddings_and_queries(value: float) -> None:
    """faiss would silently never return a NaN item, and a NaN query would match nothing."""
    emb = _clusters(n=50)
    emb.vectors[[3, 7]] = value
    with pytest.raises(DataError, match=r"NaN or Inf in 2 of 50 rows \(the first: 3.png\)"):
        EmbeddingIndex.build(emb, "flat")
    index = EmbeddingIndex.build(_clusters(n=50), "flat")
    queries = np.ones((2, index.dim), np.float32)
    queries[1, 0] = value
    with pytest.raises(DataError, match=r"the queries hold NaN or Inf in 1 of 2 rows .*: q1"):
        index.search(queries, 3, names=["q0", "q1"])


def _read_preprocessing(path: Path) -> dict:
    """The preprocessing JSON of an exported file, read as a serving stack would: the ONNX
    file's metadata_props, the TorchScript file's extra file."""
    if path.suffix == ".onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        return json.loads(props["preprocessing"])
    extra = {"preprocessing.json": ""}
    torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return json.loads(extra["preprocessing.json"])


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.load: TorchScript is deprecated
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_states_the_digits_preprocessing(run: Path, tmp_path: Path, fmt: str) -> None:
    out = tmp_path / ("m.onnx" if fmt == "onnx" else "m.pt")
    export_model(load_model(run, "cpu"), fmt, out)
    spec = _read_preprocessing(out)
    assert spec["image_mode"] == "L" and spec["steps"] == []  # digits: images as stored
    assert spec["resize"] is None and spec["crop"] is None and spec["normalization"] is None
    assert spec["input"] == {
        "name": "images",
        "dtype": "float32",
        "layout": "NCHW",
        "shape": ["N", 1, 8, 8],
        "channel_order": "gray",
        "value_range": [0.0, 1.0],
    }


def _untrained_run(tmp_path: Path, overrides: list[str]) -> Path:
    """A checkpoint of an untrained network with the config ``overrides`` give (no training,
    no weights downloaded): what load_model and export need."""
    from omegaconf import OmegaConf

    from softmine.inference.model import build_network

    cfg = compose(overrides)
    torch.manual_seed(0)
    net = build_network(cfg, None)
    state = {"config": OmegaConf.to_container(cfg, resolve=True), "model": net.state_dict()}
    torch.save(state, tmp_path / "untrained.pt")
    return tmp_path / "untrained.pt"


DML_SMALL = ["dataset=cub", "dataset.transform.resize=110", "dataset.transform.crop_size=96"]


def test_preprocessing_steps_of_the_authors_and_reid_transforms() -> None:
    from softmine.config import build
    from softmine.inference.model_export import transform_steps

    authors = compose(["experiment=authors_cub"]).dataset.test.transform
    assert transform_steps(build(authors, "t")) == [
        {
            "op": "resize",
            "size": [224, 224],
            "mode": "exact",
            "interpolation": "bicubic",
            "antialias": True,
            "max_size": None,
        }
    ]
    reid = compose(["dataset=mars"]).dataset.query.transform
    (step,) = transform_steps(build(reid, "t"))
    assert (step["size"], step["mode"]) == ([256, 128], "exact")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the input check, a constant
@pytest.mark.parametrize(
    ("backbone", "order", "value_range", "mean", "std"),
    [
        ("bninception", "BGR", [0.0, 255.0], [104.0, 117.0, 128.0], [1.0, 1.0, 1.0]),
        ("resnet18", "RGB", [0.0, 1.0], [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ],
)
def test_export_states_the_dml_preprocessing_and_it_reproduces_the_embeddings(
    tmp_path: Path,
    backbone: str,
    order: str,
    value_range: list[float],
    mean: list[float],
    std: list[float],
) -> None:
    """The DML transform (resize the shorter side, centre crop) and the backbone's own input
    normalisation (BN-Inception's Caffe BGR 0..255 minus the mean pixel; torchvision's
    ImageNet mean/std) are stated, and an image prepared from the JSON alone gets the
    embedding softmine gives it. The ONNX file carries the same statement (the digits test
    above, both formats); a BN-Inception's ONNX file and its statement are the authors-CUB
    chain's (tests/commands/test_inference_cli.py): its dynamo export takes 10-15 s on CPU."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    ckpt = _untrained_run(
        tmp_path, [f"backbone={backbone}", "backbone.pretrained=false", *DML_SMALL]
    )
    loaded = load_model(ckpt, "cpu")
    out = tmp_path / "m.pt"
    export_model(loaded, "torchscript", out)
    spec = _read_preprocessing(out)
    assert spec["image_mode"] == "RGB"
    assert spec["steps"] == [
        {
            "op": "resize",
            "size": 110,
            "mode": "shorter_side",
            "interpolation": "bilinear",
            "antialias": True,
            "max_size": None,
        },
        {"op": "center_crop", "size": [96, 96]},
    ]
    assert (spec["resize"], spec["resize_mode"], spec["crop"]) == (110, "shorter_side", [96, 96])
    assert spec["input"]["shape"] == ["N", 3, 96, 96] and spec["input"]["channel_order"] == "RGB"
    norm = spec["normalization"]
    assert norm["in_model"] and norm["channel_order"] == order
    assert norm["value_range"] == value_range
    assert norm["mean"] == pytest.approx(mean) and norm["std"] == pytest.approx(std)

    rng = np.random.default_rng(0)
    photo = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 256, (150, 200, 3), dtype=np.uint8)).save(photo)
    x = TF.pil_to_tensor(Image.open(photo).convert(spec["image_mode"]))
    for step in spec["steps"]:  # a serving stack's loop over the stated steps
        if step["op"] == "resize":
            mode = InterpolationMode(step["interpolation"])
            x = TF.resize(x, [step["size"]], interpolation=mode, antialias=step["antialias"])
        elif step["op"] == "center_crop":
            x = TF.center_crop(x, step["size"])
    x = x[None].float() / 255.0  # value_range [0, 1]; the network normalises itself
    with torch.no_grad():
        served = torch.jit.load(str(out)).eval()(x).numpy()
    want = embed_images(loaded, [str(photo)], progress=False).embeddings.vectors
    np.testing.assert_allclose(served, want, atol=1e-4)
