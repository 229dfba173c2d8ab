"""Engine pieces: schedules against hand values, iteration-based length, bf16 autocast, step logging."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from softmine.engine import Trainer
from softmine.engine.schedules import constant, cosine, multistep
from softmine.errors import ConfigError
from tests.conftest import FAST_DIGITS, compose


def _lrs(make, steps: int) -> list[float]:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = make(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_multistep_halves_at_the_milestones() -> None:
    lrs = _lrs(lambda o: multistep(o, 10, milestones=[3, 6], gamma=0.5), 8)
    assert lrs == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25]


def test_warmup_is_linear_from_the_factor() -> None:
    lrs = _lrs(lambda o: constant(o, 10, warmup_iters=4, warmup_factor=0.2), 6)
    assert lrs == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])


def test_cosine_reaches_the_floor_at_the_end() -> None:
    lrs = _lrs(lambda o: cosine(o, 10, min_factor=0.1), 11)
    expected = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t / 10)) for t in range(11)]
    assert lrs == pytest.approx(expected)


def test_bad_schedule_values_are_config_errors() -> None:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    with pytest.raises(ConfigError, match="gamma"):
        multistep(opt, 10, milestones=[1], gamma=0.0)
    with pytest.raises(ConfigError, match="warmup"):
        constant(opt, 10, warmup_iters=-1)


def test_max_iters_bf16_and_step_logging(tmp_path: Path) -> None:
    cfg = compose(
        [
            "trainer.max_iters=7",
            "trainer.log_every=2",
            "trainer.precision=bf16",
            "trainer.device=cpu",
            "scheduler=multistep",
            "scheduler.milestones=[4]",
            *FAST_DIGITS,
        ]
    )
    t = Trainer(cfg, tmp_path)
    metrics = t.fit()
    assert t.state.step == 7 and t.state.epoch == 1  # one partial epoch, then stop
    assert all(math.isfinite(v) for v in metrics.values())
    rows = list(csv.DictReader((tmp_path / "train_log.csv").open()))
    step_rows = [r for r in rows if "epoch_time_s" not in r or not r["epoch_time_s"]]
    assert [r["step"] for r in step_rows] == ["2", "4", "6"]
    assert float(rows[-1]["lr"]) == pytest.approx(0.5 * 1e-3)  # gamma 0.5 at iteration 4
    assert rows[-1]["map@r"]
