"""Training images/s of the real trainer (loader, logging, checks, clipping) against a bare step.

For each setting the script builds a :class:`softmine.engine.Trainer` and, in one run,
interleaving the two so that load on the machine affects both alike:

* **bare**: the trainer's own objective and optimizer stepped on batches already
  fetched and already on the device (zero_grad, forward, backward, optimizer step:
  the floor of any training loop);
* **trainer**: ``Trainer.fit`` for ``--steps`` iterations (``trainer.max_iters``) of a
  fresh trainer, timed as the wall time of its training loop less the evaluations in
  it (``Trainer._evaluate_now``: the final evaluation and the checkpoint written before
  it, end-of-run work the bare loop does not do): loader, host-device traffic, per-step
  values, logging and the work between epochs, non-finite checks, interrupt checks and
  gradient clipping included.

The two take turns trial by trial (``--trials`` of each); a bare trial repeats its
passes over the batches for at least ``--min-trial-s`` seconds, and ``--steps`` is
raised where needed so that a trainer trial lasts as long (sized from an untimed
warm-up trial of bare steps). It prints images/s of both, best and median, and
``trainer/bare = BEST (median MEDIAN)`` last per setting: 1.00 would mean the
loop around the step costs nothing.

Clock: where a setting trains on the CPU with one thread and no loader workers (the
digits demo), both are timed by the process's CPU time, which other jobs on a
shared machine do not lengthen (everything the trainer does runs on that thread);
otherwise (a GPU, several threads, worker processes) by the wall clock.

Settings: the digits demo (``experiment=demo``: tiny CNN, P x K = 8 x 8, one CPU thread,
no gradient clipping, as ``make demo`` runs it; small enough that per-step overheads
show), the same with ``trainer.grad_clip=10`` (the trainer then also scales every
gradient, which the bare step does not: for information) and, with ``--cub``, the authors-CUB
setting (BN-Inception, 8 x 7, ``backbone.pretrained=false``) on a fake CUB folder at
``--cub-size`` pixels.
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
from _timing import MIN_TRIAL_S, TRIALS, Summary, headline, interleave, run_for

from softmine.config import compose_config
from softmine.engine import Trainer
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


def bare(overrides: list[str], steps: int, min_s: float = 0.0) -> float:
    """Images/s of bare optimizer steps of the trainer's objective on prefetched device batches.

    Passes over the ``steps`` batches are repeated for at least ``min_s`` seconds.
    """
    with tempfile.TemporaryDirectory() as tmp:
        t = Trainer(compose_config([*QUIET, *overrides]), Path(tmp))
        batches: list = []
        while len(batches) < steps:
            batches += [b for _, b in zip(range(steps - len(batches)), t.loader, strict=False)]
        from softmine.engine.embedding import to_model_input

        batches = [
            (to_model_input(x, t.device, t.device_transform), y.to(t.device)) for x, y in batches
        ]

        def step(x: torch.Tensor, y: torch.Tensor) -> None:
            t.optimizer.zero_grad(set_to_none=True)
            loss, _ = t.objective(x, y)
            loss.backward()
            t.optimizer.step()

        step(*batches[0])  # warm-up
        _sync(t.device)

        def one_pass() -> None:
            for x, y in batches:
                step(x, y)

        trial = run_for(one_pass, min_s, clock=clock_of(t), sync=lambda: _sync(t.device))
        return trial.rate * sum(len(y) for _, y in batches)


def trainer(overrides: list[str], steps: int) -> float:
    """Images/s of ``Trainer.fit`` over ``steps`` iterations (its loop, evaluations left out)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config([*QUIET, *overrides, f"trainer.max_iters={steps}"])
        t = Trainer(cfg, Path(tmp))
        batch = t.sampler.P * t.sampler.K
        spent = {"loop": 0.0, "evaluations": 0.0}
        clock = clock_of(t)
        t._loop = _timed(t._loop, spent, "loop", clock)  # type: ignore[method-assign]
        t._evaluate_now = _timed(t._evaluate_now, spent, "evaluations", clock)  # type: ignore[method-assign]
        t.fit()
        return steps * batch / (spent["loop"] - spent["evaluations"])


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
    p.add_argument("--steps", type=int, default=150, help="timed iterations (digits)")
    p.add_argument("--cub-steps", type=int, default=6, help="timed iterations (CUB)")
    p.add_argument("--trials", type=int, default=TRIALS, help="interleaved trials of each")
    p.add_argument("--cub", action="store_true", help="also the authors-CUB setting")
    p.add_argument("--cub-size", type=int, default=96, help="CUB image size (pixels)")
    p.add_argument(
        "--min-trial-s", type=float, default=MIN_TRIAL_S, help="least wall time of one trial"
    )
    args = p.parse_args()
    device = "cuda " + torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"training images/s, {device}, {os.cpu_count()} CPUs, {args.trials} interleaved trials")
    print("clock: process CPU time on one CPU thread without loader workers, else wall clock")
    with tempfile.TemporaryDirectory() as data:
        root = (
            make_cub(Path(data) / "CUB_200_2011", num_classes=16, images_per_class=8, size=64)
            if args.cub
            else None
        )
        for name, overrides in settings(root, args.cub_size).items():
            steps = args.cub_steps if "cub" in name else args.steps
            # enough iterations that a trial of Trainer.fit lasts >= --min-trial-s (it is
            # slower than bare steps): from an untimed warm-up trial of bare steps
            per_step = 1.0 / bare(overrides, steps) * _batch(overrides)
            steps = max(steps, math.ceil(1.1 * args.min_trial_s / per_step))
            runs = interleave(
                {
                    "bare": lambda o=overrides, n=steps: bare(o, n, args.min_trial_s),
                    "trainer": lambda o=overrides, n=steps: trainer(o, n),
                },
                args.trials,
                warmup=False,
            )
            b, r = Summary.of(runs["bare"], True), Summary.of(runs["trainer"], True)
            print(f"{name}, {steps} iterations per trial:")
            print(f"  bare optimizer step:  {b.format('9.1f')} images/s")
            print(f"  Trainer.fit:          {r.format('9.1f')} images/s")
            print(headline("  trainer/bare", r / b))


def _batch(overrides: list[str]) -> int:
    """Images per batch (P x K) of a setting."""
    cfg = compose_config([*QUIET, *overrides])
    return int(cfg.sampler.classes_per_batch) * int(cfg.sampler.samples_per_class)


if __name__ == "__main__":
    main()
