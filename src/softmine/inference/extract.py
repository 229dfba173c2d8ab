"""Embed image files, or a split of the run's own dataset, with a loaded model: batched, on its device.

Each image goes through the run's test transform (see
:mod:`softmine.inference.model`), is turned into floats in [0, 1] on the device
and into an embedding by the network, whose first layer is the run's input
normalisation. Options:

* ``flip``: test-time augmentation, the mean of the embeddings of the image and of
  its mirror image (re-normalised when the network L2-normalises);
* ``precision``: ``32``, or ``bf16`` / ``fp16`` autocast (the embeddings are
  returned as float32 either way);
* ``on_bad_image``: ``error`` stops at the first unreadable file, naming it;
  ``skip`` leaves it out and lists it in :attr:`EmbedResult.bad`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from softmine.data.decode import file_problem
from softmine.data.file_check import collect_unreadable, known_bad, unreadable_items
from softmine.data.images import BAD_IMAGE_POLICIES
from softmine.engine.embedding import embed_batches
from softmine.engine.precision import PRECISIONS
from softmine.errors import ConfigError, DataError
from softmine.inference.embeddings import Embeddings
from softmine.inference.image_files import (
    BadImageError,
    ImageFiles,
    ImageList,
    collate_images,
    encode_labels,
)
from softmine.inference.model import LoadedModel


@dataclass
class EmbedResult:
    """The embeddings, the unreadable files left out (path, reason) and the time it took."""

    embeddings: Embeddings
    bad: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def check_precision(precision: str) -> torch.dtype | None:
    if str(precision) not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {tuple(PRECISIONS)} (got {precision!r})")
    return PRECISIONS[str(precision)]


def _run(
    loaded: LoadedModel, batches: Iterable[object], *, flip: bool, precision: str
) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """The embeddings and other fields of ``batches`` of images, through the engine's one path.

    Under ``flip`` the mean of an image's and its mirror image's embeddings is
    re-normalised when the network L2-normalises.
    """
    return embed_batches(
        loaded.embedder,
        batches,
        device=loaded.device,
        precision=check_precision(precision),
        flip=flip,
        normalize=flip and loaded.normalized,
    )


def embed_batch(
    loaded: LoadedModel, x: torch.Tensor, *, flip: bool = False, precision: str = "32"
) -> torch.Tensor:
    """(n, d) float32 embeddings on the CPU of a batch of images (uint8 0..255 or float [0, 1])."""
    embeddings, _ = _run(loaded, [x], flip=flip, precision=precision)
    return torch.from_numpy(embeddings)


def _meta(loaded: LoadedModel, flip: bool, precision: str, source: str) -> dict[str, object]:
    from softmine import __version__

    return {
        "model": loaded.describe(),
        "flip": bool(flip),
        "precision": str(precision),
        "source": source,
        "softmine": __version__,
    }


def _workers(num_workers: int | str, device: torch.device) -> int:
    """``auto``: decode in min(8, CPUs) worker processes beside a GPU; none on the CPU, where
    workers would compete with the network for the same cores."""
    if str(num_workers) == "auto":
        return min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
    try:
        value = int(num_workers)
    except ValueError:
        value = -1
    if value < 0:
        raise ConfigError(f"--num-workers must be an integer >= 0 or auto (got {num_workers!r})")
    return value


def _stack(tensors: list[torch.Tensor], paths: list[str]) -> torch.Tensor:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        a, b = sorted(shapes)[:2]
        raise DataError(
            f"images of different sizes in one batch ({a} and {b}, e.g. {paths[0]}) and the run's "
            "test transform does not resize them; resize the images to the size the model was "
            "trained on"
        )
    return torch.stack(tensors)


def embed_images(
    loaded: LoadedModel,
    images: ImageList | Sequence[str],
    *,
    batch_size: int = 64,
    flip: bool = False,
    precision: str = "32",
    on_bad_image: str = "error",
    num_workers: int | str = "auto",
    progress: bool | None = None,
    source: str = "",
    bad_image_hint: str = "fix or remove it, or pass --on-bad-image skip to leave such files out",
) -> EmbedResult:
    """Embeddings of image files, in the given order, with their paths and labels (when named).

    Args:
        loaded: a model from :func:`softmine.inference.load_model`.
        images: an :class:`ImageList` (paths and label names) or plain paths.
        batch_size: images per forward pass.
        flip: average with the embedding of the mirrored image.
        precision: ``32`` | ``bf16`` | ``fp16``.
        on_bad_image: ``error`` | ``skip`` (see the module docstring).
        num_workers: DataLoader processes decoding images (``auto``: min(8, CPUs) beside
            a GPU, none on the CPU).
        progress: show a progress bar (None: only on a terminal).
        source: what was embedded, recorded in the metadata.
        bad_image_hint: what the error for an unreadable file tells the user to do.
    """
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ConfigError(
            f"--on-bad-image must be one of {BAD_IMAGE_POLICIES} (got {on_bad_image!r})"
        )
    check_precision(precision)
    if int(batch_size) < 1:
        raise ConfigError(f"--batch-size must be >= 1 (got {batch_size})")
    if not isinstance(images, ImageList):
        images = ImageList(list(images))
    paths = images.paths
    if not paths:
        raise DataError("no images to embed")
    dataset = ImageFiles(paths, loaded.transform, loaded.channels)
    loader = DataLoader(
        dataset,
        batch_size=int(batch_size),
        num_workers=_workers(num_workers, loaded.device),
        collate_fn=collate_images,
        pin_memory=loaded.device.type == "cuda",
    )
    t0 = time.perf_counter()
    bad: list[tuple[str, str]] = []

    def readable() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, their positions in ``paths``) of the readable images; unreadable ones in ``bad``."""
        with tqdm(total=len(paths), unit="img", desc="embedding", disable=_no_bar(progress)) as bar:
            for index, tensors, errors in loader:
                for i, reason in errors:
                    if on_bad_image == "error":
                        raise BadImageError(f"{reason}; {bad_image_hint}")
                    bad.append((paths[i], reason))
                if tensors:
                    yield _stack(tensors, [paths[i] for i in index]), torch.as_tensor(index)
                bar.update(len(index) + len(errors))

    vectors, fields = _run(loaded, readable(), flip=flip, precision=precision)
    if not fields:
        raise DataError(
            f"none of the {len(paths)} images could be read (first: {bad[0][0]}: {bad[0][1]})"
        )
    kept = fields[0].tolist()
    labels = classes = None
    if images.names is not None:
        labels, classes = encode_labels([images.names[i] for i in kept])
    emb = Embeddings(
        vectors,
        [paths[i] for i in kept],
        labels,
        classes,
        _meta(loaded, flip, precision, source),
    )
    return EmbedResult(emb, bad, time.perf_counter() - t0)


