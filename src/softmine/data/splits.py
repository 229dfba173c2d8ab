"""Held-out training classes: a validation split, or one of K class-disjoint folds.

*A Metric Learning Reality Check* (Musgrave et al., ECCV 2020) showed that choosing
snapshots or hyperparameters on the test classes inflates results; its benchmark
chooses on classes held out of the training set and touches the test classes once.
Two ways to hold classes out, both chosen among the classes of the training split:

* ``dataset.val_classes=N``: N classes drawn with ``dataset.val_seed``;
* ``dataset.folds=K dataset.fold=i``: the classes, shuffled with ``dataset.val_seed``,
  cut into K folds of near-equal size (:func:`class_folds`); fold i validates and the
  other K - 1 train, so across ``fold=0..K-1`` every class validates exactly once.

Every item of a held-out class leaves the training split: the P x K sampler and the
loss see only the remaining classes, relabelled 0..C-1 in ascending order of their
labels (:class:`ClassSubset`). Label noise (``dataset.label_noise``) and any other
wrapper of the training node apply to what remains.

The validation split reads the held-out classes' training items the way the test
split reads its own: the innermost training dataset node is built a second time with
the ``transform`` of the evaluation node (``test``, else ``query``; none when it has
none) and, for video sets, its clip ``sampling`` (:data:`EVAL_READ_KEYS`). It is
scored by leave-one-out retrieval, or for re-ID sets as query/gallery
(:func:`reid_view`): per identity and camera its first item is a query, and the
gallery holds every held-out item (the re-ID rules remove the query's own camera).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from softmine.config import build
from softmine.data.build import build_split, split_node, wrapper_chain
from softmine.data.views import DatasetView
from softmine.errors import ConfigError, DataError

#: Keys of the training dataset node replaced by the evaluation node's values when the
#: validation split is read: how an item is read (augmentation, clip frames), not which.
EVAL_READ_KEYS = ("transform", "sampling")


def class_folds(classes: np.ndarray, folds: int, seed: int = 0) -> list[np.ndarray]:
    """The classes shuffled with ``seed`` and cut into ``folds`` class-disjoint parts.

    Sizes differ by at most one (``np.array_split``); each part is sorted. Every class
    is in exactly one part.
    """
    classes = np.unique(np.asarray(classes))
    folds = int(folds)
    if not 2 <= folds <= len(classes):
        raise ConfigError(
            f"dataset.folds must lie in [2, {len(classes)}] (the training split has "
            f"{len(classes)} classes), got {folds}; 0 switches cross-validation off"
        )
    order = np.random.default_rng(int(seed)).permutation(classes)
    return [np.sort(part) for part in np.array_split(order, folds)]


def held_out_classes(
    classes: np.ndarray,
    *,
    val_classes: int = 0,
    folds: int = 0,
    fold: int = 0,
    seed: int = 0,
) -> np.ndarray:
    """The classes held out for validation (sorted); empty when both options are off.

    Args:
        classes: the labels of the training split (duplicates allowed).
        val_classes: N > 0 holds out N classes drawn with ``seed``.
        folds: K >= 2 holds out fold ``fold`` of :func:`class_folds`.
        fold: which fold validates, 0..K-1.
        seed: ``dataset.val_seed``.
    """
    classes = np.unique(np.asarray(classes))
    val_classes, folds, fold = int(val_classes or 0), int(folds or 0), int(fold or 0)
    if val_classes < 0 or folds < 0:
        raise ConfigError(
            f"dataset.val_classes and dataset.folds must be >= 0 (got {val_classes}, {folds})"
        )
    if val_classes and folds:
        raise ConfigError(
            "dataset.val_classes and dataset.folds both hold out training classes; "
            "set one of them to 0"
        )
    if folds:
        if not 0 <= fold < folds:
            raise ConfigError(
                f"dataset.fold must lie in [0, {folds - 1}] for dataset.folds={folds}, got {fold}"
            )
        return class_folds(classes, folds, seed)[fold]
    if fold:
        raise ConfigError(f"dataset.fold={fold} needs dataset.folds=K >= 2 (it is 0)")
    if not val_classes:
        return classes[:0]
    if val_classes >= len(classes):
        raise ConfigError(
            f"dataset.val_classes={val_classes} leaves no class to train on: the training "
            f"split has {len(classes)} classes; hold out fewer"
        )
    rng = np.random.default_rng(int(seed))
    return np.sort(rng.choice(classes, size=val_classes, replace=False))


class ClassSubset(DatasetView):
    """The items of ``dataset`` whose label is in ``classes``, optionally relabelled 0..C-1.

    Items are ``(x, label, *rest)`` as the wrapped dataset gives them, with the label
    replaced. Every other attribute of the wrapped dataset stays reachable (read and
    write: ``transform``, ``bad_image_log``, ...), as for :class:`~softmine.data.noise.NoisyLabels`.

    Attributes:
        index: (n,) positions of the kept items in the wrapped dataset.
        classes: the kept classes, sorted (labels of the wrapped dataset).
        labels: (n,) labels of the kept items: 0..C-1 in the order of ``classes`` when
            ``relabel``, else the wrapped dataset's own.
        original_labels: (n,) the wrapped dataset's labels of the kept items.
    """

    OWN = frozenset({"dataset", "index", "classes", "labels", "original_labels", "relabel"})

    def __init__(self, dataset: Any, classes: np.ndarray, relabel: bool = True) -> None:
        if not hasattr(dataset, "labels"):
            raise ConfigError(
                f"{type(dataset).__name__} has no `labels`; holding classes out needs a "
                "labelled training set"
            )
        all_labels = np.asarray(dataset.labels).astype(np.int64)
        classes = np.unique(np.asarray(classes, dtype=np.int64))
        index = np.flatnonzero(np.isin(all_labels, classes))
        original = all_labels[index]
        labels = np.searchsorted(classes, original) if relabel else original
        object.__setattr__(self, "dataset", dataset)
        object.__setattr__(self, "index", index)
        object.__setattr__(self, "classes", classes)
        object.__setattr__(self, "original_labels", original)
        object.__setattr__(self, "labels", labels.astype(np.int64))
        object.__setattr__(self, "relabel", bool(relabel))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        """The names of this view's labels (``class_names`` of the kept classes)."""
        names = self.dataset.class_names
        if not self.relabel:
            return list(names)
        return [names[int(c)] for c in self.classes]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        item = self.dataset[int(self.index[i])]
        return (item[0], int(self.labels[i]), *item[2:])


