"""The P x K sampler: batch composition, epoch coverage, seeding, resumption and errors."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from softmine.data import PKSampler
from softmine.errors import ConfigError


def _labels(counts: list[int]) -> np.ndarray:
    return np.concatenate([np.full(c, i) for i, c in enumerate(counts)])


def test_every_batch_has_p_classes_with_k_samples_each() -> None:
    labels = _labels([10, 7, 12, 9, 8, 11])
    s = PKSampler(labels, num_classes=3, num_samples=4, seed=1)
    batches = list(s)
    assert batches, "an epoch must yield batches"
    for b in batches:
        assert len(b) == 12
        counts = Counter(labels[b].tolist())
        assert len(counts) == 3 and set(counts.values()) == {4}
        # K distinct samples per class when the class has >= K items
        assert len(set(b)) == 12


def test_epoch_sees_most_samples_and_batches_match_len() -> None:
    labels = _labels([16] * 8)
    s = PKSampler(labels, num_classes=4, num_samples=4, seed=0)
    batches = list(s)
    assert len(batches) == len(s) == 8  # 8 classes x 4 chunks each / 4 per batch
    seen = set(np.concatenate(batches).tolist())
    assert seen == set(range(len(labels)))  # equal-size classes: every sample exactly once
    assert sum(len(b) for b in batches) == len(labels)


def test_same_seed_same_epoch_is_identical_and_epochs_differ() -> None:
    labels = _labels([9, 9, 9, 9, 9])
    a = PKSampler(labels, 2, 3, seed=7)
    b = PKSampler(labels, 2, 3, seed=7)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    c = PKSampler(labels, 2, 3, seed=8)
    assert list(c) != list(b)


def test_resume_part_way_through_an_epoch() -> None:
    labels = _labels([8] * 6)
    s = PKSampler(labels, 2, 4, seed=3)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start_batch=2)
    assert list(s) == full[2:]


def test_ranks_get_disjoint_equal_shares() -> None:
    labels = _labels([8] * 8)
    r0 = list(PKSampler(labels, 2, 4, seed=0, rank=0, world_size=2))
    r1 = list(PKSampler(labels, 2, 4, seed=0, rank=1, world_size=2))
    assert len(r0) == len(r1) > 0
    assert not set(map(tuple, r0)) & set(map(tuple, r1))


def test_too_few_classes_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="larger than the 3 classes"):
        PKSampler(_labels([5, 5, 5]), num_classes=4, num_samples=2)


def test_class_smaller_than_k_is_an_error_unless_replacement_allowed() -> None:
    labels = _labels([6, 2, 6])
    with pytest.raises(ConfigError, match="fewer than K=4"):
        PKSampler(labels, 2, 4)
    s = PKSampler(labels, 2, 4, allow_replacement=True)
    for b in s:
        assert set(Counter(labels[b].tolist()).values()) == {4}


def test_k_of_one_is_rejected() -> None:
    with pytest.raises(ConfigError, match="no positive pair"):
        PKSampler(_labels([4, 4]), 2, 1)


@pytest.mark.parametrize("world", [2, 4])
def test_split_across_ranks_shares_whole_classes_of_the_one_process_batches(world: int) -> None:
    labels = _labels([9, 12, 7, 10, 8, 11, 9, 10])
    one = PKSampler(labels, 4, 3, seed=5)
    ranks = [
        PKSampler(labels, 4, 3, seed=5, rank=r, world_size=world, split_across_ranks=True)
        for r in range(world)
    ]
    for epoch in (0, 3):
        for s in (one, *ranks):
            s.set_epoch(epoch)
        batches = list(one)
        shares = [list(s) for s in ranks]
        assert all(len(s) == len(one) == len(batches) > 0 for s in ranks)
        for i, batch in enumerate(batches):
            parts = [share[i] for share in shares]
            assert [j for p in parts for j in p] == batch  # rank order rebuilds the batch
            classes = [set(labels[p].tolist()) for p in parts]
            for p, c in zip(parts, classes, strict=True):
                assert len(p) == 4 // world * 3  # P/N classes x K
                assert set(Counter(labels[p].tolist()).values()) == {3}  # whole K-groups
                assert len(c) == 4 // world
            assert len(set().union(*classes)) == 4  # no class is split between ranks


def test_split_across_ranks_resumes_part_way() -> None:
    labels = _labels([8] * 6)
    s = PKSampler(labels, 2, 4, seed=3, rank=1, world_size=2, split_across_ranks=True)
    s.set_epoch(1)
    full = list(s)
    s.set_epoch(1, start_batch=2)
    assert len(s) == len(full) - 2
    assert list(s) == full[2:]


def test_split_across_ranks_in_one_process_is_the_plain_sampler() -> None:
    labels = _labels([6, 7, 8, 9])
    assert list(PKSampler(labels, 2, 3, seed=1, split_across_ranks=True)) == list(
        PKSampler(labels, 2, 3, seed=1)
    )


def test_split_across_ranks_needs_p_divisible_by_the_ranks() -> None:
    with pytest.raises(ConfigError, match=r"P=sampler.num_classes=5 is not divisible by N=2"):
        PKSampler(_labels([4] * 6), 5, 2, rank=0, world_size=2, split_across_ranks=True)
    PKSampler(_labels([4] * 6), 5, 2, rank=0, world_size=2)  # without the split any P works