def _no_bar(progress: bool | None) -> bool | None:
    """tqdm's ``disable``: None hides the bar when stderr is not a terminal."""
    return None if progress is None else not progress


def split_names(cfg: DictConfig) -> list[str]:
    """The dataset splits of a run config that ``--dataset-split`` can embed."""
    return [k for k in ("test", "train", "query", "gallery") if k in cfg.get("dataset", {})]


def run_split(
    loaded: LoadedModel, split: str, root: str | None = None, on_bad_image: str | None = None
) -> Dataset:
    """The run's own dataset split ``split``, with the test transform (no augmentation).

    ``root``: the dataset folder, when it is not where the run found it.
    ``on_bad_image``: replaces the run's ``error`` | ``skip`` (None: keep the run's).
    """
    from omegaconf import OmegaConf

    from softmine.config import build
    from softmine.data.build import split_node

    cfg = loaded.config
    names = split_names(cfg)
    if split not in names:
        raise ConfigError(f"--dataset-split {split}: the run's dataset has the splits {names}")
    dataset = OmegaConf.create(OmegaConf.to_container(cfg.dataset, resolve=True))
    if root is not None:  # the dataset's root, and a split node's own copy of it (older runs)
        _replace_root(dataset, str(cfg.dataset.get("root")), root)
    if on_bad_image is not None:
        _set_key(dataset, "on_bad_image", on_bad_image)
    node = OmegaConf.create(split_node(dataset, split))
    if split == "train":  # the test transform, never the training augmentation
        _set_transform(node, loaded)
    return build(node, f"dataset.{split}")