class ReIDView(Dataset):
    """Items ``(x, identity, camera)`` of some items of a labelled set with cameras (``camids``).

    For re-ID evaluation of held-out training identities; video sets keep their
    ``tracklets`` (in this view's order), which the re-ID embedding reads to drop the
    padding of chunked clips.
    """

    def __init__(self, dataset: Any, index: np.ndarray) -> None:
        camids = getattr(dataset, "camids", None)
        if camids is None:
            raise ConfigError(
                f"{type(dataset).__name__} has no camera ids (`camids`), so its held-out "
                "identities cannot be scored as re-ID query/gallery; set dataset.val_classes=0 "
                "and dataset.folds=0"
            )
        self.dataset = dataset
        self.index = np.asarray(index, dtype=np.int64)
        self.pids = np.asarray(dataset.labels, dtype=np.int64)[self.index]
        self.camids = np.asarray(camids, dtype=np.int64)[self.index]
        tracklets = getattr(dataset, "tracklets", None)
        if tracklets is not None:
            self.tracklets = [tracklets[j] for j in self.index]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[Any, int, int]:
        item = self.dataset[int(self.index[i])]
        return item[0], int(self.pids[i]), int(self.camids[i])


def reid_query_gallery(pids: np.ndarray, camids: np.ndarray) -> np.ndarray:
    """Positions of the queries: the first item of every (identity, camera) pair, in order."""
    pairs = np.stack([np.asarray(pids), np.asarray(camids)], axis=1)
    _, first = np.unique(pairs, axis=0, return_index=True)
    return np.sort(first)


