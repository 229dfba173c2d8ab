"""Label noise for the outlier experiment: flip a seeded fraction of the training labels.

Wang et al. (AAAI 2019) argue that class-aware attention gives outliers, such as
samples with a wrong label, little weight. To measure that, ``dataset.label_noise=p``
wraps the training split in :class:`NoisyLabels`: exactly ``round(p * n)`` samples,
chosen with a seeded generator, get a label drawn uniformly from the *other* classes.
The test split is never wrapped, so evaluation always uses the true labels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from softmine.data.views import DatasetView
from softmine.errors import ConfigError


def flip_labels(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Flip ``round(fraction * n)`` labels, each to a different class chosen uniformly.

    Args:
        labels: (n,) integer labels; the classes are the distinct values present.
        fraction: p in [0, 1]; ``round`` is Python's (half to even), so p * n = 2.5 flips 2.
        seed: seed of the generator that picks the samples and their new classes.

    Returns:
        ``(noisy, flipped)``: the (n,) int64 noisy labels and an (n,) bool mask of the
        flipped samples. ``noisy[i] != labels[i]`` exactly where ``flipped[i]``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    fraction = float(fraction)
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(
            f"dataset.label_noise must lie in [0, 1] (got {fraction}); it is the fraction of "
            "training labels flipped, e.g. 0.2"
        )
    n = len(labels)
    count = round(fraction * n)
    noisy = labels.astype(np.int64)
    flipped = np.zeros(n, dtype=bool)
    if count == 0:
        return noisy, flipped
    classes, position = np.unique(noisy, return_inverse=True)
    if len(classes) < 2:
        raise ConfigError(
            "dataset.label_noise > 0 needs at least 2 training classes to flip labels between "
            f"(got {len(classes)}); set dataset.label_noise=0"
        )
    rng = np.random.default_rng(seed)
    chosen = rng.choice(n, size=count, replace=False)
    shift = rng.integers(1, len(classes), size=count)  # 1..C-1: never the same class
    noisy[chosen] = classes[(position[chosen] + shift) % len(classes)]
    flipped[chosen] = True
    return noisy, flipped


class NoisyLabels(DatasetView):
    """A training set whose labels are partly flipped; items are ``(x, noisy_label)``.

    Every attribute of the wrapped dataset stays reachable (read and write), so the
    trainer and the samplers see the wrapper as the dataset itself. With ``fraction=0``
    it changes nothing.

    Args:
        dataset: the training split; must have ``labels`` (n,) and items ``(x, label, ...)``.
        fraction: fraction of samples whose label is flipped (``dataset.label_noise``).
        seed: seed of which samples flip and to which class (``dataset.label_noise_seed``).

    Attributes:
        labels: (n,) the labels used for training (noisy).
        clean_labels: (n,) the wrapped dataset's own labels.
        flipped: (n,) bool, True where the label was changed.
    """

    OWN = frozenset({"dataset", "fraction", "seed", "labels", "clean_labels", "flipped"})

    def __init__(self, dataset: Any, fraction: float = 0.0, seed: int = 0) -> None:
        if not hasattr(dataset, "labels"):
            raise ConfigError(
                f"{type(dataset).__name__} has no `labels`; label noise needs a labelled training set"
            )
        clean = np.asarray(dataset.labels).astype(np.int64)
        noisy, flipped = flip_labels(clean, fraction, seed)
        object.__setattr__(self, "dataset", dataset)
        object.__setattr__(self, "fraction", float(fraction))
        object.__setattr__(self, "seed", int(seed))
        object.__setattr__(self, "clean_labels", clean)
        object.__setattr__(self, "labels", noisy)
        object.__setattr__(self, "flipped", flipped)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        item = self.dataset[i]
        return (item[0], int(self.labels[i]), *item[2:])

    def __getitems__(self, indices: list[int]) -> list[tuple[Any, ...]]:
        """The items of ``indices`` at once, through the wrapped dataset's own batched fetch
        when it has one (the same items as ``[self[i] for i in indices]``)."""
        if hasattr(type(self.dataset), "__getitems__"):
            items = self.dataset.__getitems__(indices)
        else:
            items = [self.dataset[i] for i in indices]
        return [(it[0], int(self.labels[i]), *it[2:]) for i, it in zip(indices, items, strict=True)]

    @property
    def get_batch(self) -> Callable[[list[int]], tuple[Any, ...]] | None:  # type: ignore[override]
        """The wrapped set's batched fetch (``get_batch``) with the noisy labels; None without one."""
        fetch = getattr(self.dataset, "get_batch", None)
        if fetch is None:
            return None

        def get_batch(indices: list[int]) -> tuple[Any, ...]:
            x, _, *rest = fetch(indices)
            return (x, torch.as_tensor(self.labels[indices], dtype=torch.long), *rest)

        return get_batch
