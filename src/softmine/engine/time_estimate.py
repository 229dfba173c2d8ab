"""One log line, early in a CPU run, that estimates how long the run takes and what cuts it.

``trainer.time_estimate``: the first step warms up (the loader's workers start, memory is
allocated), the next one is timed (wall time from the end of the first to the end of the
second, the wait for its batch included), and the line extrapolates it: step time x the steps
left, plus the evaluations (their images, each at a third of a training step's per-image
time: a forward pass without the backward, which costs about twice the forward; Kaplan et
al. 2020, "Scaling Laws for Neural Language Models", sec. 2.1: 2N forward vs 6N training
FLOPs). The warm-up and the timed step are real training steps: the estimate costs nothing
but the clock.

``auto`` prints it on the CPU when the estimate is at least :data:`AUTO_MIN_S` (a minute):
a run shorter than that (the digits demo: about 30 s on 2 cores) is over before the line
would help, and the progress bar shows its rate. On a GPU ``auto`` stays quiet (steps are
asynchronous and fast; the progress bar's rate and remaining time are the estimate there);
``true`` prints it on any device (the GPU synchronised around the timed step), ``false`` never.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig

from softmine.errors import ConfigError

log = logging.getLogger(__name__)

WARMUP_STEPS = 1  # steps before the timed one: loader start-up, first allocations
AUTO_MIN_S = 60.0  # auto: runs estimated shorter than this get no line
EVAL_COST = 1 / 3  # an evaluated image's time / a trained image's time (forward only)
#: backbones with a cheaper sibling to suggest: GFLOPs of one 224 px image (torchvision's
#: model tables: ResNet-50 4.09, ResNet-18 1.81)
SMALLER_BACKBONE = {"resnet50": ("resnet18", 4.09, 1.81)}


def time_estimate_mode(t: DictConfig) -> str | bool:
    """``trainer.time_estimate`` as ``auto``, True or False (a bad value is a ConfigError)."""
    value = t.get("time_estimate", "auto")
    if isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    if not (value == "auto" or isinstance(value, bool)):
        raise ConfigError(f"trainer.time_estimate must be auto, true or false (got {value!r})")
    return value


@dataclass(frozen=True)
class RunPlan:
    """What the estimate extrapolates over: the steps and evaluations left."""

    steps_left: int  # training steps after the timed one
    evaluations: int  # evaluations still to come (the final one included)
    eval_items: int  # items one evaluation embeds (all its splits)
    batch_size: int  # training images a step


def evaluation_steps(t: DictConfig, start: int, total: int, batches_per_epoch: int) -> set[int]:
    """The steps after ``start`` (up to ``total``) at which the run evaluates: every
    ``eval_every_iters`` from ``eval_start_iter``, every ``eval_every`` epochs, and the end."""
    steps = {total}
    every_iters = int(t.get("eval_every_iters", 0) or 0)
    if every_iters > 0:
        first = max(int(t.get("eval_start_iter", 0) or 0), start + 1)
        steps.update(s for s in range(first, total + 1) if s % every_iters == 0)
    every_epochs = int(t.get("eval_every", 0) or 0)
    if every_epochs > 0 and batches_per_epoch > 0:
        stride = every_epochs * batches_per_epoch
        steps.update(range(stride, total + 1, stride))
    return {s for s in steps if s > start}


def format_duration(seconds: float) -> str:
    """``42 s``, ``7 min``, ``2 h 05 min``."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def estimate_line(
    step_s: float, plan: RunPlan, cfg: DictConfig, device: torch.device
) -> tuple[float, str]:
    """The run's remaining time from one step's ``step_s`` seconds, and the line that says it."""
    per_image = step_s / max(plan.batch_size, 1)
    eval_s = plan.eval_items * per_image * EVAL_COST
    total = step_s * plan.steps_left + eval_s * plan.evaluations
    where = "on the CPU" if device.type == "cpu" else f"on {device}"
    line = (
        f"time estimate {where}: about {format_duration(total)} left "
        f"({step_s:.2f} s a step x {_count(plan.steps_left, 'step')} + "
        f"{_count(plan.evaluations, 'evaluation')} of {plan.eval_items} images, "
        f"~{format_duration(eval_s)} each)"
    )
    knobs = cut_knobs(cfg)
    if knobs:
        line += "; to cut it: " + ", ".join(knobs)
    return total, line


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def cut_knobs(cfg: DictConfig) -> list[str]:
    """The overrides that shorten this run: smaller images, fewer epochs, a smaller backbone."""
    knobs = []
    transform = cfg.dataset.get("transform")
    crop = transform.get("crop_size") if isinstance(transform, DictConfig) else None
    resize = transform.get("resize") if isinstance(transform, DictConfig) else None
    if isinstance(crop, int) and isinstance(resize, int) and crop >= 64:
        half_crop, half_resize = crop // 2, resize // 2
        knobs.append(
            f"smaller images dataset.transform.resize={half_resize} "
            f"dataset.transform.crop_size={half_crop} (1/4 of the pixels)"
        )
    t = cfg.trainer
    if t.get("max_iters") is not None and int(t.max_iters) > 1:
        knobs.append(f"fewer steps trainer.max_iters={int(t.max_iters) // 2}")
    elif t.get("max_iters") is None and int(t.epochs) > 1:
        knobs.append(f"fewer epochs trainer.epochs={int(t.epochs) // 2}")
    name = str(cfg.backbone.get("name", ""))
    if name in SMALLER_BACKBONE:
        small, big_gflops, small_gflops = SMALLER_BACKBONE[name]
        knobs.append(
            f"a smaller backbone backbone={small} ({small_gflops} vs {big_gflops} GFLOPs an image)"
        )
    return knobs


def run_plan(t: DictConfig, parts: Any, step: int) -> RunPlan:
    """The :class:`RunPlan` of a run's :class:`~softmine.engine.components.Components`
    (``parts``) after ``step`` steps (``t``: ``cfg.trainer``)."""
    evals = evaluation_steps(t, step, parts.total_steps, parts.batches_per_epoch)
    return RunPlan(
        steps_left=max(parts.total_steps - step, 0),
        evaluations=len(evals),
        eval_items=parts.evaluator.items_per_evaluation(),
        batch_size=parts.sampler.P * parts.sampler.K,
    )


class TimeEstimate:
    """Times the step after the warm-up and logs :func:`estimate_line` once (see the module).

    Args:
        plan_of: the :class:`RunPlan` after a given number of steps (:func:`run_plan`).
        start_step: the step the loop starts from (a resumed run's).
    """

    def __init__(
        self,
        cfg: DictConfig,
        device: torch.device,
        plan_of: Callable[[int], RunPlan],
        start_step: int,
    ) -> None:
        self.mode = time_estimate_mode(cfg.trainer)
        self.cfg, self.device, self.plan_of = cfg, device, plan_of
        self.active = self.mode is True or (self.mode == "auto" and device.type == "cpu")
        self.timed_step = start_step + WARMUP_STEPS + 1  # the step whose time is extrapolated
        self.t0: float | None = None
        self.line: str | None = None  # the line, once logged

    def after_step(self, step: int) -> None:
        """Call after every optimizer step (``step``: steps done); a no-op once it has spoken."""
        if not self.active:
            return
        if step == self.timed_step - 1:
            self.t0 = self._now()
        elif step == self.timed_step and self.t0 is not None:
            self.active = False
            step_s = self._now() - self.t0
            total, line = estimate_line(step_s, self.plan_of(step), self.cfg, self.device)
            if self.mode is True or total >= AUTO_MIN_S:
                log.info("%s", line)
                self.line = line

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()
