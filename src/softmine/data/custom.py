"""Your own data: how class names become ids and how one collection is split into train and test.

Shared by :class:`~softmine.data.datasets.imagefolder.ImageFolder` and the CSV lists of
:mod:`softmine.data.datasets.csvlist`, so both number classes and split them the same way.

Ids (:func:`number_names`): a class is its name, and distinct names are distinct
classes. When every class name is an integer (``0``, ``17``, ``-1``) and no two
names are the same number, the id *is* that integer, so 0-based and 1-based
identities keep their values (what ``dataset.junk_pids`` /
``dataset.distractor_pids`` and the re-ID evaluation see); otherwise (other names,
or ``1`` beside ``01``) classes are numbered ``0..C-1`` in natural sort order of
their names (``class2`` before ``class10``; ``01`` before ``1``). Training labels
are always remapped to ``0..C-1`` by the dataset, and it keeps every name
(``class_names``) for messages, reports and saved embeddings.

Train/test (:func:`held_out`), when the data do not say it themselves:

* ``split_by=images`` (default): the same classes in both sets; ``test_ratio`` of
  each class's images (rounded half to even, so a class of one image trains)
  go to test, chosen with the fixed ``split_seed`` (like the digits ``half``
  protocol);
* ``split_by=classes``: the zero-shot protocol of CUB-200-2011 and Cars196: whole
  classes test, never seen in training: the classes named in ``test_classes``, or
  else the last ``round(test_ratio * C)`` classes in id order (0.5: the second
  half, as for CUB/Cars).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np

from softmine.data.sources import natural_key
from softmine.errors import ConfigError

SPLIT_BY = ("images", "classes")
_INTEGER = re.compile(r"-?[0-9]+")


def number_names(names: Iterable[str]) -> dict[str, int]:
    """Class name -> id, one id per distinct name (module docstring).

    The integer itself when every name is an integer and no two are the same number
    (``1`` and ``01`` are two classes, so they are numbered instead); else the rank
    of the name in natural sort order.
    """
    unique = sorted(set(names), key=natural_key)
    values = {int(n) for n in unique if _INTEGER.fullmatch(n)}
    if unique and len(values) == len(unique):
        return {n: int(n) for n in unique}
    return {n: i for i, n in enumerate(unique)}


def check_split_options(split_by: str, test_ratio: float) -> None:
    if split_by not in SPLIT_BY:
        raise ConfigError(f"dataset.split_by must be one of {SPLIT_BY}, got {split_by!r}")
    if not 0.0 < float(test_ratio) < 1.0:
        raise ConfigError(
            f"dataset.test_ratio must lie strictly between 0 and 1 (got {test_ratio}); it is the "
            "fraction of images (split_by=images) or classes (split_by=classes) that test"
        )


def held_out(
    ids: Sequence[int],
    split_by: str = "images",
    test_classes: Sequence[str] | None = None,
    test_ratio: float = 0.5,
    split_seed: int = 0,
    numbering: dict[str, int] | None = None,
) -> np.ndarray:
    """(n,) bool: which of the items with class ``ids`` go to test (module docstring rules).

    ``test_classes`` are class *names*, looked up in ``numbering`` (name -> id).
    """
    check_split_options(split_by, test_ratio)
    ids = np.asarray(ids, dtype=np.int64)
    classes = np.unique(ids)
    if split_by == "classes":
        if test_classes is not None:
            numbering = numbering or {}
            names = [str(c) for c in test_classes]
            unknown = [n for n in names if n not in numbering]
            if unknown:
                raise ConfigError(
                    f"dataset.test_classes names {len(unknown)} class(es) not in the data, e.g. "
                    f"{unknown[0]!r}; the classes are e.g. {sorted(numbering, key=natural_key)[:5]}"
                )
            chosen = np.asarray([numbering[n] for n in names], dtype=np.int64)
        else:
            count = round(float(test_ratio) * len(classes))
            chosen = classes[len(classes) - count :] if count else classes[:0]
        if len(np.unique(chosen)) in (0, len(classes)):
            raise ConfigError(
                f"the class split leaves {'no' if len(chosen) == 0 else 'every'} class for test "
                f"({len(classes)} classes); change dataset.test_ratio or dataset.test_classes"
            )
        return np.isin(ids, chosen)
    rng = np.random.default_rng(int(split_seed))
    is_test = np.zeros(len(ids), dtype=bool)
    order = np.argsort(ids, kind="stable")
    bounds = np.cumsum(np.bincount(np.searchsorted(classes, ids), minlength=len(classes)))
    for members in np.split(order, bounds[:-1]):
        count = round(float(test_ratio) * len(members))
        is_test[rng.permutation(members)[:count]] = True
    return is_test
