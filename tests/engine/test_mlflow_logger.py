"""Experiment tracking: trainer.loggers with MLflow, tested offline against a local file store."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from softmine.engine.logger import check_loggers, metric_name
from softmine.engine.validate import validate_config
from softmine.errors import ConfigError
from tests.conftest import FAST_DIGITS, compose


def _client(store: Path):
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=store.as_uri())


@pytest.mark.slow
def test_mlflow_records_params_step_metrics_final_metrics_and_plots(tmp_path: Path) -> None:
    from softmine.engine import Trainer
    from softmine.reporting.artifacts import fit_and_report

    store, run_dir = tmp_path / "mlruns", tmp_path / "run"
    overrides = [
        "trainer.max_iters=6",
        "trainer.log_every=2",
        "trainer.device=cpu",
        "trainer.loggers=[csv,tensorboard,mlflow]",
        f"trainer.mlflow.tracking_uri={store.as_uri()}",
        "trainer.mlflow.experiment=tests",
        *FAST_DIGITS,
        "trainer.plots=true",
    ]
    cfg = compose(overrides)
    metrics = fit_and_report(Trainer(cfg, run_dir))  # with the plots

    client = _client(store)
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "tests"
    params = run.data.params
    assert params["trainer.max_iters"] == "6" and params["loss.margin"] == str(cfg.loss.margin)
    assert params["backbone.trunk._target_"] == "softmine.models.TinyCNN"
    loss_steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert sorted(loss_steps) == [2, 4, 6, 6]  # every 2 iterations, and the epoch's mean at 6
    for k, v in json.loads((run_dir / "metrics.json").read_text()).items():
        assert run.data.metrics[f"final/{metric_name(k)}"] == pytest.approx(v)
        assert v == pytest.approx(metrics[k])
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "metrics.json", "train_log.csv", "plots"} <= artifacts
    plots = {Path(a.path).name for a in client.list_artifacts(run_id, "plots")}
    assert {"training_curves.png", "recall_at_k.png"} <= plots
    logged = client.download_artifacts(run_id, "config.yaml", str(tmp_path))
    assert OmegaConf.load(logged).trainer.max_iters == 6


def test_metric_names_lose_the_at_sign() -> None:
    assert metric_name("recall@1") == "recall_at_1" and metric_name("map@r") == "map_at_r"
    assert metric_name("loss") == "loss"


def test_logger_lists_are_checked_before_training(tmp_path: Path) -> None:
    assert check_loggers(["csv", "mlflow"]) == ["csv", "mlflow"]
    assert check_loggers(["csv", "wandb"]) == ["csv", "wandb"]
    with pytest.raises(ConfigError, match="unknown logger 'comet'"):
        validate_config(compose(["trainer.loggers=[csv,comet]"]), tmp_path)
    with pytest.raises(ConfigError, match="must include csv"):
        validate_config(compose(["trainer.loggers=[mlflow]"]), tmp_path)


def test_unreachable_tracking_server_is_one_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from softmine.engine.logger import MlflowLogger

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    settings = {"tracking_uri": "http://127.0.0.1:9", "experiment": "x"}
    with pytest.raises(ConfigError, match=r"MLflow at http://127.0.0.1:9 failed to start the run"):
        MlflowLogger(tmp_path, settings, compose([]))


def test_default_store_is_mlruns_in_the_launch_directory_and_resume_keeps_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from softmine.engine.logger import MlflowLogger

    monkeypatch.chdir(tmp_path)
    cfg = compose([])
    first = MlflowLogger(tmp_path / "run", {}, cfg)
    assert (tmp_path / "mlruns").is_dir()
    run = _client(tmp_path / "mlruns").get_run(first.run_id)
    assert run.info.run_name == "run"
    again = MlflowLogger(tmp_path / "run", {}, cfg, resume=True)
    assert again.run_id == first.run_id
    assert MlflowLogger(tmp_path / "run", {}, cfg).run_id != first.run_id  # a new run otherwise
