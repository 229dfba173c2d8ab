"""digits_pairs: 100 classes of two digits side by side, 50/50 class-disjoint, disjoint digit images."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from softmine.config import build
from softmine.data.datasets.digits_pairs import DigitsPairs
from softmine.errors import ConfigError
from tests.conftest import REPO, compose


@pytest.fixture(scope="module")
def pairs() -> tuple[DigitsPairs, DigitsPairs]:
    return DigitsPairs(split="train", per_class=30), DigitsPairs(split="test", per_class=30)


def test_classes_are_fifty_fifty_and_disjoint(pairs) -> None:
    train, test = pairs
    train_codes, test_codes = set(train.pair_codes.tolist()), set(test.pair_codes.tolist())
    assert len(train_codes) == len(test_codes) == 50
    assert not train_codes & test_codes
    assert train_codes | test_codes == set(range(100))
    assert sorted(set(train.labels.tolist())) == list(range(50))  # what the loss needs
    assert set(test.labels.tolist()) == test_codes
    assert len(train) == len(test) == 50 * 30


def test_test_digit_images_never_appear_in_training_pairs(pairs) -> None:
    train, test = pairs
    used_train = set(train.left.tolist()) | set(train.right.tolist())
    used_test = set(test.left.tolist()) | set(test.right.tolist())
    assert not used_train & used_test


def test_images_are_the_two_digits_side_by_side(pairs) -> None:
    bunch = load_digits()
    for data in pairs:
        for i in (0, 17, len(data) - 1):
            x, label = data[i]
            assert x.shape == (1, 8, 16)
            left, right = bunch.images[data.left[i]] / 16.0, bunch.images[data.right[i]] / 16.0
            want = torch.from_numpy(np.concatenate([left, right], axis=1)).float()
            assert torch.equal(x[0], want)
            code = 10 * bunch.target[data.left[i]] + bunch.target[data.right[i]]
            assert data.pair_codes[i] == code
        combos = set(zip(data.left.tolist(), data.right.tolist(), strict=True))
        assert len(combos) == len(data)  # no image repeated within the split


def test_fixed_by_the_split_seed(pairs) -> None:
    again = DigitsPairs(split="train", per_class=30)
    assert np.array_equal(again.left, pairs[0].left)
    assert np.array_equal(again.right, pairs[0].right)
    other = DigitsPairs(split="train", per_class=30, split_seed=1)
    assert set(other.pair_codes.tolist()) != set(pairs[0].pair_codes.tolist())


def test_config_builds_both_splits() -> None:
    cfg = compose(["dataset=digits_pairs"])
    train, test = build(cfg.dataset.train, "train"), build(cfg.dataset.test, "test")
    assert len(train) == len(test) == 50 * int(cfg.dataset.per_class)
    assert train.transform is not None and test.transform is None


def test_too_many_images_per_class_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="per_class"):
        DigitsPairs(per_class=100_000)


@pytest.mark.parametrize("target", ["ablation", "noise"])
def test_make_targets_take_the_dataset(target: str) -> None:
    def dry_run(*extra: str) -> str:
        cmd = ["make", "-n", "-o", "setup", "-C", str(REPO), target, *extra]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        return res.stdout

    # on digits_pairs `make noise` trains each loss with its tuned setting (experiment=noise_fair)
    on_pairs = "noise_fair" if target == "noise" else target
    assert f"experiment={on_pairs} dataset=digits_pairs" in dry_run("DATASET=digits_pairs")
    assert f"experiment={target} dataset=digits " in dry_run()  # the default stays digits


def test_augmentation_is_off_by_default_and_one_key_turns_it_on() -> None:
    # issue 23: the 1-pixel zero-filled shift cut ink off 8 x 8 digits and moved the seam
    cfg = compose(["dataset=digits_pairs", "dataset.per_class=2"])
    train = build(cfg.dataset.train, "train")
    plain = DigitsPairs(split="train", per_class=2)
    torch.manual_seed(0)
    assert all(torch.equal(train[i][0], plain.images[i]) for i in range(len(train)))
    on = compose(
        [
            "dataset=digits_pairs",
            "dataset.per_class=2",
            "dataset.train.dataset.transform.max_shift=1",
        ]
    )
    shifted = build(on.dataset.train, "train")
    torch.manual_seed(0)
    assert any(not torch.equal(shifted[i][0], plain.images[i]) for i in range(len(shifted)))


@pytest.mark.slow
def test_held_out_classes_use_digit_images_no_training_pair_uses() -> None:
    from softmine.data.splits import build_train_and_validation

    cfg = compose(["dataset=digits_pairs", "dataset.per_class=20", "dataset.val_classes=10"])
    train, val = build_train_and_validation(cfg.dataset)
    raw = train.dataset  # DigitsPairs under the class subset
    kept = train.index
    held = val.test.index
    assert len(held) == 10 * 20 and len(kept) == 40 * 20
    images = lambda idx: set(raw.left[idx].tolist()) | set(raw.right[idx].tolist())  # noqa: E731
    assert not images(kept) & images(held)
    test = build(cfg.dataset.test, "test")
    assert not (images(kept) | images(held)) & (set(test.left.tolist()) | set(test.right.tolist()))
    # without held-out classes the set is what it always was
    plain = build(compose(["dataset=digits_pairs", "dataset.per_class=20"]).dataset.train, "t")
    assert np.array_equal(plain.dataset.left, DigitsPairs(split="train", per_class=20).left)
