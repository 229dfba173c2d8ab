"""The metric vocabulary: names, display order, prefixes and which metric is the main one.

Every evaluation reports flat names (``recall@1``, ``map@r``, ``cmc@5``, ``mAP``, ...);
a prefix says which split or which snapshot a value belongs to (``val/map@r``,
``selected/map@r``). The trainer, the evaluation log, ``metrics.json``, the reports,
the plots and the scripts take these names from here, so that they agree.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

# ----------------------------------------------------------------------------- names

RECALL = "recall@"  # recall@K: a query's K nearest items hold one of its class (K in evaluation.ks)
CMC = "cmc@"  # cmc@R: re-ID rank-R accuracy
PRECISION = "precision@"  # precision@K
MAP_AT_R = "map@r"  # MAP@R (Musgrave et al. 2020)
R_PRECISION = "r_precision"
NMI = "nmi"
MAP = "mAP"  # re-ID mean average precision
ATTENTION_AUC = "attention_auc"  # under label noise: how well attention separates flipped labels

#: Metric families in display order: Recall@K, CMC and Precision@K (each by K), MAP@R,
#: R-Precision, mAP, NMI, attention AUC; any other name comes after them.
FAMILIES = (RECALL, CMC, PRECISION, MAP_AT_R, R_PRECISION, MAP, NMI, ATTENTION_AUC)
#: The exact names of metrics (a family with its K where it has one), not bookkeeping columns.
METRIC_PATTERN = re.compile(
    r"^((recall|cmc|precision)@\d+|map@r|r_precision|nmi|mAP|attention_auc)$"
)
#: How tables title a metric family.
LABELS = {RECALL: "R@", CMC: "CMC@", MAP_AT_R: "MAP@R", R_PRECISION: "R-Precision", NMI: "NMI"}

# ----------------------------------------------------------------------------- prefixes

VAL_PREFIX = "val/"  # the validation split (held-out training classes)
TEST_PREFIX = "test/"  # accepted in trainer.monitor for the test split's plain names
SELECTED_PREFIX = "selected/"  # test metrics of the snapshot chosen on the validation split
BEST_TEST_PREFIX = "best_test/"  # test metrics of the snapshot chosen on the test split
CONCAT_PREFIX = "concat/"  # test metrics of the K fold models' concatenated embeddings
RERANK_PREFIX = "rerank/"  # re-ID metrics after k-reciprocal re-ranking
DROPPED_PREFIX = "dropped_items/"  # evaluation items left out as unreadable, per split
FINAL_PREFIX = "final/"  # MLflow's name for the values of metrics.json
#: Where a snapshot's step is kept beside its metrics, per snapshot prefix.
SELECTED_STEP = "selected_iteration"
BEST_TEST_STEP = "best_test_iteration"

#: The prefixes of one run's test metrics, in table order: final test, validation,
#: validation-chosen, test-chosen, the folds together.
PREFIXES = ("", VAL_PREFIX, SELECTED_PREFIX, BEST_TEST_PREFIX, CONCAT_PREFIX)

# ----------------------------------------------------------------------------- the main metric

#: The main metric is the first of these that a run reports: MAP@R for retrieval, mAP for
#: re-ID (which has no MAP@R), Recall@1 / CMC@1 for runs that report neither.
MAIN_METRICS = (MAP_AT_R, MAP, RECALL + "1", CMC + "1")


def main_metric(names: Iterable[str]) -> str | None:
    """The first of :data:`MAIN_METRICS` among ``names`` (exact names); None if none is."""
    present = set(names)
    return next((m for m in MAIN_METRICS if m in present), None)


def selection_metric(names: Iterable[str]) -> str | None:
    """The metric key that chooses a snapshot or a run among those reporting ``names``.

    The main metric (whichever split reports it) on the validation split when the run
    has one (``val/map@r``), else on the test split (``map@r``); None without a main metric.
    """
    present = set(names)
    main = main_metric(present | {without_val(n) for n in present})
    if main is None:
        return None
    return VAL_PREFIX + main if VAL_PREFIX + main in present else main


# ----------------------------------------------------------------------------- helpers


def without_val(name: str) -> str:
    """``val/map@r`` -> ``map@r``; any other name unchanged."""
    return name.removeprefix(VAL_PREFIX)


def split_prefix(name: str) -> tuple[str, str]:
    """``selected/map@r`` -> (``selected/``, ``map@r``); a name without one of :data:`PREFIXES`
    has the prefix ``""``."""
    for prefix in sorted(PREFIXES, key=len, reverse=True):
        if prefix and name.startswith(prefix):
            return prefix, name[len(prefix) :]
    return "", name


def family_rank(name: str) -> int:
    """The place of ``name``'s family in :data:`FAMILIES` (``len(FAMILIES)`` for another name)."""
    return next((i for i, f in enumerate(FAMILIES) if name.startswith(f)), len(FAMILIES))


def is_known(name: str) -> bool:
    """Whether ``name`` (after its prefix) belongs to one of :data:`FAMILIES`."""
    return family_rank(split_prefix(name)[1]) < len(FAMILIES)


def is_metric(name: str) -> bool:
    """Whether ``name`` is exactly a metric's name (``recall@4``, ``map@r``), without a prefix."""
    return METRIC_PATTERN.match(name) is not None


def _k(name: str) -> int:
    tail = name.rsplit("@", 1)[-1]
    return int(tail) if "@" in name and tail.isdigit() else 0


def rank(name: str) -> tuple[int, int, str]:
    """Sort key of a name without prefix: by family (:data:`FAMILIES`), K, then name."""
    return family_rank(name), _k(name), name


def order_key(name: str) -> tuple[int, int, int, str]:
    """Sort key of the display order: by prefix (:data:`PREFIXES`), then :func:`rank`; a
    prefix that is not one of :data:`PREFIXES` ranks with the plain names."""
    prefix, base = split_prefix(name)
    return (PREFIXES.index(prefix), *rank(base))


def in_order(names: Iterable[str]) -> list[str]:
    """``names`` in the display order (see :func:`order_key`)."""
    return sorted(names, key=order_key)


def label(name: str) -> str:
    """How tables title a metric: ``recall@1`` -> ``R@1``, ``map@r`` -> ``MAP@R``; else its name."""
    for family, text in LABELS.items():
        if name == family or (family.endswith("@") and name.startswith(family)):
            return text + name[len(family) :]
    return name


def labels(names: Sequence[str]) -> dict[str, str]:
    """``{name: label(name)}`` in the order given."""
    return {n: label(n) for n in names}
