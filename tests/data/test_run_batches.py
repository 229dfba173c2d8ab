"""One loader iterator per run (RunBatchSampler) and per-item augmentation seeds (SeededItems).

Expected batches are the per-epoch P x K sampler's own (``set_epoch(e, start_batch)``),
chained by hand; the training checks compare the pixels the trainer is handed by an
uninterrupted run with those of a run stopped mid-epoch and resumed, and with
``num_workers`` 0 and 2, on a fake CUB with random resized crops and flips.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from softmine.data import PKSampler
from softmine.data.run_batches import RunBatchSampler, SeededItems, item_seeds
from softmine.engine import Trainer
from softmine.testing.fakes import make_cub
from tests.conftest import FAST_CUB, compose

LABELS = np.repeat(np.arange(5), [12, 2, 2, 2, 4])  # unequal classes: epochs differ in length


def _by_hand(sampler: PKSampler, epoch: int, start: int, count: int) -> list[list[int]]:
    """``count`` batches from batch ``start`` of ``epoch`` on, one epoch after another."""
    out: list[list[int]] = []
    while len(out) < count:
        sampler.set_epoch(epoch, start_batch=start)
        out += list(sampler)
        epoch, start = epoch + 1, 0
    return out[:count]


@pytest.mark.parametrize("rank,world,split", [(0, 1, False), (1, 2, False), (1, 2, True)])
def test_run_batches_chain_the_epochs_from_the_start_batch(
    rank: int, world: int, split: bool
) -> None:
    sampler = PKSampler(LABELS, 2, 2, seed=3, rank=rank, world_size=world, split_across_ranks=split)
    lengths = [len(sampler.rank_batches(e)) for e in range(6)]
    if world == 1 or split:  # the unequal classes give epochs of unequal length
        assert len(set(lengths)) > 1
    run = RunBatchSampler(PKSampler(LABELS, 2, 2, 3, False, rank, world, split), seed=3)
    run.start_at(1, 2, max_batches=3 * max(lengths))
    assert list(run) == _by_hand(sampler, 1, 2, 3 * max(lengths))
    run.start_at(1, 2, end_epoch=4)  # the rest of epoch 1, then epochs 2 and 3 whole
    assert list(run) == _by_hand(sampler, 1, 2, lengths[1] - 2 + lengths[2] + lengths[3])
    run.start_at(2, 0, max_batches=5, end_epoch=3)  # whichever limit comes first
    assert len(list(run)) == min(5, lengths[2])


def test_item_seeds_depend_on_run_seed_rank_epoch_and_position_only() -> None:
    sampler = PKSampler(LABELS, 2, 2, seed=0)
    run = RunBatchSampler(sampler, seed=7, rank=0, seed_items=True)
    run.start_at(0, 0, max_batches=len(sampler.rank_batches(0)) + 2)
    batches = list(run)
    first_of_epoch_1 = batches[len(sampler.rank_batches(0))]
    assert [i for i, _ in first_of_epoch_1] == sampler.rank_batches(1)[0]
    assert [s for _, s in first_of_epoch_1] == item_seeds(7, 0, 1, 0, 4)
    run.start_at(1, 1, max_batches=1)  # resumed at batch 1 of epoch 1: the same pairs
    assert list(run) == [batches[len(sampler.rank_batches(0)) + 1]]
    seeds = [s for b in batches for _, s in b]
    assert len(set(seeds)) == len(seeds)  # every item of the run its own stream
    assert item_seeds(7, 1, 1, 0, 4) != item_seeds(7, 0, 1, 0, 4)  # ranks differ
    assert item_seeds(8, 0, 1, 0, 4) != item_seeds(7, 0, 1, 0, 4)  # run seeds differ


class _Noise(torch.utils.data.Dataset):
    """Item ``i`` is ``i`` and two draws from torch's generator."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.cat([torch.tensor([float(i)]), torch.rand(2, dtype=torch.float64)])


def test_seeded_items_draw_from_the_item_seed_and_leave_the_caller_stream_alone() -> None:
    items = SeededItems(_Noise())
    a, again, other = items[(2, 11)], items[(2, 11)], items[(2, 12)]
    assert torch.equal(a, again) and a[0] == 2
    assert not torch.equal(a[1:], other[1:])
    torch.manual_seed(11)
    assert torch.equal(a[1:], torch.rand(2, dtype=torch.float64))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    items[(1, 5)]
    assert torch.equal(torch.rand(3), expected)  # nothing drawn from the caller's stream


def test_seeded_items_give_the_same_pixels_in_workers_and_in_process(tmp_path: Path) -> None:
    from softmine.data import CUB200

    root = make_cub(tmp_path / "CUB_200_2011", num_classes=4, images_per_class=3, size=16)
    augment = v2.Compose(
        [v2.ToImage(), v2.RandomResizedCrop(8, scale=(0.2, 1.0)), v2.RandomHorizontalFlip()]
    )
    items = SeededItems(CUB200(root, "train", transform=augment))
    keys = [[(i, 100 + i)] for i in range(6)] * 2
    got = [
        torch.cat([x for x, _ in DataLoader(items, batch_sampler=keys, num_workers=n)])
        for n in (0, 2)
    ]
    assert torch.equal(got[0], got[1])
    assert torch.equal(got[0][:6], got[0][6:])  # the same seed, the same crop and flip
    redrawn = [items[(i, 200 + i)][0] for i in range(6)]
    assert not torch.equal(got[0][:6], torch.stack(redrawn))  # the crops are random


# ------------------------------------------------------------------ the trainer's loop

MAX_ITERS = 11


