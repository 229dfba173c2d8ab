"""Every evaluation of a run, and the snapshot a monitor picks from them.

The authors evaluated snapshots during training (CUB and Cars every 250 iterations
from 1,000, MARS every 5,000 from 40,000: ``CUB_V01/train_M_WIDE_ASiamese_V42_e1/test_model.m``,
``MARS_V01/train_M_WIDE_WF_WIDE_ASiamese_V20_e2/*.txt``) and reported the best one, a choice
made on the test split. softmine keeps every evaluation in ``eval_log.csv`` and, next to
the final metrics, reports that choice under names that say what it is:
``best_test_iteration`` and ``best_test/<metric>``.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from softmine.errors import ConfigError

EVAL_LOG_FILE = "eval_log.csv"
RETRIEVAL_METRICS = ("map@r", "r_precision", "nmi")
REID_METRICS = ("mAP",)


def metric_names(protocol: str, ks: Sequence[int], ranks: Sequence[int]) -> list[str]:
    """The metrics an evaluation of this protocol reports (what ``trainer.monitor`` may name)."""
    if protocol == "reid":
        return [f"cmc@{int(r)}" for r in ranks] + list(REID_METRICS)
    if protocol == "query_gallery":  # no clustering of one split: no nmi
        return [f"recall@{int(k)}" for k in ks] + ["map@r", "r_precision"]
    return [f"recall@{int(k)}" for k in ks] + list(RETRIEVAL_METRICS)


def resolve_monitor(monitor: str, names: Sequence[str]) -> str:
    """``auto`` -> the protocol's main metric (``mAP`` for re-ID, ``map@r`` otherwise);
    anything else must be one of ``names`` (a :class:`ConfigError` before training)."""
    if monitor == "auto":
        return "mAP" if "mAP" in names else "map@r"
    if monitor not in names:
        raise ConfigError(
            f"trainer.monitor={monitor!r} is not a metric of this evaluation; choose one of "
            f"{list(names)} (or auto)"
        )
    return monitor


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
    """``best_test_iteration`` and ``best_test/<metric>`` when more than one evaluation ran.

    The snapshot is chosen by ``monitor`` ON THE TEST SPLIT, as the authors chose theirs:
    a number to compare with theirs, not an unbiased estimate.
    """
    if len(rows) < 2:
        return {}
    best = best_row(rows, monitor)
    if best is None:
        return {}
    out: dict[str, float] = {"best_test_iteration": int(best["iteration"])}
    out.update({f"best_test/{k}": v for k, v in best.items() if k not in ("iteration", "epoch")})
    return out


def write_eval_log(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write all evaluations (``iteration``, ``epoch``, every metric) atomically."""
    fields: list[str] = []
    for r in rows:
        fields.extend(k for k in r if k not in fields)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
