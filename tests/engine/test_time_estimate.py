"""trainer.time_estimate: the line early in a CPU run that says how long it takes and what cuts it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import softmine.engine.time_estimate as te
from softmine.engine.time_estimate import (
    RunPlan,
    TimeEstimate,
    estimate_line,
    evaluation_steps,
    format_duration,
    time_estimate_mode,
)
from softmine.errors import ConfigError
from softmine.testing.fakes import make_csv, make_image_folder
from tests.conftest import compose

CPU = torch.device("cpu")
#: own images at 24 px, the default ResNet-50 without its download: seconds a step on the CPU
TINY_OWN = [
    "dataset=imagefolder",
    "backbone.pretrained=false",
    "dataset.transform.resize=24",
    "dataset.transform.crop_size=24",
    "trainer.device=cpu",
    "trainer.progress_bar=false",
    "trainer.plots=false",
    "trainer.tensorboard=false",
    "trainer.num_workers=0",
]


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0.2, 42, 89, 400, 3600, 7530)] == [
        "1 s",
        "42 s",
        "89 s",
        "7 min",
        "1 h 00 min",
        "2 h 06 min",
    ]


def test_evaluation_steps_follow_the_trainer_schedule() -> None:
    t = compose([]).trainer
    assert evaluation_steps(t, 2, 300, 10) == {300}  # eval_every=0: only the final one
    t.eval_every = 10  # every 10 epochs of 10 batches
    assert evaluation_steps(t, 2, 300, 10) == {100, 200, 300}
    t.eval_every, t.eval_every_iters, t.eval_start_iter = 0, 50, 120
    assert evaluation_steps(t, 2, 300, 10) == {150, 200, 250, 300}
    assert evaluation_steps(t, 260, 300, 10) == {300}  # a resumed run: the ones still to come


def test_the_line_extrapolates_steps_and_evaluations_and_names_real_keys() -> None:
    cfg = compose(["dataset=imagefolder"])
    plan = RunPlan(steps_left=100, evaluations=2, eval_items=640, batch_size=64)
    total, line = estimate_line(3.0, plan, cfg, CPU)
    # 100 steps x 3 s + 2 evaluations x 640 images x (3 s / 64) / 3 = 300 + 20 = 320 s
    assert total == pytest.approx(320.0)
    assert line.startswith("time estimate on the CPU: about 5 min left (3.00 s a step x 100 steps")
    assert "2 evaluations of 640 images, ~10 s each" in line
    for key in (
        "dataset.transform.resize=128 dataset.transform.crop_size=112",
        "trainer.epochs=15",
        "backbone=resnet18",
    ):
        assert key in line
    assert cfg.dataset.transform.crop_size == 224 and cfg.trainer.epochs == 30  # halved above
    small = compose(["dataset=imagefolder", "backbone=resnet18", "trainer.max_iters=40"])
    _, line = estimate_line(3.0, plan, small, CPU)
    assert "trainer.max_iters=20" in line and "backbone=" not in line


def test_mode_is_checked() -> None:
    t = compose([]).trainer
    assert time_estimate_mode(t) == "auto"
    t.time_estimate = False
    assert time_estimate_mode(t) is False
    t.time_estimate = "sometimes"
    with pytest.raises(ConfigError, match="trainer.time_estimate must be auto, true or false"):
        time_estimate_mode(t)


def _clock(monkeypatch: pytest.MonkeyPatch, seconds: list[float]) -> None:
    ticks = iter(seconds)
    monkeypatch.setattr(te.time, "perf_counter", lambda: next(ticks))


def test_auto_speaks_on_the_cpu_for_runs_of_a_minute_or_more_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = compose(["dataset=imagefolder"])
    plan = RunPlan(steps_left=100, evaluations=1, eval_items=64, batch_size=64)
    _clock(monkeypatch, [10.0, 12.0, 20.0, 20.1])
    slow = TimeEstimate(cfg, CPU, lambda step: plan, start_step=0)
    quick = TimeEstimate(cfg, CPU, lambda step: plan, start_step=0)
    for step in (1, 2, 3):
        slow.after_step(step)  # 2 s a step: ~3 min
    for step in (1, 2, 3):
        quick.after_step(step)  # 0.1 s a step: ~10 s, under the minute: quiet
    assert slow.line is not None and "about 3 min left" in slow.line and quick.line is None
    on_gpu = TimeEstimate(cfg, torch.device("cuda"), lambda step: plan, start_step=0)
    assert not on_gpu.active  # auto: the progress bar's rate is the GPU's estimate
    cfg.trainer.time_estimate = False
    assert not TimeEstimate(cfg, CPU, lambda step: plan, start_step=0).active


def test_a_resumed_run_times_its_second_step(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = compose(["dataset=imagefolder", "trainer.time_estimate=true"])
    plans: list[int] = []

    def plan_of(step: int) -> RunPlan:
        plans.append(step)
        return RunPlan(steps_left=10, evaluations=1, eval_items=10, batch_size=10)

    _clock(monkeypatch, [5.0, 6.0])
    estimate = TimeEstimate(cfg, CPU, plan_of, start_step=40)
    for step in range(41, 45):
        estimate.after_step(step)
    assert plans == [42] and estimate.line is not None


@pytest.mark.slow
@pytest.mark.parametrize("name", ["imagefolder", "csv"])
def test_own_data_prints_the_estimate_after_the_timed_step_before_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    """dataset=imagefolder / csv with their defaults (ResNet-50 not downloaded, small images),
    10 classes of 16 images: the line comes after the warm-up and the timed step, before step 3."""
    from softmine.engine.trainer import Trainer

    if name == "imagefolder":
        where = f"dataset.root={make_image_folder(tmp_path / 'photos')}"
    else:
        csv = make_csv(
            tmp_path / "list", labels=range(10), images_per_label=16, query_gallery=False
        )
        where = f"dataset.file={csv}"
    own = [f"dataset={name}", *TINY_OWN[1:], where, "trainer.max_iters=4"]
    cfg = compose(own)
    assert cfg.backbone.name == "resnet50" and cfg.trainer.time_estimate == "auto"
    monkeypatch.setattr(te, "AUTO_MIN_S", 0.0)  # a 4-step run is short: let auto speak
    trainer = Trainer(cfg, tmp_path / "run")
    steps_at_line: list[int] = []
    real_after_step = TimeEstimate.after_step

    def after_step(self: TimeEstimate, step: int) -> None:
        real_after_step(self, step)
        if self.line is not None and not steps_at_line:
            steps_at_line.append(step)

    monkeypatch.setattr(TimeEstimate, "after_step", after_step)
    with caplog.at_level(logging.INFO, logger="softmine"):
        trainer.fit()
    lines = [r.getMessage() for r in caplog.records if "time estimate" in r.getMessage()]
    assert len(lines) == 1 and steps_at_line == [2], (lines, steps_at_line)
    assert "2 steps" in lines[0] and "1 evaluation of 80 images" in lines[0]
    assert "backbone=resnet18" in lines[0] and "trainer.max_iters=2" in lines[0]
    messages = [r.getMessage() for r in caplog.records]  # one batch an epoch: epoch 2 is step 2
    assert messages.index(lines[0]) < next(
        i for i, m in enumerate(messages) if m.startswith("epoch 2")
    )


def test_the_digits_demo_stays_quiet(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """auto: a digits run (seconds on the CPU) is under the minute: no line."""
    from softmine.engine.trainer import Trainer

    cfg = compose(
        [
            "trainer.device=cpu",
            "trainer.max_iters=4",
            "trainer.progress_bar=false",
            "trainer.plots=false",
            "trainer.tensorboard=false",
        ]
    )
    with caplog.at_level(logging.INFO, logger="softmine"):
        Trainer(cfg, tmp_path / "run").fit()
    assert not [r for r in caplog.records if "time estimate" in r.getMessage()]
