"""evaluation.test: when the trained network meets the test split (every evaluation, the final one, never)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from softmine.engine.eval_history import best_test_summary
from softmine.errors import ConfigError
from softmine.runs.sweep import sweep_score
from tests.conftest import FAST_DIGITS, compose

TEST_METRICS = {"recall@1", "map@r", "r_precision", "nmi", "mirror_confusion"}
SHORT = [
    *FAST_DIGITS,
    "dataset=digits_pairs",
    "dataset.per_class=8",
    "dataset.val_classes=10",
    "trainer.device=cpu",
    "trainer.epochs=3",
    "trainer.eval_every=1",
]


def _fit(tmp_path: Path, *overrides: str) -> tuple[dict, pd.DataFrame, object]:
    from softmine.engine import Trainer

    trainer = Trainer(compose([*SHORT, *overrides]), tmp_path / "run")
    trainer.fit()
    run = tmp_path / "run"
    return (
        json.loads((run / "metrics.json").read_text()),
        pd.read_csv(run / "eval_log.csv"),
        trainer,
    )


def test_never_reads_the_test_split(tmp_path: Path) -> None:
    metrics, log, trainer = _fit(tmp_path, "evaluation.test=false")
    assert not hasattr(trainer.evaluator, "test_set")  # not even built
    written = set(metrics) | set(log.columns)
    assert not written & TEST_METRICS, written
    assert not [k for k in written if k.startswith(("best_test/", "selected/map@r"))]
    assert {"val/map@r", "selected/val/map@r"} <= set(metrics)
    assert len(log) == 3 and log["val/map@r"].notna().all()
    assert sweep_score(metrics) == metrics["val/map@r"]  # what a tuning trial returns


def test_final_touches_the_test_split_once(tmp_path: Path) -> None:
    metrics, log, _ = _fit(tmp_path, "evaluation.test=final")
    assert log["map@r"].notna().tolist() == [False, False, True]  # the final evaluation only
    assert log["val/map@r"].notna().all()
    assert metrics["map@r"] == log["map@r"].iloc[-1]
    assert "mirror_confusion" in metrics  # digits_pairs' test split has mirrored classes
    assert not [k for k in metrics if k.startswith("best_test/")]  # one test score: no choice


@pytest.mark.slow
def test_every_is_the_default(tmp_path: Path) -> None:
    _, log, _ = _fit(tmp_path)
    assert log["map@r"].notna().all() and log["val/map@r"].notna().all()


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["evaluation.test=false"], "dataset.val_classes=N or dataset.folds=K"),
        (["evaluation.test=final"], "dataset.val_classes=N or dataset.folds=K"),
        (["evaluation.test=sometimes", "dataset.val_classes=2"], "evaluation.test must be"),
        (
            ["evaluation.test=final", "dataset.val_classes=2", "trainer.baselines=true"],
            "trainer.baselines",
        ),
    ],
)
def test_bad_settings_are_one_clear_error(overrides: list[str], match: str) -> None:
    from softmine.engine.validate import validate_config

    with pytest.raises(ConfigError, match=match):
        validate_config(compose(overrides))


def test_best_test_needs_two_test_scores() -> None:
    rows = [
        {"iteration": 1, "val/map@r": 0.5},
        {"iteration": 2, "val/map@r": 0.6, "map@r": 0.4},
    ]
    assert best_test_summary(rows, "map@r") == {}
    rows.append({"iteration": 3, "val/map@r": 0.6, "map@r": 0.3})
    assert best_test_summary(rows, "map@r")["best_test_iteration"] == 2


def test_a_sweep_job_scores_on_validation_when_it_can() -> None:
    assert sweep_score({"map@r": 0.9, "val/map@r": 0.5}) == 0.5
    assert sweep_score({"map@r": 0.9}) == 0.9
    assert sweep_score({"mAP": 0.7, "val/mAP": 0.2}) == 0.2
