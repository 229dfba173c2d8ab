"""Every evaluation of a run, and the snapshot a monitor picks from them.

The authors evaluated snapshots during training (CUB and Cars every 250 iterations
from 1,000, MARS every 5,000 from 40,000: ``CUB_V01/train_M_WIDE_ASiamese_V42_e1/test_model.m``,
``MARS_V01/train_M_WIDE_WF_WIDE_ASiamese_V20_e2/*.txt``) and reported the best one, a choice
made on the test split. softmine keeps every evaluation in ``eval_log.csv`` and, next to
the final metrics, reports that choice under names that say what it is:
``best_test_iteration`` and ``best_test/<metric>``.

With a validation split (held-out training classes) each evaluation row also holds
``val/<metric>``, and the honest choice is reported beside it: ``selected_iteration`` and
``selected/<metric>``, the snapshot with the best validation value of the monitored
metric and its TEST metrics (Musgrave et al., *A Metric Learning Reality Check*, 2020).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from softmine.errors import ConfigError
from softmine.evaluation.metric_names import (
    BEST_TEST_PREFIX,
    BEST_TEST_STEP,
    CMC,
    MAP,
    MAP_AT_R,
    NMI,
    R_PRECISION,
    RECALL,
    SELECTED_PREFIX,
    SELECTED_STEP,
    TEST_PREFIX,
    VAL_PREFIX,
    selection_metric,
    without_val,
)

NOT_METRICS = ("iteration", "epoch", "eval_s")  # eval_log.csv columns that are not metrics
RETRIEVAL_METRICS = (MAP_AT_R, R_PRECISION, NMI)
REID_METRICS = (MAP,)


def metric_names(protocol: str, ks: Sequence[int], ranks: Sequence[int]) -> list[str]:
    """The metrics an evaluation of this protocol reports (what ``trainer.monitor`` may name)."""
    if protocol == "reid":
        return [f"{CMC}{int(r)}" for r in ranks] + list(REID_METRICS)
    if protocol == "query_gallery":  # no clustering of one split: no nmi
        return [f"{RECALL}{int(k)}" for k in ks] + [MAP_AT_R, R_PRECISION]
    return [f"{RECALL}{int(k)}" for k in ks] + list(RETRIEVAL_METRICS)


def resolve_monitor(monitor: str, names: Sequence[str]) -> str:
    """The metric key ``trainer.monitor`` names (a :class:`ConfigError` before training if none).

    ``auto`` -> the protocol's main metric (``mAP`` for re-ID, ``map@r`` otherwise), on the
    validation split when there is one (``val/map@r``); ``test/<metric>`` -> ``<metric>``
    (the test split's metrics have plain names); anything else must be one of ``names``.
    """
    if monitor == "auto":
        return selection_metric(names) or MAP_AT_R
    key = monitor[len(TEST_PREFIX) :] if monitor.startswith(TEST_PREFIX) else monitor
    if key not in names:
        hint = (
            "; val/<metric> needs held-out classes: dataset.val_classes=N or dataset.folds=K"
            if key.startswith(VAL_PREFIX)
            else ""
        )
        raise ConfigError(
            f"trainer.monitor={monitor!r} is not a metric of this evaluation; choose one of "
            f"{list(names)} (or auto; test/<metric> also names a test metric){hint}"
        )
    return key


def best_row(rows: Sequence[dict[str, Any]], monitor: str) -> dict[str, Any] | None:
    """The evaluation with the highest ``monitor`` (the earliest of equals); None if none."""
    best = None
    for row in rows:
        value = row.get(monitor)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        if best is None or value > best[monitor]:
            best = row
    return best


def best_test_summary(rows: Sequence[dict[str, Any]], monitor: str) -> dict[str, float]:
    """``best_test_iteration`` and ``best_test/<metric>`` when more than one evaluation scored
    the test split (``evaluation.test=final`` scores it once: there is no choice to report).

    The snapshot is chosen by ``monitor`` ON THE TEST SPLIT, as the authors chose theirs:
    a number to compare with theirs, not an unbiased estimate.
    """
    if sum(row.get(monitor) is not None for row in rows) < 2:
        return {}
    best = best_row(rows, monitor)
    if best is None:
        return {}
    out: dict[str, float] = {BEST_TEST_STEP: int(best["iteration"])}
    out.update({BEST_TEST_PREFIX + k: v for k, v in best.items() if k not in NOT_METRICS})
    return out


def write_eval_log(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write all evaluations (``iteration``, ``epoch``, every metric, ``eval_s``: the
    evaluation's wall seconds) atomically."""
    fields: list[str] = []
    for r in rows:
        fields.extend(k for k in r if k not in fields)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def selection_summary(rows: Sequence[dict[str, Any]], monitor: str) -> dict[str, float]:
    """What ``metrics.json`` adds to the final metrics: the test-chosen and validation-chosen snapshots.

    * ``best_test_iteration``, ``best_test/<metric>``: chosen by the monitored metric on
      the TEST split (when more than one evaluation ran), see :func:`best_test_summary`;
    * ``selected_iteration``, ``selected/<metric>``: chosen by the same metric on the
      VALIDATION split (when the rows have it): every metric of that evaluation, so
      ``selected/<test metric>`` is the honest number, the test score of the snapshot
      picked without looking at the test classes.

    ``monitor`` may name either split (``map@r`` or ``val/map@r``): both choices are made.
    """
    name = without_val(monitor)
    out = best_test_summary(rows, name)
    chosen = best_row(rows, VAL_PREFIX + name)
    if chosen is not None:
        out[SELECTED_STEP] = int(chosen["iteration"])
        out.update({SELECTED_PREFIX + k: v for k, v in chosen.items() if k not in NOT_METRICS})
    return out
