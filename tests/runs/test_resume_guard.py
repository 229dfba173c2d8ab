"""resume=true continues the recorded run: changed settings are refused unless named in
resume_override, and an allowed change (a longer run, a lower learning rate) really applies."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from softmine.commands.train import train
from softmine.errors import ConfigError, TrainingError
from softmine.runs.folder import Invocation
from tests.conftest import FAST_DIGITS, compose, run_cli

BASE = ["trainer.device=cpu", "optimizer=sgd", "optimizer.lr=0.01", *FAST_DIGITS]


def _inv(run_dir: Path, *overrides: str) -> Invocation:
    given = [*BASE, *overrides]
    return Invocation(run_dir, compose(given), given, choices={})


def _poison_loss_at(monkeypatch: pytest.MonkeyPatch, call: int) -> None:
    """The loss becomes NaN on its ``call``-th evaluation (a non-finite stop there)."""
    from softmine.losses.osm_caa import OSMCAALoss

    forward = OSMCAALoss.forward
    calls = {"n": 0}

    def poisoned(self, embeddings, labels, return_details=False):
        calls["n"] += 1
        loss, details = forward(self, embeddings, labels, return_details=True)
        loss = loss * float("nan") if calls["n"] == call else loss
        return (loss, details) if return_details else loss

    monkeypatch.setattr(OSMCAALoss, "forward", poisoned)


@pytest.mark.slow
def test_changed_settings_are_refused_and_a_run_is_never_cut_short(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run of 3 epochs (45 steps each) stops at step 70, its checkpoint at step 60 (in epoch
    2): resuming it with 1 epoch would label more than one epoch of training as 1."""
    _poison_loss_at(monkeypatch, 70)
    with pytest.raises(TrainingError, match="non-finite loss at step 70"):
        train(_inv(tmp_path, "trainer.epochs=3", "trainer.checkpoint_every=20"))
    monkeypatch.undo()
    with pytest.raises(ConfigError) as e:
        train(_inv(tmp_path, "resume=true", "trainer.epochs=1", "loss.margin=0.5"))
    assert "loss.margin (1.2 -> 0.5)" in str(e.value) and "trainer.epochs (3 -> 1)" in str(e.value)
    with pytest.raises(ConfigError, match="already at epoch 2, step 60, past the new end"):
        train(_inv(tmp_path, "resume=true", "trainer.epochs=1", "resume_override=[trainer.epochs]"))
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert state["train_state"]["step"] == 60  # the refusals touched nothing
    assert "epochs: 3" in (tmp_path / ".hydra" / "config.yaml").read_text()


@pytest.mark.slow
def test_lower_learning_rate_after_a_nonfinite_stop_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _poison_loss_at(monkeypatch, 5)
    with pytest.raises(TrainingError, match=r"resume_override=\[optimizer.lr\] optimizer.lr=0.001"):
        train(_inv(tmp_path, "trainer.epochs=1", "trainer.checkpoint_every=2"))
    monkeypatch.undo()
    with pytest.raises(ConfigError, match=r"optimizer.lr \(0.01 -> 0.002\)"):
        train(_inv(tmp_path, "trainer.epochs=1", "resume=true", "optimizer.lr=0.002"))
    metrics = train(
        _inv(
            tmp_path,
            "trainer.epochs=1",
            "resume=true",
            "optimizer.lr=0.002",
            "resume_override=[optimizer.lr]",
        )
    )
    assert 0 < metrics["map@r"] <= 1
    log = pd.read_csv(tmp_path / "train_log.csv")
    assert log["lr"].tolist() == [pytest.approx(0.002)]  # the new rate, not the stored 0.01
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.002)
    (entry,) = yaml.safe_load((tmp_path / ".hydra" / "resumes.yaml").read_text())
    assert entry["changed"] == {"optimizer.lr": {"from": 0.01, "to": 0.002}}
    assert "optimizer.lr=0.002" in (tmp_path / ".hydra" / "overrides.yaml").read_text()


@pytest.mark.slow
def test_a_finished_run_is_extended_and_its_first_result_kept(tmp_path: Path) -> None:
    first = train(_inv(tmp_path, "trainer.epochs=1"))
    again = train(_inv(tmp_path, "trainer.epochs=1", "resume=true"))
    assert again == first  # resuming a finished run changes nothing
    extended = train(
        _inv(tmp_path, "trainer.epochs=2", "resume=true", "resume_override=[trainer.epochs]")
    )
    log = pd.read_csv(tmp_path / "train_log.csv")
    assert log["epoch"].tolist() == [1, 2]
    assert json.loads((tmp_path / "metrics.json").read_text()) == extended
    (entry,) = yaml.safe_load((tmp_path / ".hydra" / "resumes.yaml").read_text())
    assert entry["superseded_metrics"] == first
    assert "epochs: 2" in (tmp_path / ".hydra" / "config.yaml").read_text()


@pytest.mark.slow
def test_resume_with_other_settings_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """The issue's probe, as a command: resume=true optimizer.lr=0.5 seed=5."""
    run = ["softmine.commands.train", "trainer.epochs=1", *BASE, f"hydra.run.dir={tmp_path / 'R'}"]
    assert run_cli(run, tmp_path).returncode == 0
    res = run_cli([*run, "resume=true", "optimizer.lr=0.5", "seed=5"], tmp_path)
    assert res.returncode == 2
    (line,) = res.stderr.strip().splitlines()
    assert "optimizer.lr (0.01 -> 0.5)" in line and "seed (0 -> 5)" in line
    assert "resume_override=[optimizer.lr,seed]" in line


@pytest.mark.parametrize(
    ("what", "message"),
    [
        ("exp_avg", r"the optimizer's exp_avg of (model|loss)\.\S+ holds NaN or Inf"),
        ("weight", r"the weight \S+ holds NaN or Inf"),
    ],
)
def test_a_checkpoint_with_nonfinite_state_is_called_damaged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, what: str, message: str
) -> None:
    """The issue's probe: NaN in Adam's exp_avg of a saved checkpoint made the resumed run
    stop with "non-finite weights ... lower the learning rate", a wrong diagnosis."""
    given = ["trainer.device=cpu", "optimizer=adam", "trainer.checkpoint_every=2", *FAST_DIGITS]
    _poison_loss_at(monkeypatch, 5)
    with pytest.raises(TrainingError):
        train(Invocation(tmp_path, compose([*given, "trainer.epochs=1"]), given, choices={}))
    monkeypatch.undo()
    last = tmp_path / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    if what == "exp_avg":
        slot = next(iter(state["optimizer"]["state"].values()))
        slot["exp_avg"].view(-1)[0] = float("nan")
    else:
        name = next(k for k, v in state["model"].items() if v.is_floating_point())
        state["model"][name].view(-1)[0] = float("inf")
    torch.save(state, last)
    resumed = [*given, "trainer.epochs=1", "resume=true"]
    with pytest.raises(ConfigError, match=rf"checkpoint {last} is damaged: {message}"):
        train(Invocation(tmp_path, compose(resumed), resumed, choices={}))
