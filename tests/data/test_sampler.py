"""The P x K sampler: batch composition, epoch coverage, seeding, resumption and errors."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from scipy.stats import chisquare

from softmine.data import PKSampler
from softmine.data.run_batches import RunBatchSampler
from softmine.data.samplers import fit_pk
from softmine.errors import ConfigError


def _labels(counts: list[int]) -> np.ndarray:
    return np.concatenate([np.full(c, i) for i, c in enumerate(counts)])


def test_every_batch_has_p_classes_with_k_samples_each() -> None:
    labels = _labels([10, 7, 12, 9, 8, 11])
    s = PKSampler(labels, classes_per_batch=3, samples_per_class=4, seed=1)
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
    s = PKSampler(labels, classes_per_batch=4, samples_per_class=4, seed=0)
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
        PKSampler(_labels([5, 5, 5]), classes_per_batch=4, samples_per_class=2)


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
    with pytest.raises(ConfigError, match=r"P=sampler.classes_per_batch=5 is not divisible by N=2"):
        PKSampler(_labels([4] * 6), 5, 2, rank=0, world_size=2, split_across_ranks=True)
    PKSampler(_labels([4] * 6), 5, 2, rank=0, world_size=2)  # without the split any P works


# --- draw=uniform_classes: the authors' get_train_minibatch.m ---------------------------------

UNEVEN = [30, 8, 12, 50, 9, 20, 7, 15, 40, 10]  # class sizes; P=4, K=3: 201 // 12 = 16 batches


def _uniform(labels: np.ndarray, p: int, k: int, **kw) -> PKSampler:
    return PKSampler(labels, p, k, draw="uniform_classes", **kw)


def _many_batches(s: PKSampler, epochs: int) -> list[list[int]]:
    return [b for e in range(epochs) for b in s.rank_batches(e)]


def test_uniform_classes_draws_every_class_equally_often_whatever_its_size() -> None:
    """Chi-square on 9,600 class draws: uniform over the 10 classes (their randperm(ids, 8)),
    while the epoch draw follows the class sizes (the same test rejects it)."""
    labels = _labels(UNEVEN)
    batches = _many_batches(_uniform(labels, 4, 3, seed=123), 150)
    assert len(batches) == 150 * 16
    counts = np.bincount(labels[np.array(batches)[:, ::3]].ravel(), minlength=10)
    assert chisquare(counts).pvalue > 0.001, counts
    epochs = np.array(_many_batches(PKSampler(labels, 4, 3, seed=123), 150))
    by_size = np.bincount(labels[epochs[:, ::3]].ravel(), minlength=10)
    assert chisquare(by_size).pvalue < 1e-6, by_size


def test_uniform_classes_batches_are_p_classes_of_k_distinct_items() -> None:
    labels = _labels(UNEVEN)
    batches = _many_batches(_uniform(labels, 4, 3, seed=1), 40)
    for b in batches:
        blocks = np.array(b).reshape(4, 3)  # K-groups one after another
        assert len(set(labels[blocks[:, 0]].tolist())) == 4  # P distinct classes
        assert all(len(set(labels[g].tolist())) == 1 for g in blocks)  # one class per group
        assert all(len(set(g.tolist())) == 3 for g in blocks)  # K distinct items
    # within a class every item is equally likely (randperm(len, K)): the 50-item class
    flat = np.concatenate(batches)
    biggest = flat[labels[flat] == 3]
    per_item = np.bincount(biggest, minlength=len(labels))[labels == 3]
    assert chisquare(per_item).pvalue > 0.001, per_item


def test_uniform_classes_cycles_a_small_class_by_their_mod_rule() -> None:
    """A class of 3 items with K=7: mod(randperm(7), 3) + 1 takes items 2, 3, 1, 2, 3, 1, 2 in
    some order, so its second item (in data order) comes 3 times and the others twice."""
    labels = np.array([1, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0] + [2] * 7)  # class 1: items 0, 2, 5
    with pytest.raises(ConfigError, match="fewer than K=7"):
        _uniform(labels, 2, 7)
    s = _uniform(labels, 2, 7, seed=0, allow_replacement=True)
    seen = 0
    for b in _many_batches(s, 20):
        got = Counter(i for i in b if labels[i] == 1)
        if got:
            assert got == {0: 2, 2: 3, 5: 2}, got
            seen += 1
    assert seen > 10


def test_uniform_classes_independent_draws_may_repeat_an_item() -> None:
    """within_class=independent (their MARS randperm(len, 1) per slot): 2 tracklets an
    identity, K=2: the same tracklet comes twice in about half of the groups."""
    labels = _labels([2] * 30)
    with pytest.raises(ConfigError, match="fewer than K=3"):
        _uniform(labels, 3, 3)  # distinct items need allow_replacement for a class of 2
    s = _uniform(labels, 3, 2, seed=4, within_class="independent")
    groups = np.array(_many_batches(s, 40)).reshape(-1, 2)
    assert (labels[groups[:, 0]] == labels[groups[:, 1]]).all()
    repeats = (groups[:, 0] == groups[:, 1]).mean()
    assert 0.4 < repeats < 0.6, repeats
    _uniform(labels, 3, 3, within_class="independent")  # K > class size is fine here


def test_uniform_classes_replays_from_the_seed_and_resumes_part_way() -> None:
    labels = _labels(UNEVEN)
    a, b = _uniform(labels, 4, 3, seed=7), _uniform(labels, 4, 3, seed=7)
    assert len(a) == 16 and list(a) == list(b)
    a.set_epoch(3)
    full = list(a)
    assert full != list(b)  # another epoch, other batches
    a.set_epoch(3, start_batch=5)
    assert len(a) == 11 and list(a) == full[5:]
    assert list(_uniform(labels, 4, 3, seed=8)) != list(b)
    run = RunBatchSampler(_uniform(labels, 4, 3, seed=7), seed=7)
    run.start_at(2, 10, max_batches=20)
    assert list(run) == (a.rank_batches(2)[10:] + a.rank_batches(3))[:20]


def test_uniform_classes_split_across_ranks_rebuilds_the_one_process_batch() -> None:
    labels = _labels(UNEVEN)
    one = _uniform(labels, 4, 3, seed=5)
    ranks = [
        _uniform(labels, 4, 3, seed=5, rank=r, world_size=2, split_across_ranks=True)
        for r in range(2)
    ]
    shares = [s.rank_batches(1) for s in ranks]
    assert [x + y for x, y in zip(*shares, strict=True)] == one.rank_batches(1)
    whole = [_uniform(labels, 4, 3, seed=5, rank=r, world_size=2) for r in range(2)]
    assert len(whole[0]) == len(whole[1]) == 8  # every other batch of the 16


def test_bad_draw_settings_are_config_errors() -> None:
    labels = _labels([4] * 4)
    with pytest.raises(ConfigError, match="sampler.draw must be one of"):
        PKSampler(labels, 2, 2, draw="uniform")
    with pytest.raises(ConfigError, match="needs sampler.draw=uniform_classes"):
        PKSampler(labels, 2, 2, within_class="independent")


# ------------------------------------------------------------- auto P x K (sampler=pk_auto)


@pytest.mark.parametrize(
    ("counts", "want"),
    [
        ([8] * 10, (8, 8)),  # 10 classes of 8 or more: the 8 x 8 of sampler=pk
        ([30] * 10, (8, 8)),  # K at most 8
        ([3] * 200, (21, 3)),  # small classes: K = 3, P = 64 // 3
        ([5, 9, 2, 7], (4, 2)),  # the smallest class sets K; P at most the classes
        ([40, 40], (2, 8)),
    ],
)
def test_fit_pk_follows_its_rule(counts: list[int], want: tuple[int, int]) -> None:
    assert fit_pk(np.array(counts)) == want
    p, k = want
    assert k == max(2, min(8, min(counts))) and p == min(len(counts), 64 // k)


def test_auto_sizes_the_sampler_from_its_labels_and_a_number_fixes_one_side() -> None:
    labels = np.repeat(np.arange(10), 5)  # 10 classes of 5
    assert (PKSampler(labels, "auto", "auto").P, PKSampler(labels, "auto", "auto").K) == (10, 5)
    fixed_k = PKSampler(labels, "auto", 4)
    assert (fixed_k.P, fixed_k.K) == (10, 4)
    fixed_p = PKSampler(labels, 3, "auto")
    assert (fixed_p.P, fixed_p.K) == (3, 5)
    batches = list(PKSampler(labels, "auto", "auto"))
    assert batches and all(len(b) == 50 for b in batches)


def test_auto_is_the_only_word_and_a_class_of_one_is_still_an_error() -> None:
    with pytest.raises(ConfigError, match="whole number or auto"):
        PKSampler(np.repeat(np.arange(4), 4), "many", 2)
    with pytest.raises(ConfigError, match="fewer than K=2"):
        PKSampler(np.array([0, 0, 1, 2, 2]), "auto", "auto")
