"""scikit-learn's bundled handwritten digits (1,797 real 8x8 images, 10 classes).

Ships inside scikit-learn, so every command that uses it runs with no download.
Two protocols:

* ``half``: a fixed, seeded split of each class's images into halves, the first
  half for training, the second for retrieval testing (same classes).
* ``zeroshot``: classes 0-4 for training, 5-9 for testing (class-disjoint, the
  protocol CUB-200-2011 and Cars196 use).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from softmine.errors import ConfigError

PROTOCOLS = ("half", "zeroshot")
SPLITS = ("train", "test")


class InMemoryImages(Dataset):
    """Items ``(transform(images[i]), targets[i])`` of images held as one tensor in memory.

    The base of the embedded sets (:class:`Digits`, ``DigitsPairs``): a subclass sets
    ``images``, ``targets`` (n,), ``classes`` and ``transform``.
    """

    #: All images live in memory: DataLoader worker processes would only add overhead.
    in_memory = True
    images: torch.Tensor
    targets: np.ndarray
    classes: np.ndarray
    transform: Callable[[torch.Tensor], torch.Tensor] | None

    @property
    def labels(self) -> np.ndarray:
        """Integer label of every sample, shape (n,)."""
        return self.targets

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i]
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.targets[i])

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        """The items of ``indices`` at once (the DataLoader fetches a batch so): one gather
        and, when the transform has a ``batch`` form (:class:`~softmine.data.transforms.RandomShift`),
        one call of it; the same tensors and random draws as ``[self[i] for i in indices]``."""
        x = self._gather(indices)
        if x is None:
            return [self[i] for i in indices]
        return list(zip(x.unbind(0), self.targets[indices].tolist(), strict=True))

    def get_batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch ``(x, labels)`` of ``indices``: what ``default_collate`` makes of
        ``[self[i] for i in indices]`` (the same tensors and random draws), without cutting
        the gathered images into items and stacking them again. The trainer's loader fetches
        an in-memory set so (:class:`~softmine.data.run_batches.WholeBatches`)."""
        x = self._gather(indices)
        if x is None:
            x, labels = default_collate([self[i] for i in indices])
            return x, labels
        return x, torch.as_tensor(self.targets[indices], dtype=torch.long)

    def _gather(self, indices: list[int]) -> torch.Tensor | None:
        """The transformed images of ``indices`` as one tensor, or None where the items must
        be made one by one (a subclass's own ``__getitem__``, a transform without ``batch``)."""
        batch = getattr(self.transform, "batch", None)
        own = type(self).__getitem__ is InMemoryImages.__getitem__
        if not own or (self.transform is not None and batch is None):
            return None
        x = self.images[torch.as_tensor(indices, dtype=torch.long)]
        return x if batch is None else batch(x)


class Digits(InMemoryImages):
    """The digits images as (1, 8, 8) float tensors in [0, 1] with integer labels.

    Args:
        root: unused (the data ship with scikit-learn); kept so every dataset takes it.
        split: ``train`` or ``test``.
        protocol: ``half`` or ``zeroshot`` (see module docstring).
        split_seed: seed of the per-class split in the ``half`` protocol; fixed by
            default so the test set never changes with the training seed.
        transform: optional callable applied to each image tensor.
    """

    def __init__(
        self,
        root: str | None = None,
        split: str = "train",
        protocol: str = "half",
        split_seed: int = 0,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        from sklearn.datasets import load_digits

        if split not in SPLITS:
            raise ConfigError(f"digits split must be one of {SPLITS}, got {split!r}")
        if protocol not in PROTOCOLS:
            raise ConfigError(f"digits protocol must be one of {PROTOCOLS}, got {protocol!r}")
        bunch = load_digits()
        images = bunch.images.astype(np.float32) / 16.0
        targets = bunch.target.astype(np.int64)
        if protocol == "half":
            rng = np.random.default_rng(split_seed)
            keep = []
            for c in np.unique(targets):
                idx = rng.permutation(np.flatnonzero(targets == c))
                half = (len(idx) + 1) // 2
                keep.append(idx[:half] if split == "train" else idx[half:])
            index = np.sort(np.concatenate(keep))
        else:
            in_train = targets < 5
            index = np.flatnonzero(in_train if split == "train" else ~in_train)
        self.images = torch.from_numpy(images[index]).unsqueeze(1)
        self.targets = targets[index]
        self.split, self.protocol, self.transform = split, protocol, transform
        self.classes = np.unique(self.targets)


def write_pngs(
    folder: str | Path, split: str = "test", protocol: str = "half", split_seed: int = 0
) -> list[Path]:
    """Write a split of the digits as 8x8 grayscale PNGs, ``folder/<label>/<split>_<i>.png``.

    Item ``i`` of ``Digits(split=split, ...)`` becomes ``<split>_<i:04d>.png`` in the
    folder of its label, so ``softmine-embed RUN --images folder`` reads the labels
    from the folder names. Pixels are the dataset's values in [0, 1] times 255,
    rounded to 8 bits (the dataset's 17 grey levels are k / 16).
    """
    from PIL import Image

    data = Digits(split=split, protocol=protocol, split_seed=split_seed)
    pixels = np.rint(data.images[:, 0].numpy() * 255).astype(np.uint8)
    written = []
    for i, (img, label) in enumerate(zip(pixels, data.targets, strict=True)):
        path = Path(folder) / str(int(label)) / f"{split}_{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, "L").save(path)
        written.append(path)
    return written
