"""Training images/s of the real trainer (loader, logging, checks) against a bare step.

For each setting the script builds two :class:`softmine.engine.Trainer` of the same
config, each with its own weights, and times them step by step in turn, so that load
on the machine (which comes and goes within a second) falls on both alike:

* **trainer**: ``Trainer.fit`` of the first for ``--steps`` iterations
  (``trainer.max_iters``), timed as its training loop less the evaluations in it
  (``Trainer._evaluate_now``: the final evaluation and the checkpoint written before it,
  end-of-run work the bare loop does not do) and less the bare steps below: loader,
  host-device traffic, per-step values, logging and the work between epochs, the
  gradient norm, non-finite checks and interrupt checks included;
* **bare**: after each of its steps, one bare step of the second trainer's objective and
  optimizer on a batch fetched and moved to the device beforehand (zero_grad, forward,
  backward, optimizer step: the floor of any training loop), timed on its own.

Each trial is one such paired run (``--steps`` is raised where needed so that it lasts
at least ``--min-trial-s``, sized from an untimed warm-up trial). The script prints
images/s of both, best and median over ``--trials`` trials, and last per setting
``trainer/bare = BEST (median MEDIAN)`` over the trials' own ratios: 1.00 would mean
the loop around the step costs nothing.

Clock: where a setting trains on the CPU with one thread and no loader workers (the
digits demo), both are timed by the process's CPU time, which other jobs on a
shared machine do not lengthen (everything the trainer does runs on that thread);
otherwise (a GPU, several threads, worker processes) by the wall clock.

Settings: the digits demo (``experiment=demo``: tiny CNN, P x K = 8 x 8, one CPU thread,
no gradient clipping, as ``make demo`` runs it; small enough that per-step overheads
show), the same with ``trainer.grad_clip=10`` (the trainer then also scales every
gradient, which the bare step does not: for information) and, with ``--cub``, the
authors-CUB setting (BN-Inception, 8 x 7, ``backbone.pretrained=false``) on a fake CUB
folder at ``--cub-size`` pixels.
Usage: ``python scripts/bench/train.py [--steps 150] [--trials 5] [--cub]``.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _timing import MIN_TRIAL_S, TRIALS, Summary, headline

from softmine.config import compose_config
from softmine.engine import Trainer
from softmine.engine.embedding import to_model_input
from softmine.testing.fakes import make_cub

QUIET = ["trainer.progress_bar=false", "trainer.plots=false", "trainer.tensorboard=false"]


def settings(root: Path | None, cub_size: int) -> dict[str, list[str]]:
    """Name -> config overrides of each measured setting."""
    demo = ["experiment=demo", "trainer.baselines=false"]
    out = {
        "digits demo, tiny CNN (P x K = 8 x 8)": demo,
        "digits demo with trainer.grad_clip=10 (for information)": [*demo, "trainer.grad_clip=10"],
    }
    if root is not None:
        out[f"authors_cub BN-Inception (8 x 7, {cub_size} px)"] = [
            "experiment=authors_cub",
            "backbone.pretrained=false",
            f"dataset.root={root}",
            f"dataset.transform.size={cub_size}",
            "trainer.eval_every_iters=0",
            "trainer.checkpoint_every=0",
        ]
    return out


class BareSteps:
    """Bare optimizer steps of a trainer's objective on batches fetched and moved beforehand."""

    def __init__(self, t: Trainer, batches: int) -> None:
        self.t = t
        fetched: list = []
        while len(fetched) < batches:
            fetched += [b for _, b in zip(range(batches - len(fetched)), t.loader, strict=False)]
        self.batches = [
            (to_model_input(x, t.device, t.device_transform), y.to(t.device)) for x, y in fetched
        ]
        self.next = 0
        self.step()  # warm-up
        _sync(t.device)

    def step(self) -> int:
        """One step on the next batch (in turn); returns its images."""
        x, y = self.batches[self.next % len(self.batches)]
        self.next += 1
        self.t.optimizer.zero_grad(set_to_none=True)
        loss, _ = self.t.objective(x, y)
        loss.backward()
        self.t.optimizer.step()
        return len(y)