@dataclass
class ValidationSplit:
    """The held-out classes, read for evaluation.

    Attributes:
        classes: the held-out labels (of the training split, before relabelling).
        test: leave-one-out retrieval set ``(x, label)`` (retrieval protocols), or None.
        query, gallery: re-ID sets ``(x, identity, camera)`` (re-ID protocol), or None.
    """

    classes: np.ndarray
    test: Dataset | None = None
    query: Dataset | None = None
    gallery: Dataset | None = None

    @property
    def protocol(self) -> str:
        return "retrieval" if self.test is not None else "reid"


def holds_out(dataset_cfg: DictConfig) -> bool:
    """Whether the dataset config asks for held-out classes (``val_classes`` or ``folds``)."""
    return bool(int(dataset_cfg.get("val_classes") or 0) or int(dataset_cfg.get("folds") or 0))


def _eval_node(dataset_cfg: DictConfig) -> dict[str, Any]:
    for split in ("test", "query"):
        if split in dataset_cfg:
            return OmegaConf.to_container(dataset_cfg[split], resolve=True)  # type: ignore[return-value]
    return {}


def build_train_and_validation(
    dataset_cfg: DictConfig, reid: bool = False
) -> tuple[Any, ValidationSplit | None]:
    """The training set (held-out classes removed) and the validation split (None when off).

    Args:
        dataset_cfg: the ``dataset`` config (its ``train`` node, ``val_classes``,
            ``val_seed``, ``folds``, ``fold``, and ``test`` or ``query`` for reading).
        reid: score the validation split as re-ID query/gallery (the dataset's
            protocol is ``reid``) instead of leave-one-out retrieval.
    """
    if not holds_out(dataset_cfg):
        return build_split(dataset_cfg, "train"), None
    chain = wrapper_chain(split_node(dataset_cfg, "train"))
    inner = chain[-1]
    raw = build(OmegaConf.create(inner), "dataset.train")
    if not hasattr(raw, "labels"):
        raise ConfigError(
            f"{type(raw).__name__} has no `labels`; dataset.val_classes / dataset.folds "
            "need a labelled training set"
        )
    labels = np.asarray(raw.labels)
    held = held_out_classes(
        labels,
        val_classes=int(dataset_cfg.get("val_classes") or 0),
        folds=int(dataset_cfg.get("folds") or 0),
        fold=int(dataset_cfg.get("fold") or 0),
        seed=int(dataset_cfg.get("val_seed") or 0),
    )
    train: Any = ClassSubset(raw, np.setdiff1d(np.unique(labels), held), relabel=True)
    for node in reversed(chain[:-1]):  # re-apply the wrappers (label noise) to what remains
        outer = {k: v for k, v in node.items() if k != "dataset"}
        train = build(OmegaConf.create(outer), "dataset.train", dataset=train)

    reading = _eval_node(dataset_cfg)
    reader_node = dict(inner)
    for key in EVAL_READ_KEYS:
        if key in reader_node:
            reader_node[key] = reading.get(key)
    reader = build(OmegaConf.create(reader_node), "dataset.train (validation reading)")
    if len(reader) != len(raw) or not np.array_equal(np.asarray(reader.labels), labels):
        raise DataError(
            "the training split read with the test transform has different items than the "
            "training split itself; validation classes need a dataset whose items do not "
            "depend on its transform"
        )
    index = np.flatnonzero(np.isin(labels, held))
    if not reid:
        return train, ValidationSplit(held, test=ClassSubset(reader, held, relabel=False))
    gallery = ReIDView(reader, index)
    query = ReIDView(reader, index[reid_query_gallery(gallery.pids, gallery.camids)])
    return train, ValidationSplit(held, query=query, gallery=gallery)
