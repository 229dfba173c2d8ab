"""A run folder's files agree with each other whatever stops the run.

* the final checkpoint is written before the final evaluation, so an evaluation error
  never costs the trained network, and the error says how to evaluate it;
* ``metrics.json`` names the step it describes (``iteration``); a checkpoint of another
  step is called stale by every consumer, and ``resume=true`` finishes the job;
* a refused resume (a damaged or foreign checkpoint) writes nothing;
* the reason a run failed is in its ``train.log``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml

from softmine.commands.train import train
from softmine.engine import Trainer
from softmine.engine.evaluator import Evaluator
from softmine.errors import ConfigError, DataError, TrainingError
from softmine.inference import load_model
from softmine.runs.folder import Invocation, stale_checkpoint
from tests.conftest import FAST_DIGITS, compose

BASE = [
    "trainer.device=cpu",
    "trainer.max_iters=6",
    "trainer.eval_every=0",
    "trainer.checkpoint_every=3",
    "trainer.deterministic=true",
    *FAST_DIGITS,
]


def _inv(run_dir: Path, *overrides: str) -> Invocation:
    given = [*BASE, *overrides]
    return Invocation(run_dir, compose(given), given, choices={})


def _step(path: Path) -> int:
    return int(torch.load(path, weights_only=True)["train_state"]["step"])


def test_the_final_checkpoint_is_on_disk_before_the_final_evaluation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    evaluate = Evaluator.evaluate

    def spy(self, model, **kwargs):
        seen.append(_step(tmp_path / "checkpoints" / "last.pt"))
        return evaluate(self, model, **kwargs)

    monkeypatch.setattr(Evaluator, "evaluate", spy)
    metrics = train(_inv(tmp_path))
    assert seen == [6]
    assert metrics["iteration"] == 6
    assert json.loads((tmp_path / "metrics.json").read_text())["iteration"] == 6
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["train_state"]
    assert state["step"] == 6 and state["finished"]


@pytest.mark.slow
def test_a_failed_final_evaluation_keeps_the_model_and_says_how_to_evaluate_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self, model, **kwargs):
        raise DataError("cannot read test image data/x.jpg (truncated)")

    monkeypatch.setattr(Evaluator, "evaluate", broken)
    with pytest.raises(DataError) as e:
        train(_inv(tmp_path))
    message = str(e.value)
    assert "cannot read test image" in message
    assert f"softmine-eval {tmp_path}" in message and "resume=true" in message
    assert _step(tmp_path / "checkpoints" / "last.pt") == 6
    assert not (tmp_path / "metrics.json").exists()
    assert "the run stopped: cannot read test image" in (tmp_path / "train.log").read_text()
    monkeypatch.undo()
    metrics = train(_inv(tmp_path, "resume=true"))  # finishes: evaluates the saved network
    reference = train(_inv(tmp_path / "reference"))
    assert metrics == reference


@pytest.mark.slow
def test_a_stale_checkpoint_is_named_by_consumers_and_resume_finishes_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The checkpoint writes at the last step never land (a SIGKILL or a full disk there):
    last.pt holds step 3 while metrics.json describes step 6."""
    reference = train(_inv(tmp_path / "reference"))
    save = Trainer.save_checkpoint

    def lost_at_the_end(self, name="last.pt"):
        if self.state.step == 6 and name == "last.pt":
            return self.ckpt_dir / name
        return save(self, name)

    monkeypatch.setattr(Trainer, "save_checkpoint", lost_at_the_end)
    run_dir = tmp_path / "run"
    assert train(_inv(run_dir)) == reference
    monkeypatch.undo()
    last = run_dir / "checkpoints" / "last.pt"
    assert _step(last) == 3
    why = stale_checkpoint(run_dir)
    assert why is not None and "holds step 3" in why and "at step 6" in why
    with caplog.at_level(logging.WARNING):
        load_model(run_dir, "cpu")
    assert "holds step 3" in caplog.text and "resume=true" in caplog.text
    (run_dir / "checkpoints" / "last.pt.tmp").write_bytes(b"left by a killed writer")
    assert train(_inv(run_dir, "resume=true")) == reference  # trains 4..6 again, exactly
    assert _step(last) == 6 and stale_checkpoint(run_dir) is None
    assert not (run_dir / "checkpoints" / "last.pt.tmp").exists()


def test_a_finished_run_drops_temporary_files_of_a_killed_writer(tmp_path: Path) -> None:
    train(_inv(tmp_path))
    tmp = tmp_path / "checkpoints" / "last.pt.tmp"
    tmp.write_bytes(b"\0" * 1024)
    train(_inv(tmp_path, "resume=true"))  # already finished: nothing to train
    assert not tmp.exists()


@pytest.mark.parametrize("damage", ["truncated", "not softmine's", "another model's"])
@pytest.mark.slow
def test_a_refused_resume_writes_nothing(tmp_path: Path, damage: str) -> None:
    train(_inv(tmp_path))
    (tmp_path / "metrics.json").unlink()  # as if stopped before the end: resume loads last.pt
    last = tmp_path / "checkpoints" / "last.pt"
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    elif damage == "not softmine's":
        torch.save({"weights": torch.zeros(3)}, last)
    else:
        train(_inv(tmp_path / "other", "backbone.embedding_dim=16"))
        last.write_bytes((tmp_path / "other" / "checkpoints" / "last.pt").read_bytes())
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=str(last)):
        train(_inv(tmp_path, "resume=true"))
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before
    assert not (tmp_path / ".hydra" / "resumes.yaml").exists()


def test_the_reason_a_run_failed_is_in_its_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from softmine.losses.osm_caa import OSMCAALoss

    forward = OSMCAALoss.forward

    def nan_loss(self, embeddings, labels, return_details=False):
        loss, details = forward(self, embeddings, labels, return_details=True)
        loss = loss * float("nan")
        return (loss, details) if return_details else loss

    monkeypatch.setattr(OSMCAALoss, "forward", nan_loss)
    with pytest.raises(TrainingError) as e:
        train(_inv(tmp_path))
    log_text = (tmp_path / "train.log").read_text()
    assert "the run stopped: non-finite loss at step 1" in log_text
    assert str(e.value).split(";")[0] in log_text
    assert yaml.safe_load((tmp_path / ".hydra" / "overrides.yaml").read_text())
