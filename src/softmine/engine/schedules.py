"""Learning-rate schedules stepped once per iteration, each with an optional linear warm-up.

Each factory takes the optimizer and the run's total number of iterations and
returns a ``LambdaLR``; configs in ``configs/scheduler/`` bind the other arguments.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from softmine.errors import ConfigError


def _warmup(step: int, warmup_iters: int, warmup_factor: float) -> float:
    """Linear ramp from ``warmup_factor`` to 1 over ``warmup_iters`` iterations."""
    if step >= warmup_iters or warmup_iters <= 0:
        return 1.0
    alpha = step / warmup_iters
    return warmup_factor * (1.0 - alpha) + alpha


class _MultiStep:
    def __init__(
        self, milestones: Sequence[int], gamma: float, warmup_iters: int, warmup_factor: float
    ):
        self.milestones = sorted(int(m) for m in milestones)
        self.gamma, self.warmup_iters, self.warmup_factor = gamma, warmup_iters, warmup_factor

    def __call__(self, step: int) -> float:
        decay = self.gamma ** bisect.bisect_right(self.milestones, step)
        return decay * _warmup(step, self.warmup_iters, self.warmup_factor)


class _Cosine:
    def __init__(self, total: int, warmup_iters: int, warmup_factor: float, min_factor: float):
        self.total, self.warmup_iters = max(total, 1), warmup_iters
        self.warmup_factor, self.min_factor = warmup_factor, min_factor

    def __call__(self, step: int) -> float:
        if step < self.warmup_iters:
            return _warmup(step, self.warmup_iters, self.warmup_factor)
        span = max(self.total - self.warmup_iters, 1)
        t = min((step - self.warmup_iters) / span, 1.0)
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * t))


def _check_warmup(warmup_iters: int, warmup_factor: float) -> None:
    if warmup_iters < 0 or not 0.0 < warmup_factor <= 1.0:
        raise ConfigError(
            f"scheduler.warmup_iters must be >= 0 and scheduler.warmup_factor in (0, 1] "
            f"(got {warmup_iters}, {warmup_factor})"
        )


def constant(
    optimizer: Optimizer, total_steps: int, warmup_iters: int = 0, warmup_factor: float = 0.1
) -> LambdaLR:
    """Constant learning rate after an optional warm-up."""
    _check_warmup(warmup_iters, warmup_factor)
    return LambdaLR(optimizer, _MultiStep([], 1.0, warmup_iters, warmup_factor))


def multistep(
    optimizer: Optimizer,
    total_steps: int,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    warmup_iters: int = 0,
    warmup_factor: float = 0.1,
) -> LambdaLR:
    """Multiply the learning rate by ``gamma`` at each iteration in ``milestones`` (the paper's schedule)."""
    _check_warmup(warmup_iters, warmup_factor)
    if not 0.0 < gamma <= 1.0:
        raise ConfigError(f"scheduler.gamma must lie in (0, 1] (got {gamma})")
    return LambdaLR(optimizer, _MultiStep(milestones, gamma, warmup_iters, warmup_factor))


def cosine(
    optimizer: Optimizer,
    total_steps: int,
    warmup_iters: int = 0,
    warmup_factor: float = 0.1,
    min_factor: float = 0.0,
) -> LambdaLR:
    """Cosine decay from the base rate to ``min_factor`` times it over the run's iterations."""
    _check_warmup(warmup_iters, warmup_factor)
    return LambdaLR(optimizer, _Cosine(total_steps, warmup_iters, warmup_factor, min_factor))