def _image_run(root: Path, workers: int, *extra: str) -> list[str]:
    return [
        *FAST_CUB,
        f"dataset.root={root}",
        f"trainer.max_iters={MAX_ITERS}",
        f"trainer.num_workers={workers}",
        "dataset.transform.resize=16",
        "dataset.transform.crop_size=12",
        "dataset.transform.scale=[0.2,1.0]",
        *extra,
    ]


class _Stop(Exception):
    pass


def _pixels(
    root: Path,
    run_dir: Path,
    workers: int,
    monkeypatch: pytest.MonkeyPatch,
    *extra: str,
    stop_before: int | None = None,
) -> tuple[list[torch.Tensor], int, Trainer]:
    """The image batches the trainer trains on, and how many train-loader iterators it made."""
    trainer = Trainer(compose(_image_run(root, workers, *extra)), run_dir)
    seen: list[torch.Tensor] = []
    made = [0]
    step = trainer.train_step

    def record(x: torch.Tensor, y: torch.Tensor) -> dict:
        if len(seen) + 1 == stop_before:
            raise _Stop
        seen.append(x.clone())
        return step(x, y)

    original_iter = DataLoader.__iter__

    def counted(self: DataLoader):  # noqa: ANN202
        made[0] += self is trainer.loader
        return original_iter(self)

    monkeypatch.setattr(trainer, "train_step", record)
    monkeypatch.setattr(DataLoader, "__iter__", counted)
    try:
        trainer.fit()
    except _Stop:
        pass
    monkeypatch.setattr(DataLoader, "__iter__", original_iter)
    return seen, made[0], trainer


@pytest.mark.slow
def test_one_loader_iterator_and_exact_resume_mid_epoch_with_random_crops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_cub(tmp_path / "CUB_200_2011", num_classes=8, images_per_class=6, size=16)
    full, made, trainer = _pixels(root, tmp_path / "full", 2, monkeypatch)
    lengths = [len(trainer.sampler.rank_batches(e)) for e in range(4)]
    assert sum(lengths[:2]) < MAX_ITERS  # the run crosses two epoch boundaries
    assert len(full) == MAX_ITERS and made == 1  # one iterator for the whole run
    assert trainer.state.epoch == 3 and trainer.state.step == MAX_ITERS

    stop = lengths[0] + 2  # mid-epoch 2: a checkpoint there, then a crash
    first, _, _ = _pixels(
        root, tmp_path / "cut", 2, monkeypatch, f"trainer.checkpoint_every={stop}",
        stop_before=stop + 1,
    )  # fmt: skip
    rest, made, _ = _pixels(
        root, tmp_path / "cut", 2, monkeypatch, f"trainer.checkpoint_every={stop}", "resume=true"
    )
    assert len(first) == stop and made == 1
    resumed = first + rest
    assert len(resumed) == MAX_ITERS
    for a, b in zip(full, resumed, strict=True):
        assert torch.equal(a, b)

    in_process, made, _ = _pixels(root, tmp_path / "w0", 0, monkeypatch)
    assert made == 1
    for a, b in zip(full, in_process, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fraction", [0.0, 0.3])
def test_an_in_memory_batch_is_its_items_collated(fraction: float) -> None:
    """``get_batch`` of shifted, partly flipped digits: the same images, labels and random
    draws as ``default_collate`` of the items fetched one by one."""
    from torch.utils.data import default_collate

    from softmine.data import Digits
    from softmine.data.noise import NoisyLabels
    from softmine.data.transforms import RandomShift

    data = NoisyLabels(Digits(transform=RandomShift(1)), fraction, seed=1)
    indices = [5, 3, 700, 5, 0, 12]
    torch.manual_seed(1)
    x1, y1 = default_collate([data[i] for i in indices])
    after = torch.rand(3)
    torch.manual_seed(1)
    x2, y2 = data.get_batch(indices)
    assert torch.equal(torch.rand(3), after)
    assert torch.equal(x2, x1) and torch.equal(y2, y1) and y2.dtype == torch.long
    assert fraction == 0 or not torch.equal(y2, torch.as_tensor(data.clean_labels[indices]))


def test_a_view_that_maps_indices_has_no_batched_fetch_of_its_own() -> None:
    """A class subset's items are other indices of the wrapped set: its ``get_batch`` must not
    be the wrapped set's (forwarded, it would fetch the wrong images)."""
    from softmine.data import Digits
    from softmine.data.noise import NoisyLabels
    from softmine.data.splits import ClassSubset

    digits = Digits()
    assert callable(digits.get_batch)
    assert ClassSubset(digits, np.array([3, 4])).get_batch is None
    assert NoisyLabels(ClassSubset(digits, np.array([3, 4]))).get_batch is None


def test_the_trainer_reads_an_in_memory_set_a_batch_at_a_time_and_sees_the_same_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The digits loader fetches whole batches (``WholeBatches``); the batches, shifts and
    labels are those of the item-by-item loader (a set without ``get_batch``)."""
    from softmine.data.noise import NoisyLabels
    from softmine.data.run_batches import WholeBatches

    cfg = compose(["dataset.label_noise=0.2", "trainer.plots=false"])

    def first_batches(run: str) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], object]:
        t = Trainer(cfg, tmp_path / run)
        torch.manual_seed(0)
        return [b for _, b in zip(range(3), t.loader, strict=False)], t.loader.dataset

    whole, dataset = first_batches("whole")
    assert isinstance(dataset, WholeBatches)
    monkeypatch.setattr(NoisyLabels, "get_batch", None)
    items, dataset = first_batches("items")
    assert not isinstance(dataset, WholeBatches)
    for (x1, y1), (x2, y2) in zip(whole, items, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
