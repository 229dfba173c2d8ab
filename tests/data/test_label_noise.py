"""Label noise: exactly round(p * n) training labels flip, to another class, reproducibly; test untouched."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from softmine.config import build
from softmine.data import Digits
from softmine.data.noise import NoisyLabels, flip_labels
from softmine.data.transforms import RandomShift
from softmine.errors import ConfigError
from tests.conftest import compose


@pytest.mark.parametrize(("n", "p"), [(899, 0.1), (899, 0.4), (10, 0.25), (7, 0.5), (50, 0.0)])
def test_flips_exactly_round_p_n_labels_to_other_classes(n: int, p: float) -> None:
    labels = np.arange(n) % 4
    noisy, flipped = flip_labels(labels, p, seed=3)
    expected = {(899, 0.1): 90, (899, 0.4): 360, (10, 0.25): 2, (7, 0.5): 4, (50, 0.0): 0}[(n, p)]
    assert flipped.sum() == expected  # 89.9 -> 90, 359.6 -> 360, 2.5 -> 2 (half to even), 3.5 -> 4
    assert (noisy != labels).sum() == expected
    assert np.array_equal(noisy != labels, flipped)
    assert set(noisy.tolist()) <= set(labels.tolist())


def test_same_seed_same_flips_other_seed_other_flips() -> None:
    labels = np.repeat(np.arange(10), 90)
    a, fa = flip_labels(labels, 0.2, seed=0)
    b, fb = flip_labels(labels, 0.2, seed=0)
    c, fc = flip_labels(labels, 0.2, seed=1)
    assert np.array_equal(a, b) and np.array_equal(fa, fb)
    assert not np.array_equal(fa, fc)


def test_new_class_is_uniform_over_the_other_classes() -> None:
    labels = np.repeat(np.array([3, 7, 11, 20]), 25_000)  # non-contiguous class ids
    noisy, flipped = flip_labels(labels, 0.5, seed=0)
    for c in (3, 7, 11, 20):
        moved = noisy[flipped & (labels == c)]
        assert c not in moved
        counts = np.array([(moved == o).sum() for o in (3, 7, 11, 20) if o != c])
        assert np.allclose(counts / counts.sum(), 1 / 3, atol=0.02)


@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_fraction_outside_0_1_is_a_config_error(p: float) -> None:
    with pytest.raises(ConfigError, match="label_noise"):
        flip_labels(np.arange(10) % 2, p, seed=0)


def test_one_class_cannot_be_flipped() -> None:
    with pytest.raises(ConfigError, match="at least 2"):
        flip_labels(np.zeros(10, dtype=int), 0.1, seed=0)


def test_config_flips_training_labels_only() -> None:
    cfg = compose(["dataset.label_noise=0.3", "seed=5"])
    train = build(cfg.dataset.train, "train")
    test = build(cfg.dataset.test, "test")
    clean_train = Digits(split="train")
    clean_test = Digits(split="test")
    n = len(clean_train)
    assert len(train) == n
    assert (train.labels != clean_train.labels).sum() == round(0.3 * n)
    assert np.array_equal(train.clean_labels, clean_train.labels)
    assert np.array_equal(train.flipped, train.labels != clean_train.labels)
    # the test split is not wrapped and keeps the published labels
    assert not hasattr(test, "flipped")
    assert np.array_equal(test.labels, clean_test.labels)
    assert all(test[i][1] == clean_test.labels[i] for i in range(0, len(test), 50))
    # items carry the noisy label; the trainer's contiguity rule still holds
    i = int(np.flatnonzero(train.flipped)[0])
    assert train[i][1] == train.labels[i] != clean_train.labels[i]
    assert sorted(np.unique(train.labels)) == list(range(10))
    # the same config gives the same flips; another seed gives others
    again = build(compose(["dataset.label_noise=0.3", "seed=5"]).dataset.train, "train")
    other = build(compose(["dataset.label_noise=0.3", "seed=6"]).dataset.train, "train")
    assert np.array_equal(again.labels, train.labels)
    assert not np.array_equal(other.flipped, train.flipped)


def test_zeroshot_config_takes_label_noise_and_default_is_clean() -> None:
    train = build(
        compose(["dataset=digits_zeroshot", "dataset.label_noise=0.1"]).dataset.train, "train"
    )
    assert set(np.unique(train.clean_labels)) == {0, 1, 2, 3, 4}
    assert train.flipped.sum() == round(0.1 * len(train))
    clean = build(compose([]).dataset.train, "train")
    assert clean.flipped.sum() == 0 and np.array_equal(clean.labels, clean.clean_labels)


def test_wrapper_forwards_attributes_and_pickles() -> None:
    inner = Digits(split="train")
    wrapped = NoisyLabels(inner, fraction=0.2, seed=0)
    assert wrapped.num_classes == 10 and wrapped.protocol == "half"
    wrapped.transform = None  # reaches the wrapped dataset (used to switch augmentation off)
    assert inner.transform is None
    copy = pickle.loads(pickle.dumps(wrapped))  # DataLoader workers pickle the dataset
    assert np.array_equal(copy.labels, wrapped.labels) and copy[3][1] == wrapped[3][1]


@pytest.mark.parametrize("fraction", [0.0, 0.3])
def test_a_batched_fetch_is_the_items_one_by_one(fraction: float) -> None:
    """The DataLoader's batched fetch (``__getitems__``) of shifted, partly flipped digits:
    the same images, labels and random draws as the items fetched one by one."""
    data = NoisyLabels(Digits(transform=RandomShift(1)), fraction, seed=1)
    indices = [5, 3, 700, 5, 0, 12]
    torch.manual_seed(1)
    one_by_one, after = [data[i] for i in indices], torch.rand(3)
    torch.manual_seed(1)
    batched = data.__getitems__(indices)
    assert torch.equal(torch.rand(3), after)
    assert [y for _, y in batched] == [y for _, y in one_by_one]
    assert all(type(y) is int for _, y in batched)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(batched, one_by_one, strict=True))
