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
