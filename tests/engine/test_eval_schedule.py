"""Evaluation every N iterations: eval_log.csv, and the test-chosen snapshot named as such."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import FAST_DIGITS, run_cli

BASE = [*FAST_DIGITS, "trainer.plots=false", "trainer.device=cpu", "trainer.max_iters=7"]


@pytest.mark.slow
def test_every_n_iterations_from_a_start(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["trainer.eval_every_iters=2", "trainer.eval_start_iter=3", "trainer.monitor=recall@1"]
    res = run_cli(["softmine.commands.train", *BASE, *args, f"hydra.run.dir={run}"], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    log = pd.read_csv(run / "eval_log.csv")
    assert log["iteration"].tolist() == [4, 6, 7]  # 4 and 6 on schedule, 7 the final one
    metrics = json.loads((run / "metrics.json").read_text())
    best = log.loc[log["recall@1"].idxmax()]  # the first of equal values
    assert metrics["best_test_iteration"] == best["iteration"]
    for k in ("recall@1", "map@r", "nmi"):
        assert metrics[f"best_test/{k}"] == best[k]
        assert metrics[k] == log[k].iloc[-1]
    # each evaluation's wall time is logged beside it, and is not a metric of any snapshot
    assert (log["eval_s"] > 0).all() and (log["eval_s"] < 60).all()
    assert not any(k.endswith("eval_s") for k in metrics)


@pytest.mark.slow
def test_a_single_evaluation_adds_no_selection(tmp_path: Path) -> None:
    run = tmp_path / "run"
    res = run_cli(["softmine.commands.train", *BASE, f"hydra.run.dir={run}"], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert not any(k.startswith("best_test") for k in metrics)
    assert pd.read_csv(run / "eval_log.csv")["iteration"].tolist() == [7]


def test_unknown_monitor_stops_before_training(tmp_path: Path) -> None:
    run = tmp_path / "run"
    res = run_cli(
        ["softmine.commands.train", *BASE, "trainer.monitor=cmc@1", f"hydra.run.dir={run}"],
        tmp_path,
    )
    assert res.returncode == 2
    assert "trainer.monitor='cmc@1'" in res.stderr and "recall@1" in res.stderr
    assert not (run / "train_log.csv").exists()