def paired_trial(overrides: list[str], steps: int) -> tuple[float, float]:
    """Images/s of ``Trainer.fit`` over ``steps`` iterations and of the bare steps taken
    between its steps, each timed apart (the loop less its evaluations and bare steps)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config([*QUIET, *overrides, f"trainer.max_iters={steps}"])
        bare = BareSteps(Trainer(cfg, Path(tmp) / "bare"), steps)
        t = Trainer(cfg, Path(tmp) / "trainer")
        clock = clock_of(t)
        spent = {"loop": 0.0, "evaluations": 0.0, "bare": 0.0}
        images = {"trainer": 0, "bare": 0}
        train_step = t.train_step

        def step_then_bare(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
            values = train_step(x, y)
            images["trainer"] += len(y)
            _sync(t.device)
            t0 = clock()
            images["bare"] += bare.step()
            _sync(t.device)
            spent["bare"] += clock() - t0
            return values

        t.train_step = step_then_bare  # type: ignore[method-assign]
        t._loop = _timed(t._loop, spent, "loop", clock)  # type: ignore[method-assign]
        t._evaluate_now = _timed(t._evaluate_now, spent, "evaluations", clock)  # type: ignore[method-assign]
        t.fit()
        trainer_s = spent["loop"] - spent["evaluations"] - spent["bare"]
        return images["trainer"] / trainer_s, images["bare"] / spent["bare"]


def clock_of(t: Trainer) -> Callable[[], float]:
    """The process's CPU time for a trainer on one CPU thread without loader workers, else
    the wall clock (work on a GPU, on other threads or in workers would not count)."""
    one_thread = t.device.type == "cpu" and torch.get_num_threads() == 1
    return time.process_time if one_thread and t.loader.num_workers == 0 else time.perf_counter


def _timed(
    fn: Callable[[], Any], spent: dict[str, float], key: str, clock: Callable[[], float]
) -> Callable[[], Any]:
    """``fn`` adding its time on ``clock`` to ``spent[key]``."""

    def timed() -> Any:
        t0 = clock()
        try:
            return fn()
        finally:
            spent[key] += clock() - t0

    return timed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=150, help="least iterations a trial (digits)")
    p.add_argument("--cub-steps", type=int, default=6, help="least iterations a trial (CUB)")
    p.add_argument("--trials", type=int, default=TRIALS, help="paired trials")
    p.add_argument("--cub", action="store_true", help="also the authors-CUB setting")
    p.add_argument("--cub-size", type=int, default=96, help="CUB image size (pixels)")
    p.add_argument(
        "--min-trial-s", type=float, default=MIN_TRIAL_S, help="least time of a trial's trainer"
    )
    args = p.parse_args()
    device = "cuda " + torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"training images/s, {device}, {os.cpu_count()} CPUs, {args.trials} paired trials")
    print("clock: process CPU time on one CPU thread without loader workers, else wall clock")
    with tempfile.TemporaryDirectory() as data:
        root = (
            make_cub(Path(data) / "CUB_200_2011", num_classes=16, images_per_class=8, size=64)
            if args.cub
            else None
        )
        for name, overrides in settings(root, args.cub_size).items():
            steps = args.cub_steps if "cub" in name else args.steps
            # enough iterations that the trainer's share of a trial lasts >= --min-trial-s:
            # sized from an untimed warm-up trial
            rate, _ = paired_trial(overrides, steps)
            steps = max(steps, math.ceil(1.1 * args.min_trial_s * rate / _batch(overrides)))
            runs = [paired_trial(overrides, steps) for _ in range(args.trials)]
            r = Summary.of([trainer for trainer, _ in runs], True)
            b = Summary.of([bare for _, bare in runs], True)
            ratio = Summary.of([trainer / bare for trainer, bare in runs], True)
            print(f"{name}, {steps} iterations per trial:")
            print(f"  bare optimizer step:  {b.format('9.1f')} images/s")
            print(f"  Trainer.fit:          {r.format('9.1f')} images/s")
            print(headline("  trainer/bare", ratio))


def _batch(overrides: list[str]) -> int:
    """Images per batch (P x K) of a setting."""
    cfg = compose_config([*QUIET, *overrides])
    return int(cfg.sampler.classes_per_batch) * int(cfg.sampler.samples_per_class)


if __name__ == "__main__":
    main()
