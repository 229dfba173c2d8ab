"""Non-finite weights: parameters and buffers are checked after every step, and only finite
weights are ever checkpointed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from softmine.engine import Trainer
from softmine.engine.nonfinite import WeightWatch
from softmine.errors import TrainingError
from tests.conftest import FAST_DIGITS, compose, run_cli


def _net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))


def test_watch_remembers_the_first_bad_step_until_read() -> None:
    net = _net()
    watch = WeightWatch([net])
    watch.update(1)
    assert watch.bad_step() is None
    with torch.no_grad():
        net[1].running_var[2] = float("inf")  # a buffer, as BatchNorm's statistics overflow
    watch.update(2)
    with torch.no_grad():
        net[1].running_var[2] = 1.0
        net[0].weight[0, 0] = float("nan")
    watch.update(3)
    watch.update(4)
    assert watch.bad_step() == 2  # read late, still exact
    assert watch.first_bad_name() == "0.weight"


def test_watch_ignores_huge_finite_values_and_integer_buffers() -> None:
    net = _net()
    with torch.no_grad():
        net[0].weight.fill_(3e38)  # its sum of squares would overflow float32; the max does not
    net[1].num_batches_tracked.fill_(2**62)
    watch = WeightWatch([net])
    watch.update(1)
    assert watch.bad_step() is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan"), None])
def test_watch_finds_any_nonfinite_value_of_each_float_dtype(
    dtype: torch.dtype, bad: float | None
) -> None:
    """Among huge finite values (whose squares overflow float32), one Inf, -Inf or NaN is found."""
    net = _net().to(dtype)
    with torch.no_grad():
        net[0].weight.fill_(torch.finfo(dtype).max)
        if bad is not None:
            net[0].weight[1, 2] = bad
    watch = WeightWatch([net])
    watch.update(5)
    assert watch.bad_step() == (None if bad is None else 5)


def _trainer(tmp_path: Path, *overrides: str) -> Trainer:
    cfg = compose(["trainer.epochs=1", "trainer.device=cpu", *FAST_DIGITS, *overrides])
    return Trainer(cfg, tmp_path)


def _all_finite(state: dict) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if torch.is_floating_point(v))


def test_huge_learning_rate_stops_and_keeps_only_finite_weights(tmp_path: Path) -> None:
    """The issue's probe: Adam with lr=1e9 used to exit 0 with Inf BatchNorm statistics."""
    t = _trainer(tmp_path, "optimizer.lr=1e9", "trainer.checkpoint_every=1")
    with pytest.raises(TrainingError) as e:
        t.fit()
    msg = str(e.value)
    assert "weights became non-finite at step" in msg
    assert "resume_override=[optimizer.lr] optimizer.lr=1e+08" in msg
    kept = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert f"(step {kept['train_state']['step']})" in msg
    assert _all_finite(kept["model"]) and _all_finite(kept["loss"])
    assert not (tmp_path / "metrics.json").exists()


def test_skip_mode_cannot_undo_a_step_and_says_so(tmp_path: Path) -> None:
    t = _trainer(tmp_path, "optimizer=sgd", "optimizer.lr=1e9", "trainer.on_nonfinite=skip")
    with pytest.raises(TrainingError, match="on_nonfinite=skip cannot undo"):
        t.fit()


def test_nonfinite_test_embeddings_are_a_training_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from softmine.evaluation.knn import NonFiniteEmbeddings

    t = _trainer(tmp_path)

    def overflow(model: torch.nn.Module, **kwargs: object) -> dict:
        raise NonFiniteEmbeddings("embeddings contain NaN or Inf")

    monkeypatch.setattr(t.evaluator, "evaluate", overflow)
    with pytest.raises(TrainingError, match="test embeddings are not finite"):
        t.evaluate()


@pytest.mark.slow
def test_huge_learning_rate_is_one_line_and_exit_2(tmp_path: Path) -> None:
    res = run_cli(
        ["softmine.commands.train", "trainer.epochs=2", "optimizer.lr=1e9", *FAST_DIGITS], tmp_path
    )
    assert res.returncode == 2, res.stderr[-2000:]
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("error: the weights became non-finite at step")
