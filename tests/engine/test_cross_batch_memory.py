"""Cross-batch memory in training: the queue is part of the checkpoint, so a run stopped and
resumed ends with the same queue and the same weights as one that ran through; a skipped step
keeps its batch out of the queue."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from softmine.engine import Trainer
from softmine.engine.step import TrainStep
from softmine.errors import ConfigError
from softmine.testing.fakes import make_cub
from tests.conftest import FAST_CUB, FAST_DIGITS, compose

# 6 steps of 20 digits; the memory joins after step 1 and its 50 slots wrap at step 4
BASE = [
    *FAST_DIGITS,
    "trainer.device=cpu",
    "trainer.max_iters=6",
    "trainer.eval_every=0",
    "trainer.checkpoint_every=3",
    "trainer.deterministic=true",
    "loss=osm_caa",
    "loss.memory=xbm",
    "loss.memory_size=50",
    "loss.memory_start=1",
]


class Stop(Exception):
    """The run stops right after its step-3 checkpoint (as if killed)."""


def _state(t: Trainer) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v for k, v in t.model.state_dict().items()}
    out |= {f"loss.{k}": v for k, v in t.loss_fn.state_dict().items()}
    assert t.memory is not None
    memory = t.memory.state()
    out |= {"memory.embeddings": memory["embeddings"], "memory.labels": memory["labels"]}
    out |= {f"memory.{k}": v for k, v in memory["fields"].items()}
    out["memory.iteration"] = torch.tensor(memory["iteration"])
    return out


# 6 steps of a fake CUB (RGB images through the DML transform, 2 x 3 a batch); the memory
# joins after step 1 and its 20 slots wrap at step 5
CUB = [
    *FAST_CUB,
    "trainer.num_workers=0",
    "dataset.transform.resize=16",
    "dataset.transform.crop_size=12",
    "trainer.max_iters=6",
    "trainer.eval_every=0",
    "trainer.checkpoint_every=3",
    "trainer.deterministic=true",
    "loss=osm_caa",
    "loss.memory=xbm",
    "loss.memory_size=20",
    "loss.memory_start=1",
]
#: data set -> (overrides, queue length, labels stored after step 3 (steps 2 and 3))
RUNS = {"digits": (BASE, 50, 40), "fake CUB": (CUB, 20, 12)}


@pytest.mark.parametrize("data", sorted(RUNS))
def test_a_resumed_run_has_the_queue_and_weights_of_an_uninterrupted_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: str
) -> None:
    """(3) The queue is checkpointed: stopped after step 3 and resumed, the run ends as one that
    ran its 6 steps through (the same queue, the same weights, bit for bit)."""
    base, size, stored_at_3 = RUNS[data]
    if base is CUB:
        base = [*CUB, f"dataset.root={make_cub(tmp_path / 'CUB_200_2011', num_classes=4)}"]
    through = Trainer(compose(base), tmp_path / "through")
    through.fit()
    assert through.memory is not None and through.memory.filled == size
    assert through.memory.iteration == 6
    log = (tmp_path / "through" / "train_log.csv").read_text().splitlines()
    assert "memory_loss" in log[0].split(",")

    save = Trainer.save_checkpoint

    def stop_after_step_3(self: Trainer, *args, **kwargs):
        path = save(self, *args, **kwargs)
        if self.state.step == 3:
            raise Stop
        return path

    monkeypatch.setattr(Trainer, "save_checkpoint", stop_after_step_3)
    with pytest.raises(Stop):
        Trainer(compose(base), tmp_path / "stopped").fit()
    monkeypatch.setattr(Trainer, "save_checkpoint", save)
    saved = torch.load(tmp_path / "stopped" / "checkpoints" / "last.pt", weights_only=True)
    assert saved["train_state"]["step"] == 3
    assert saved["memory"]["iteration"] == 3 and len(saved["memory"]["labels"]) == stored_at_3

    resumed = Trainer(compose([*base, "resume=true"]), tmp_path / "stopped")
    resumed.fit()
    want, got = _state(through), _state(resumed)
    assert want.keys() == got.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def test_resuming_with_another_memory_setting_is_one_clear_error(tmp_path: Path) -> None:
    Trainer(compose([*BASE, "trainer.max_iters=2"]), tmp_path / "run").fit()
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    plain = Trainer(compose([*BASE, "loss.memory=null"]), tmp_path / "plain")
    with pytest.raises(ConfigError, match="holds a cross-batch memory and this config has none"):
        plain.load_checkpoint(last)
    smaller = Trainer(compose([*BASE, "loss.memory_size=30"]), tmp_path / "smaller")
    with pytest.raises(ConfigError, match="loss.memory_size=30"):
        smaller.load_checkpoint(last)


def test_a_skipped_step_keeps_its_batch_out_of_the_queue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``trainer.on_nonfinite=skip``: the step whose loss was not finite leaves the queue as it was."""
    t = Trainer(compose([*BASE, "trainer.on_nonfinite=skip", "trainer.max_iters=4"]), tmp_path)
    poison: list[bool] = []
    forward = t.parts.objective.forward

    def maybe_poisoned(*args):
        loss, details = forward(*args)  # the batch is in the queue by now
        return (loss * float("nan") if poison else loss), details

    run, seen = TrainStep.run, []

    def nan_at_step_3(self: TrainStep, x, y, state):
        poison[:] = [True] if state.step + 1 == 3 else []
        values = run(self, x, y, state)
        assert t.memory is not None
        seen.append(t.memory.filled)
        return values

    monkeypatch.setattr(t.parts.objective, "forward", maybe_poisoned)
    monkeypatch.setattr(TrainStep, "run", nan_at_step_3)
    t.fit()
    assert seen == [0, 20, 20, 40]  # step 2 stored its batch, step 3 (skipped) did not
    assert t.state.skipped_steps == 1
