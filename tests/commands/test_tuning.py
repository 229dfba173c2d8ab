"""make tune: a study per loss on held-out training classes, resumable, that writes the tuned config (issue 23).

Runs only with the tune extra (part of dev, so in CI): Hydra's Optuna sweeper and optuna.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

pytest.importorskip("optuna")
pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")

from softmine.commands import tune as tuning
from softmine.reporting.fair_benchmark import BASELINES
from softmine.runs.layout import StudyLayout
from tests.conftest import ForkedPopen

#: Metric names the test split would write (the validation split's are prefixed val/).
TEST_METRIC = ("recall@", "map@r", "r_precision", "nmi", "mirror_confusion", "best_test")
#: A small study: 3 trials of 3 iterations on 8 pairs a class, one trial at a time. One at a
#: time runs each trial in the sweep's own process (joblib's n_jobs=1 does not start its
#: worker processes, fresh interpreters that import torch and the engine again: 31 s -> 9 s
#: for this file's study on 2 cores); two at a time through the joblib launcher is
#: tests/commands/test_cli.py's test_local_parallel_launcher_runs_the_sweep.
FAST = [
    "hydra.sweeper.n_trials=3",
    "hydra.sweeper.n_jobs=1",
    "trainer.max_iters=3",
    "dataset.per_class=8",
]


@pytest.mark.parametrize("loss", [*tuning.LOSSES, *BASELINES])
def test_every_loss_has_a_search_space_over_keys_its_config_has(loss: str) -> None:
    cfg = tuning.study_config("digits_pairs", loss)
    space = dict(cfg.hydra.sweeper.params)
    shared = {"optimizer.lr", "trainer.epochs", "dataset.train.dataset.transform.max_shift"}
    assert shared < set(space), space  # the shared ranges, and at least one of the loss's own
    assert "log" in space["optimizer.lr"]
    for key in space:
        assert OmegaConf.select(cfg, key, default="absent") != "absent", key
    assert (
        cfg.hydra.sweeper.n_trials
        == tuning.study_config("digits_pairs", "osm").hydra.sweeper.n_trials
    )
    assert cfg.evaluation.test is False and cfg.hydra.sweeper.direction == "maximize"


def test_a_study_takes_the_old_sampler_keys() -> None:
    old = tuning.study_config("digits_pairs", "osm", ["sampler.num_classes=4"])
    new = tuning.study_config("digits_pairs", "osm", ["sampler.classes_per_batch=4"])
    assert old.sampler.classes_per_batch == 4
    assert OmegaConf.to_container(old.sampler) == OmegaConf.to_container(new.sampler)


def _interrupted_study(folder: Path, dataset: str, loss: str) -> None:
    """What an interrupted session leaves: one completed trial and one left running."""
    import optuna
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    cfg = tuning.study_config(dataset, loss, FAST)
    folder.mkdir(parents=True)
    StudyLayout(folder).record.write_text(
        __import__("yaml").safe_dump(tuning.settings(cfg, FAST), sort_keys=True)
    )
    space, _ = create_params_from_overrides(
        [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    )
    study = optuna.create_study(
        study_name=f"{dataset}-{loss}",
        storage=f"sqlite:///{StudyLayout(folder).db}",
        direction="maximize",
    )
    done = study.ask()
    for name, dist in space.items():
        done._suggest(name, dist)
    study.tell(done, 0.0)  # a finished trial (scored 0: the real ones beat it)
    study.ask()  # a trial whose process was killed: left RUNNING


def _compose_with_tuned(tmp_path: Path, written: Path):
    """experiment=fair on a copy of the config tree whose tuned file is the one just written
    (the committed one would win over a hydra.searchpath entry)."""
    import shutil

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from softmine.config import CONFIG_DIR

    tree = tmp_path / "config_tree"
    shutil.copytree(CONFIG_DIR, tree)
    shutil.copy(written, tree / "tuned" / "digits_pairs" / "contrastive.yaml")
    with initialize_config_dir(config_dir=str(tree), version_base="1.3"):
        return hydra_compose(
            "train", overrides=["experiment=fair", "dataset=digits_pairs", "loss=contrastive"]
        )


@pytest.mark.slow
def test_a_study_resumes_runs_to_its_budget_reads_no_test_split_and_writes_its_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tuning.subprocess, "Popen", ForkedPopen)  # its sweep, without a new import
    folder = tmp_path / "studies" / "digits_pairs" / "contrastive"
    _interrupted_study(folder, "digits_pairs", "contrastive")
    result = tuning.run_study(
        "digits_pairs", "contrastive", root=tmp_path / "studies", configs=tmp_path / "configs",
        overrides=FAST,
    )  # fmt: skip
    # resumed: the killed trial is failed and not counted, two new trials reach the budget of 3
    assert (result.complete, result.failed) == (3, 1)
    runs = sorted(p.parent.parent for p in folder.rglob(".hydra/config.yaml"))
    assert len(runs) == 2 and {r.parent.name for r in runs} == {"session-0"}
    # the trials never wrote a test metric
    for run in runs:
        written = set(json.loads((run / "metrics.json").read_text()))
        written |= set(pd.read_csv(run / "eval_log.csv").columns)
        leaked = [k for k in written if k.startswith(TEST_METRIC)]
        assert not leaked, (run, leaked)
        assert OmegaConf.load(run / ".hydra" / "config.yaml").evaluation.test is False
    # the best setting, written where experiment=fair finds it, with its provenance
    assert result.written == tmp_path / "configs" / "tuned" / "digits_pairs" / "contrastive.yaml"
    text = result.written.read_text()
    body = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert all("#" in ln for ln in body), "every key of a config is commented"
    fair = _compose_with_tuned(tmp_path, result.written)
    assert fair.tuned.trials == 3 and fair.tuned.best_trial == result.best_number
    assert fair.tuned.val_map_at_r == pytest.approx(result.best_value)
    assert result.best_value > 0.0  # a real trial, not the stand-in scored 0
    assert fair.optimizer.lr == pytest.approx(result.best_params["optimizer.lr"])
    assert fair.loss.margin == pytest.approx(result.best_params["loss.margin"])
    assert fair.trainer.epochs == result.best_params["trainer.epochs"]
    # run again: the budget is reached, nothing trains, the same setting is written
    again = tuning.run_study(
        "digits_pairs", "contrastive", root=tmp_path / "studies", configs=tmp_path / "configs",
        overrides=FAST,
    )  # fmt: skip
    assert again.best_number == result.best_number and len(list(folder.glob("session-*"))) == 1


def test_a_study_with_other_settings_is_not_resumed(tmp_path: Path) -> None:
    from softmine.errors import ConfigError

    folder = tmp_path / "digits_pairs" / "osm"
    folder.mkdir(parents=True)
    StudyLayout(folder).record.write_text("trials: 99\n")
    with pytest.raises(ConfigError, match="other settings"):
        tuning.run_study("digits_pairs", "osm", root=tmp_path, configs=tmp_path, overrides=FAST)


def test_tuned_values_take_a_list_whole() -> None:
    cfg = tuning.study_config("digits_pairs", "proxy_anchor")
    values = tuning.tuned_values(cfg, {"optimizer.param_groups.0.lr_mult": 7.0, "loss.delta": 0.2})
    assert values == {
        "optimizer.param_groups": [{"pattern": "loss.proxies", "lr_mult": 7.0}],
        "loss.delta": 0.2,
    }
