"""Two handwritten digits side by side: 100 classes, 50 to train and 50 unseen ones to test.

The bundled digits set is nearly solved (R@1 0.99 with 10 classes seen in training),
so losses cannot be told apart on it. ``digits_pairs`` is built from the same 1,797
scikit-learn digits, with no download, and is harder in the way CUB and Cars are:

* an image is two 8 x 8 digits side by side (1 x 8 x 16); its class is the ordered
  pair (left, right), 10 x 10 = 100 classes, labelled ``10 * left + right`` in
  :attr:`DigitsPairs.pair_codes`;
* 50 classes train and the other 50 test (chosen with ``split_seed``): retrieval on
  classes never seen in training;
* the digit images are split as well: each digit's images are halved (with
  ``split_seed``), training pairs are drawn only from the first halves and test pairs
  only from the second, so no digit image of a test pair appears in a training pair;
* every class holds ``per_class`` images, each a distinct (left image, right image)
  combination drawn with a generator seeded by ``(split_seed, split, class)``.

Training labels are 0..49 in ascending order of the pair code (what the loss needs);
test labels are the pair codes themselves.

Held-out training classes (``dataset.val_classes`` / ``dataset.folds``, the validation
split of :mod:`softmine.data.splits`) are built the way the test classes are: the
training halves of the digit images are cut again (about 2/3 : 1/3, with ``split_seed``),
the kept classes' pairs use the first part and the held-out classes' pairs the second, so
no digit image of a validation pair appears in a training pair. Without that, the
validation classes reuse the digit images the network trained on and their MAP@R
reaches 1.0 within a few epochs while the test classes' is still climbing: a flat
objective that cannot rank settings.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from softmine.data.datasets.digits import InMemoryImages
from softmine.errors import ConfigError

SPLITS = ("train", "test")
NUM_CLASSES = 100
TRAIN_CLASSES = 50


def pair_split(split_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train pair codes, test pair codes): 50 and 50 of 0..99, sorted, disjoint."""
    order = np.random.default_rng([int(split_seed), 0]).permutation(NUM_CLASSES)
    return np.sort(order[:TRAIN_CLASSES]), np.sort(order[TRAIN_CLASSES:])


def digit_pools(targets: np.ndarray, split_seed: int = 0) -> dict[str, list[np.ndarray]]:
    """Per split, per digit 0..9: the indices of the digit images its pairs may use.

    Each digit's images are shuffled with ``split_seed`` and halved: the first
    ``ceil(n / 2)`` for training pairs, the rest for test pairs (disjoint).
    """
    rng = np.random.default_rng([int(split_seed), 1])
    pools: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(targets == digit))
        half = (len(idx) + 1) // 2
        pools["train"].append(np.sort(idx[:half]))
        pools["test"].append(np.sort(idx[half:]))
    return pools


def held_out_pools(pools: list[np.ndarray], split_seed: int = 0) -> tuple[list, list]:
    """The training pools cut again, per digit: (kept classes' part, held-out classes' part).

    Each digit's training images are shuffled with ``split_seed`` and cut at ``ceil(2n / 3)``.
    """
    rng = np.random.default_rng([int(split_seed), 3])
    kept, held = [], []
    for pool in pools:
        idx = rng.permutation(pool)
        cut = -(-2 * len(idx) // 3)
        kept.append(np.sort(idx[:cut]))
        held.append(np.sort(idx[cut:]))
    return kept, held


class DigitsPairs(InMemoryImages):
    """Pairs of scikit-learn digits as (1, 8, 16) float tensors in [0, 1] with integer labels.

    Args:
        root: unused (the data ship with scikit-learn); kept so every dataset takes it.
        split: ``train`` (50 classes) or ``test`` (the other 50).
        per_class: images per class, each a distinct combination of a left and a
            right digit image (at most the product of the two pools' sizes, ~8,000).
        split_seed: seed of the class split, the digit-image split and the pairs;
            fixed by default so the test set never changes with the training seed.
        transform: optional callable applied to each image tensor.
        val_classes, folds, fold, val_seed: the held-out classes of the training split, as
            ``dataset.*`` of the same names choose them (:func:`~softmine.data.splits.held_out_classes`);
            their pairs use digit images no training pair uses. Ignored by ``test``.

    Attributes:
        labels: (n,) training labels 0..49, or the test pair codes.
        pair_codes: (n,) ``10 * left + right`` of every image.
        left, right: (n,) indices into scikit-learn's digits of the two halves.
    """

    def __init__(
        self,
        root: str | None = None,
        split: str = "train",
        per_class: int = 40,
        split_seed: int = 0,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        val_classes: int = 0,
        folds: int = 0,
        fold: int = 0,
        val_seed: int = 0,
    ) -> None:
        from sklearn.datasets import load_digits

        from softmine.data.splits import held_out_classes

        if split not in SPLITS:
            raise ConfigError(f"digits_pairs split must be one of {SPLITS}, got {split!r}")
        per_class = int(per_class)
        bunch = load_digits()
        images = bunch.images.astype(np.float32) / 16.0
        targets = bunch.target.astype(np.int64)
        pools = digit_pools(targets, split_seed)[split]
        codes = pair_split(split_seed)[SPLITS.index(split)]
        held: set[int] = set()
        if split == "train":
            held = set(
                codes[
                    held_out_classes(
                        np.arange(len(codes)),
                        val_classes=val_classes,
                        folds=folds,
                        fold=fold,
                        seed=val_seed,
                    )
                ].tolist()
            )
        kept_pools, held_pools = held_out_pools(pools, split_seed) if held else (pools, pools)
        smallest = min(len(p) for p in [*kept_pools, *(held_pools if held else [])]) ** 2
        if not 2 <= per_class <= smallest:
            raise ConfigError(
                f"dataset.per_class must lie in [2, {smallest}] (distinct pairs of one "
                f"split's digit images), got {per_class}"
            )
        left, right, code_of = [], [], []
        for code in codes:
            a, b = divmod(int(code), 10)
            use = held_pools if int(code) in held else kept_pools
            rng = np.random.default_rng([int(split_seed), 2 + SPLITS.index(split), int(code)])
            pick = rng.choice(len(use[a]) * len(use[b]), size=per_class, replace=False)
            left.append(use[a][pick // len(use[b])])
            right.append(use[b][pick % len(use[b])])
            code_of.append(np.full(per_class, code, dtype=np.int64))
        self.left, self.right = np.concatenate(left), np.concatenate(right)
        self.pair_codes = np.concatenate(code_of)
        pixels = np.concatenate([images[self.left], images[self.right]], axis=2)
        self.images = torch.from_numpy(pixels).unsqueeze(1)
        self.classes = codes
        self.targets = (
            np.searchsorted(codes, self.pair_codes) if split == "train" else self.pair_codes
        )
        self.split, self.transform = split, transform

    def mirror_labels(self, labels: np.ndarray) -> np.ndarray:
        """The label of the mirrored class (b, a) of each label's class (a, b), in this split's
        labelling (the pair code for ``test``, the 0..49 index for ``train``); -1 where the
        mirror class is not in this split (it can then never be retrieved)."""
        codes = np.asarray(self.classes)[np.asarray(labels)] if self.split == "train" else labels
        codes = np.asarray(codes, dtype=np.int64)
        mirror = 10 * (codes % 10) + codes // 10
        if self.split != "train":
            return np.where(np.isin(mirror, self.classes), mirror, -1)
        pos = np.searchsorted(self.classes, mirror).clip(0, len(self.classes) - 1)
        return np.where(np.asarray(self.classes)[pos] == mirror, pos, -1)
