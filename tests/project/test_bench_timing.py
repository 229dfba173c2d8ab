"""The interleaved timing that the benches in scripts/bench/ share (scripts/bench/_timing.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "scripts" / "bench" / "_timing.py"
_spec = importlib.util.spec_from_file_location("_timing", _PATH)
assert _spec is not None and _spec.loader is not None
timing = importlib.util.module_from_spec(_spec)
sys.modules["_timing"] = timing
_spec.loader.exec_module(timing)


class FakeClock:
    """A clock that each call of the timed function moves on by ``step`` seconds."""

    def __init__(self, step: float) -> None:
        self.now, self.step, self.calls, self.reads = 0.0, step, 0, 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now

    def work(self) -> None:
        self.calls += 1
        self.now += self.step


def test_run_for_repeats_a_short_call_until_the_minimum() -> None:
    clock = FakeClock(0.003)
    trial = timing.run_for(clock.work, min_s=1.0, clock=clock)
    assert trial.work == clock.calls
    assert trial.seconds == pytest.approx(clock.calls * 0.003)
    assert trial.seconds >= 1.0
    assert trial.seconds < 1.0 + 0.003 + 1e-9  # stops at the first call past the minimum
    assert trial.per_unit == pytest.approx(0.003)
    assert trial.rate == pytest.approx(1 / 0.003)
    assert clock.reads < 20  # the clock is read per block, not per call


def test_run_for_calls_a_long_call_once() -> None:
    clock = FakeClock(2.5)
    trial = timing.run_for(clock.work, min_s=1.0, clock=clock)
    assert (trial.work, trial.seconds) == (1, 2.5)


def test_run_for_syncs_after_every_block() -> None:
    clock = FakeClock(0.1)
    synced: list[int] = []
    timing.run_for(clock.work, min_s=1.0, clock=clock, sync=lambda: synced.append(clock.calls))
    assert synced and synced[-1] == clock.calls


def test_interleave_alternates_the_trials_and_warms_up_each() -> None:
    calls: list[str] = []

    def trial(name: str):  # noqa: ANN202
        return lambda: calls.append(name) or len(calls)

    runs = timing.interleave({"a": trial("a"), "b": trial("b")}, rounds=3)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert runs == {"a": [3, 6, 7], "b": [4, 5, 8]}
    calls.clear()
    timing.interleave({"a": trial("a"), "b": trial("b")}, rounds=2, warmup=False)
    assert calls == ["a", "b", "b", "a"]


def test_summary_best_median_and_ratio() -> None:
    times = timing.Summary.of([3.0, 1.0, 2.0, 10.0], higher_is_better=False)
    assert (times.best, times.median) == (1.0, 2.5)
    rates = timing.Summary.of([3.0, 1.0, 2.0], higher_is_better=True)
    assert (rates.best, rates.median) == (3.0, 2.0)
    ratio = rates / timing.Summary(1.5, 4.0)
    assert (ratio.best, ratio.median) == (2.0, 0.5)
    assert ratio.scaled(10.0) == timing.Summary(20.0, 5.0)
    assert timing.headline("x: a/b", ratio) == "x: a/b = 2.00 (median 0.50)"
    assert ratio.format(".1f") == "best 2.0, median 0.5"
    with pytest.raises(ValueError):
        timing.Summary.of([], higher_is_better=True)
