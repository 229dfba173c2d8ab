"""Class folds for cross-validation, and the K fold models scored together."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from softmine.data.splits import build_train_and_validation, class_folds, held_out_classes
from softmine.engine.evaluator import score_arrays
from softmine.errors import DataError
from softmine.reporting.crossval import concatenate
from softmine.runs.layout import RunLayout
from tests.conftest import FAST_DIGITS, compose, run_cli


@pytest.mark.parametrize(("n", "k"), [(10, 2), (10, 3), (50, 4), (100, 7), (5, 5)])
def test_folds_are_disjoint_and_cover_every_class_once(n: int, k: int) -> None:
    classes = np.arange(n) * 2 + 1
    folds = class_folds(classes, k, seed=3)
    assert len(folds) == k
    counts = {int(c): 0 for c in classes}
    for part in folds:
        for c in part:
            counts[int(c)] += 1
    assert set(counts.values()) == {1}  # every class in exactly one fold
    sizes = [len(p) for p in folds]
    assert max(sizes) - min(sizes) <= 1
    for i, part in enumerate(folds):  # the config-facing rule picks the same fold
        assert np.array_equal(held_out_classes(classes, folds=k, fold=i, seed=3), part)


def test_dataset_folds_train_on_the_rest() -> None:
    k = 4
    vals = []
    for fold in range(k):
        cfg = compose(["dataset=digits_pairs", f"dataset.folds={k}", f"dataset.fold={fold}"])
        train, val = build_train_and_validation(cfg.dataset)
        trained = set(train.original_labels.tolist())
        held = set(val.test.labels.tolist())
        assert held == set(val.classes.tolist())
        assert not trained & held and trained | held == set(range(50))
        vals.append(held)
    assert sorted(c for v in vals for c in v) == list(range(50))  # each class validates once


def test_concatenating_a_model_with_itself_changes_nothing() -> None:
    rng = np.random.default_rng(0)
    arrays = {"embeddings": rng.normal(size=(60, 5)), "labels": np.repeat(np.arange(6), 10)}
    cfg = compose([])
    alone = score_arrays(arrays, cfg)
    twice = score_arrays(concatenate([arrays, arrays]), cfg)
    assert twice == pytest.approx(alone, abs=1e-6)


def test_concatenated_cosine_is_the_mean_of_the_cosines() -> None:
    rng = np.random.default_rng(1)
    parts = [{"embeddings": rng.normal(size=(8, d)), "labels": np.arange(8) % 3} for d in (3, 4, 6)]
    out = concatenate(parts)
    assert out["embeddings"].shape == (8, 13)
    cat = out["embeddings"].astype(np.float64)
    cat /= np.linalg.norm(cat, axis=1, keepdims=True)
    want = np.zeros((8, 8))
    for p in parts:
        u = p["embeddings"] / np.linalg.norm(p["embeddings"], axis=1, keepdims=True)
        want += u @ u.T / len(parts)
    assert np.allclose(cat @ cat.T, want, atol=1e-6)


def test_different_test_splits_cannot_be_concatenated() -> None:
    a = {"embeddings": np.ones((4, 2)), "labels": np.array([0, 0, 1, 1])}
    b = {"embeddings": np.ones((4, 2)), "labels": np.array([0, 1, 0, 1])}
    with pytest.raises(DataError, match="labels"):
        concatenate([a, b])


@pytest.mark.slow
def test_fold_sweep_report(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = [
        "softmine.commands.train",
        "-m",
        *FAST_DIGITS,
        "trainer.device=cpu",
        "trainer.max_iters=4",
        "dataset.folds=2",
        "dataset.fold=0,1",
        "seed=0,1",
        f"hydra.sweep.dir={sweep}",
    ]
    res = run_cli(args, tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    runs = sorted(p.parent for p in sweep.glob("*/metrics.json"))
    assert len(runs) == 4
    for run in runs:  # the saved test embeddings are those the final metrics came from
        metrics = json.loads((run / "metrics.json").read_text())
        with np.load(RunLayout(run).test_embeddings) as data:
            again = score_arrays({k: data[k] for k in data.files}, compose([]))
        assert again["map@r"] == pytest.approx(metrics["map@r"], abs=1e-9)
        assert "val/map@r" in metrics and "selected/map@r" in metrics

    res = run_cli(
        ["softmine.commands.report", str(sweep), "--metrics", "map@r", "concat/map@r"], tmp_path
    )
    assert res.returncode == 0, res.stderr[-2000:]
    table = pd.read_csv(sweep / "report.csv")
    assert len(table) == 1 and table.loc[0, "n"] == 4 and table.loc[0, "folds"] == "0,1"
    per_seed = []
    for seed in (0, 1):
        parts = []
        for run in runs:
            overrides = (run / ".hydra" / "overrides.yaml").read_text()
            if f"seed={seed}" in overrides:
                with np.load(RunLayout(run).test_embeddings) as data:
                    parts.append({k: data[k] for k in data.files})
        assert len(parts) == 2
        per_seed.append(score_arrays(concatenate(parts), compose([]))["map@r"])
    assert table.loc[0, "concat/map@r_mean"] == pytest.approx(np.mean(per_seed), abs=1e-9)
    assert table.loc[0, "concat/map@r_std"] == pytest.approx(np.std(per_seed, ddof=1), abs=1e-9)
    report = (sweep / "report.md").read_text()
    assert "## Cross-validation folds" in report
    assert report.split("## Cross-validation folds")[1].count("| digits |") == 4
