"""One batch sampler for a whole training run, and per-item seeds for worker augmentation.

A DataLoader iterator per epoch drains and refills the workers' pipeline at every
epoch boundary (a stall, worst with ~100-iteration epochs of decoded images).
:class:`RunBatchSampler` instead chains the epochs of a :class:`PKSampler` (each
epoch exactly ``rank_batches(e)``, the first one from ``start_batch``) so the
trainer iterates one loader for the whole run and finds the epoch boundaries by
counting batches.

With one iterator the workers' random streams would run on across epochs and
depend on how many workers there are and where the run was resumed. So, when
``seed_items`` is on, every item comes with a seed of its own drawn from (run
seed, rank, epoch, position in the epoch), and :class:`SeededItems` runs the
dataset's ``__getitem__`` (decode + random transforms) with torch's generator
seeded by it: the
augmentation of an item depends on nothing else, and a resume anywhere, with any
``num_workers``, reproduces the pixels of an uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from softmine.data.samplers import PKSampler


def item_seeds(seed: int, rank: int, epoch: int, batch: int, n: int) -> list[int]:
    """Seeds of the ``n`` items of this rank's batch ``batch`` of ``epoch`` (independent streams)."""
    return np.random.SeedSequence([seed, rank, epoch, batch]).generate_state(n).tolist()


class RunBatchSampler(Sampler[list[Any]]):
    """Yields ``sampler``'s batches of epoch ``epoch`` from ``start_batch``, then the next epochs.

    It stops after ``max_batches`` batches (``trainer.max_iters`` runs) or at the end
    of epoch ``end_epoch - 1`` (``trainer.epochs`` runs), whichever comes first.
    With ``seed_items`` a batch is a list of ``(index, item seed)`` pairs for
    :class:`SeededItems`, otherwise a list of indices.
    """

    def __init__(self, sampler: PKSampler, seed: int, rank: int = 0, seed_items: bool = False):
        self.sampler, self.seed, self.rank, self.seed_items = sampler, int(seed), rank, seed_items
        self.start_at(0, 0)

    def start_at(
        self,
        epoch: int,
        start_batch: int = 0,
        max_batches: int | None = None,
        end_epoch: int | None = None,
    ) -> None:
        """Where the next iterator starts, and where it stops (``None``: no such limit)."""
        self.epoch, self.start_batch = int(epoch), int(start_batch)
        self.max_batches, self.end_epoch = max_batches, end_epoch

    def __iter__(self) -> Iterator[list[Any]]:
        epoch, start, left = self.epoch, self.start_batch, self.max_batches
        while (left is None or left > 0) and (self.end_epoch is None or epoch < self.end_epoch):
            batches = self.sampler.rank_batches(epoch)
            for b in range(start, len(batches)):
                if self.seed_items:
                    seeds = item_seeds(self.seed, self.rank, epoch, b, len(batches[b]))
                    yield list(zip(batches[b], seeds, strict=True))
                else:
                    yield batches[b]
                if left is not None:
                    left -= 1
                    if left == 0:
                        return
            epoch, start = epoch + 1, 0


class SeededItems(Dataset):
    """``dataset[index]`` computed with torch's CPU generator seeded with the item's seed.

    That generator is the one torchvision's v2 transforms, softmine's own and the
    video frame sampling draw from. The caller's generator state is restored
    afterwards, so loading an item draws nothing from the process's own stream (the
    same in a worker or the main process). ``torch.manual_seed`` is not used: it
    also seeds every accelerator backend, some 100x slower than seeding one generator.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        generator = torch.default_generator
        state = generator.get_state()
        try:
            generator.manual_seed(seed)
            return self.dataset[index]
        finally:
            generator.set_state(state)


class WholeBatches(Dataset):
    """A loader's dataset whose item is a whole batch: ``self[indices]`` is ``fetch(indices)``.

    The trainer's loader reads an in-memory training set through its ``get_batch``
    (``DataLoader(WholeBatches(...), sampler=<batches>, batch_size=None)``) in its own
    process: the images are gathered once, not cut into items and stacked again.
    """

    def __init__(self, fetch: Callable[[list[int]], tuple[Any, ...]]) -> None:
        self.fetch = fetch

    def __getitem__(self, indices: list[int]) -> tuple[Any, ...]:
        return self.fetch(indices)