def _replace_root(node: DictConfig, old: str, new: str) -> None:
    for key in list(node.keys()):
        value = node[key]
        if key == "root" and str(value) == old:
            node[key] = new
        elif isinstance(value, DictConfig):
            _replace_root(value, old, new)


def _set_key(node: DictConfig, key: str, value: str) -> None:
    """Set ``key`` wherever the node (or a dataset it wraps) has it."""
    for name in list(node.keys()):
        if name == key:
            node[name] = value
        elif isinstance(node[name], DictConfig):
            _set_key(node[name], key, value)


def _set_transform(node: DictConfig, loaded: LoadedModel) -> None:
    from softmine.inference.model import test_transform_node

    test = test_transform_node(loaded.config)
    target = node.dataset if "dataset" in node else node
    if "transform" in target:
        target.transform = test


def _items_paths(dataset: Dataset, split: str) -> list[str]:
    base = getattr(dataset, "dataset", dataset)
    samples = getattr(base, "samples", None)
    if samples is not None and len(samples) == len(dataset):
        return [str(s[0]) for s in samples]
    return [f"{split}/{i}" for i in range(len(dataset))]


def embed_split(
    loaded: LoadedModel,
    split: str = "test",
    *,
    root: str | None = None,
    batch_size: int = 64,
    flip: bool = False,
    precision: str = "32",
    num_workers: int | str = "auto",
    progress: bool | None = None,
    on_bad_image: str | None = None,
) -> EmbedResult:
    """Embeddings of a split of the run's own dataset, with its labels and class names.

    Items must be single images (``(image, label)``); video tracklets of the re-ID
    sets are evaluated by ``softmine-eval RUN`` instead. An unreadable image follows
    ``on_bad_image`` (None: the run's ``data.on_bad_image``): ``error`` stops, naming it;
    ``skip`` leaves its item out (never another image's embedding under its path) and
    lists it in :attr:`EmbedResult.bad`.
    """
    if on_bad_image is not None and on_bad_image not in BAD_IMAGE_POLICIES:
        raise ConfigError(
            f"--on-bad-image must be one of {BAD_IMAGE_POLICIES} (got {on_bad_image!r})"
        )
    dataset = run_split(loaded, split, root, on_bad_image)
    first = dataset[0][0] if len(dataset) else None
    if not isinstance(first, torch.Tensor) or first.dim() != 3:
        raise ConfigError(
            f"--dataset-split {split}: its items are not single images (got "
            f"{type(first).__name__} {tuple(getattr(first, 'shape', ()))}); softmine-embed embeds "
            "image sets, evaluate video re-ID runs with softmine-eval RUN"
        )
    check_precision(precision)
    n = len(dataset)
    loader = DataLoader(
        dataset,
        batch_size=int(batch_size),
        num_workers=0
        if getattr(dataset, "in_memory", False)
        else _workers(num_workers, loaded.device),
        pin_memory=loaded.device.type == "cuda",
    )
    t0 = time.perf_counter()

    def counted() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The loader's (images, labels), counted on a progress bar."""
        with tqdm(total=n, unit="img", desc=f"embedding {split}", disable=_no_bar(progress)) as bar:
            for x, y in loader:
                yield x, y
                bar.update(len(y))

    with collect_unreadable(dataset) as found:
        vectors, (labels,) = _run(loaded, counted(), flip=flip, precision=precision)
    # an unreadable item was read as another image of its class: leave it out
    keep = ~unreadable_items(dataset, set(found) | known_bad(dataset))
    if not keep.any():
        raise DataError(f"--dataset-split {split}: none of its {n} images could be read")
    bad = sorted(  # the missing files were dropped when the split was built
        (p, found.get(p) or file_problem(p) or "cannot be decoded")
        for p in set(found) | known_bad(dataset)
    )
    base = getattr(dataset, "dataset", dataset)
    classes = getattr(base, "class_names", None)
    paths = _items_paths(dataset, split)
    emb = Embeddings(
        vectors[keep],
        [p for p, k in zip(paths, keep, strict=True) if k],
        labels.astype(np.int64)[keep],
        [str(c) for c in classes] if classes is not None else None,
        _meta(loaded, flip, precision, f"dataset split {split}"),
    )
    return EmbedResult(emb, bad, time.perf_counter() - t0)
