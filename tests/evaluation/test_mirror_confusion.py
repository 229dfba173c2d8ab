"""Mirror confusion: the share of top-R retrieval mistakes that are the query's mirrored class (issue 23)."""

from __future__ import annotations

import numpy as np
import pytest

from softmine.data.datasets.digits_pairs import DigitsPairs
from softmine.evaluation import mirror_confusion, partner_confusion


def test_partner_mistakes_are_counted_among_the_first_r_only() -> None:
    # worked by hand: query 0 (R=2) sees 12 (right) and 21 (its mirror: a partner mistake);
    # query 1 (R=1) sees 21 (right; the 12s after it are beyond R); query 2 (R=3) sees
    # 30, 30 (right) and 12 (a mistake, not its partner). 1 partner mistake of 2.
    neighbours = np.array([[12, 21, 30], [21, 12, 12], [30, 30, 12]])
    assert partner_confusion(neighbours, np.array([12, 21, 30]), np.array([2, 1, 3]),
                             np.array([21, 12, -1])) == (1, 2)  # fmt: skip


def test_a_class_that_is_its_own_mirror_never_counts_as_confused() -> None:
    # (a, a) mirrored is (a, a): its neighbours of its own class are right, not mistakes
    assert partner_confusion(np.array([[11, 11]]), np.array([11]), np.array([2]),
                             np.array([11])) == (0, 0)  # fmt: skip


def _unit(degrees: list[float]) -> np.ndarray:
    rad = np.deg2rad(degrees)
    return np.stack([np.cos(rad), np.sin(rad)], axis=1).astype(np.float32)


def test_leave_one_out_search_worked_by_hand() -> None:
    # two items per class (R = 1): 12 at 0 and 8 degrees, 21 at 20 and 90, 30 at 100 and 190.
    # Nearest other item: 0 -> 8 (right), 8 -> 0 (right), 20 -> 8 (class 12: the mirror of
    # 21), 90 -> 100 (class 30: a mistake, not the mirror), 100 -> 90 (class 21: mistake, 30's
    # mirror 03 is not in the set), 190 -> 100 (right). One mirror mistake of three.
    x = _unit([0, 8, 20, 90, 100, 190])
    labels = np.array([12, 12, 21, 21, 30, 30])
    partner = np.array([21, 21, 12, 12, -1, -1])
    assert mirror_confusion(x, labels, partner) == pytest.approx(1 / 3)
    assert mirror_confusion(_unit([0, 8, 90, 98]), [12, 12, 21, 21], [21, 21, 12, 12]) == 0.0


def test_digits_pairs_mirror_labels() -> None:
    test = DigitsPairs(split="test", per_class=2)
    mirror = test.mirror_labels(test.labels)
    for code, m in zip(test.labels, mirror, strict=True):
        want = 10 * (code % 10) + code // 10
        assert m == (want if want in set(test.classes) else -1)
    train = DigitsPairs(split="train", per_class=2)
    codes = train.classes[train.labels]  # training labels index the sorted pair codes
    mirror = train.mirror_labels(train.labels)
    for code, m in zip(codes, mirror, strict=True):
        want = 10 * (code % 10) + code // 10
        assert (train.classes[m] == want) if m >= 0 else want not in set(train.classes)
