"""The trainer's device-side step records: logged sums (StepStats) and the non-finite record
(StepGuard), checked against hand-worked numbers, and a training step that reads nothing back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from softmine.engine import Trainer
from softmine.engine.nonfinite import GRADIENT, LOSS, StepGuard
from softmine.engine.step_stats import EPOCH, INTERVAL, StepStats
from tests.conftest import FAST_DIGITS, compose

T = torch.tensor


def test_stats_sum_both_windows_and_reset_one() -> None:
    stats = StepStats(torch.device("cpu"))
    stats.add({"loss": T(1.0), "a": T(0.5)})
    stats.add({"loss": T(2.0), "a": T(1.5)})
    assert stats.means(INTERVAL) == {"loss": 1.5, "a": 1.0}
    stats.reset(INTERVAL)
    stats.add({"loss": T(6.0), "a": T(4.0), "b": T(3.0)})  # a name that appears later
    assert stats.means(INTERVAL) == {"loss": 6.0, "a": 4.0, "b": 3.0}
    assert stats.means(EPOCH) == {"loss": 3.0, "a": 2.0, "b": 1.0}  # b absent twice: counted as 0
    assert stats.steps(EPOCH) == 3 and stats.steps(INTERVAL) == 1


def test_stats_sum_float32_values_exactly_in_float64() -> None:
    """The same sum the host made of Python floats, so resumed rows repeat exactly."""
    values = torch.rand(50, dtype=torch.float32) * 1000
    stats = StepStats(torch.device("cpu"))
    host = 0.0
    for v in values:
        stats.add({"loss": v})
        host += float(v)
    assert stats.sums_of(EPOCH)["loss"] == host


def test_stats_load_restores_a_window() -> None:
    stats = StepStats(torch.device("cpu"))
    stats.add({"loss": T(1.0)})
    fresh = StepStats(torch.device("cpu"))
    fresh.load(EPOCH, {"loss": 7.0, "ce": 2.0}, 4)
    fresh.load(INTERVAL, stats.sums_of(INTERVAL), stats.steps(INTERVAL))
    fresh.add({"loss": T(1.0), "ce": T(3.0)})
    assert fresh.means(EPOCH) == {"loss": 8.0 / 5, "ce": 5.0 / 5}
    assert fresh.means(INTERVAL) == {"loss": 1.0, "ce": 1.5}
    assert fresh.means(INTERVAL) != {} and StepStats(torch.device("cpu")).means(EPOCH) == {}


def test_guard_keeps_the_first_bad_step_its_kind_and_values() -> None:
    guard = StepGuard(torch.device("cpu"))
    ok, bad = T(True), T(False)
    guard.record(1, ok, ok, T([1.0, 2.0]))
    assert [int(f) for f in guard.flags()] == [-1, 0]
    guard.record(2, ok, bad, T([3.0, float("inf")]))  # finite loss, Inf gradient
    guard.record(3, bad, bad, T([float("nan"), 5.0]))  # later: must not overwrite
    assert [int(f) for f in guard.flags()] == [2, GRADIENT]
    assert guard.values.tolist() == [3.0, float("inf")]
    other = StepGuard(torch.device("cpu"))
    other.record(4, bad, bad, T([float("nan")]))
    assert [int(f) for f in other.flags()] == [4, LOSS]


@pytest.mark.parametrize("on_nonfinite", ["stop", "skip"])
@pytest.mark.slow
def test_a_stop_mode_step_reads_nothing_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, on_nonfinite: str
) -> None:
    """With on_nonfinite=stop a step never converts a tensor to a Python value (a host sync on
    a GPU); skip needs exactly one read per step (its finiteness flag)."""
    cfg = compose(["trainer.device=cpu", f"trainer.on_nonfinite={on_nonfinite}", *FAST_DIGITS])
    t = Trainer(cfg, tmp_path)
    batches = [b for b, _ in zip(t.loader, range(3), strict=False)]
    t.train_step(*batches[0])  # first step: optimizer state created
    reads: list[str] = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "numpy"):
        original = getattr(torch.Tensor, name)

        def spy(self: torch.Tensor, *a: object, _o=original, _n=name, **k: object) -> object:  # noqa: ANN001
            if self.device == t.device and self.numel() > 0 and not _is_optimizer_step(self, t):
                reads.append(_n)
            return _o(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    for x, y in batches[1:]:
        t.train_step(x, y)
    monkeypatch.undo()
    assert reads == ([] if on_nonfinite == "stop" else ["tolist", "tolist"])


def _is_optimizer_step(tensor: torch.Tensor, trainer: Trainer) -> bool:
    """Adam's step counters, which torch keeps on the CPU on purpose (reading them syncs nothing)."""
    return any(
        tensor is s.get("step") for s in trainer.optimizer.state.values() if isinstance(s, dict)
    )
