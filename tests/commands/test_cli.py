"""End-to-end: the Hydra app trains, evaluates, writes its run folder, sweeps and fails cleanly."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.conftest import run_cli

FAST = [
    "trainer.progress_bar=false",
    "trainer.plots=false",
    "sampler.classes_per_batch=5",
    "sampler.samples_per_class=4",
]
METRIC_KEYS = {"recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision", "nmi"}


def _only_run_dir(root: Path) -> Path:
    dirs = [p.parent for p in root.glob("outputs/*/*/.hydra")]
    assert len(dirs) == 1, dirs
    return dirs[0]


@pytest.mark.slow
def test_short_run_writes_its_run_folder(tmp_path: Path) -> None:
    res = run_cli(
        ["softmine.commands.train", "trainer.epochs=2", "trainer.eval_every=1", *FAST], tmp_path
    )
    assert res.returncode == 0, res.stderr[-3000:]
    run = _only_run_dir(tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    # two evaluations: the final metrics, and the snapshot the test set picks, named as such;
    # `iteration`: the step the final metrics (and checkpoints/last.pt) belong to
    assert set(metrics) == METRIC_KEYS | {f"best_test/{k}" for k in METRIC_KEYS} | {
        "best_test_iteration",
        "iteration",
    }
    assert all(0.0 <= metrics[k] <= 1.0 for k in METRIC_KEYS)
    rows = list(csv.DictReader((run / "train_log.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert metrics["iteration"] == int(rows[-1]["step"])
    assert "map@r" in rows[0] and rows[0]["map@r"]  # evaluated every epoch
    assert (run / "checkpoints" / "last.pt").stat().st_size > 0
    assert (run / ".hydra" / "config.yaml").exists()
    # softmine-eval re-evaluates the saved checkpoint to the same numbers
    ev = run_cli(["softmine.commands.evaluate", str(run)], tmp_path)
    assert ev.returncode == 0, ev.stderr[-3000:]
    again = json.loads(ev.stdout)
    for k in METRIC_KEYS - {"nmi"}:
        assert again[k] == pytest.approx(metrics[k], abs=1e-6)


@pytest.mark.slow
def test_overrides_reach_the_objects(tmp_path: Path) -> None:
    res = run_cli(
        [
            "softmine.commands.train",
            "trainer.epochs=1",
            "loss=contrastive",
            "loss.margin=0.9",
            "backbone.embedding_dim=16",
            "dataset=digits_zeroshot",
            *FAST,
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    run = _only_run_dir(tmp_path)
    cfg = (run / ".hydra" / "config.yaml").read_text()
    assert "margin: 0.9" in cfg and "embedding_dim: 16" in cfg and "protocol: zeroshot" in cfg
    import torch

    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["model"]["head.weight"].shape[0] == 16


@pytest.mark.slow
def test_multirun_writes_summary_with_one_row_per_job(tmp_path: Path) -> None:
    res = run_cli(
        ["softmine.commands.train", "-m", "loss=osm_caa,contrastive", "trainer.epochs=1", *FAST],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    summaries = list(tmp_path.glob("multirun/*/*/summary.csv"))
    assert len(summaries) == 1
    rows = list(csv.DictReader(summaries[0].open()))
    assert [r["loss"] for r in rows] == ["osm_caa", "contrastive"]
    assert all(r["status"] == "ok" and float(r["map@r"]) > 0 for r in rows)
    assert len(list(summaries[0].parent.glob("*/metrics.json"))) == 2


def test_bad_config_is_one_line_and_nonzero(tmp_path: Path) -> None:
    res = run_cli(["softmine.commands.train", "trainer.device=tpu", *FAST], tmp_path)
    assert res.returncode == 2
    assert "error: trainer.device must be one of" in res.stderr
    assert "Traceback" not in res.stderr


def test_bad_sampler_is_one_line(tmp_path: Path) -> None:
    res = run_cli(["softmine.commands.train", "sampler.classes_per_batch=11", *FAST[:1]], tmp_path)
    assert res.returncode == 2
    assert "larger than the 10 classes" in res.stderr


@pytest.mark.slow
def test_local_parallel_launcher_runs_the_sweep(tmp_path: Path) -> None:
    res = run_cli(
        [
            "softmine.commands.train",
            "-m",
            "hydra/launcher=local",
            "loss=osm,contrastive",
            "trainer.epochs=1",
            *FAST,
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in res.stdout + res.stderr
    (summary,) = tmp_path.glob("multirun/*/*/summary.csv")
    rows = list(csv.DictReader(summary.open()))
    assert sorted(r["loss"] for r in rows) == ["contrastive", "osm"]
    assert all(r["status"] == "ok" for r in rows)
