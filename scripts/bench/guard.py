"""Cost of the non-finite weight guard: training steps with and without it, in one run.

After every optimizer step the trainer checks every parameter and floating-point
buffer for NaN/Inf with one fused reduction (:class:`softmine.engine.nonfinite.WeightWatch`)
and reads the result where the step already synchronises. This script times full
training steps of the digits demo's setting (tiny CNN, P x K = 8 x 8) with the guard
and with its update replaced by a no-op, interleaving the two so that load on the
machine affects both alike (``--trials`` of each, each repeating passes over
``--steps`` batches for at least ``--min-trial-s`` seconds, after an untimed warm-up
trial), and prints the time per step and the ratio, best and median. On the CPU the
steps run on one thread and are timed by the process's CPU time, which other jobs on
the machine do not lengthen (wall-clock ratios of this bench swung 2x between runs on
a shared 2-core machine); on a GPU by the wall clock, synchronised.

Usage: ``python scripts/bench/guard.py [--steps 30] [--trials 5]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from _timing import MIN_TRIAL_S, TRIALS, Summary, headline, interleave, run_for

from softmine.config import compose_config
from softmine.engine import Trainer

SETTINGS = {"digits tiny CNN (P x K = 8 x 8)": ["trainer.device=auto"]}


def _steps(trainer: Trainer, batches: list, guard: bool, min_s: float) -> float:
    """Seconds per training step, passes over ``batches`` repeated for at least ``min_s``."""
    update = trainer.weights.update
    if not guard:
        trainer.weights.update = lambda step: None  # type: ignore[method-assign]

    def one_pass() -> None:
        for x, y in batches:
            trainer.train_step(x, y)
        trainer.check_weights()

    def sync() -> None:
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()

    clock = time.perf_counter if trainer.device.type == "cuda" else time.process_time
    try:
        return run_for(one_pass, min_s, clock, sync).per_unit / len(batches)
    finally:
        trainer.weights.update = update  # type: ignore[method-assign]


def measure(name: str, overrides: list[str], steps: int, trials: int, min_s: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config(["trainer.progress_bar=false", "trainer.plots=false", *overrides])
        trainer = Trainer(cfg, tmp)
        if trainer.device.type == "cpu":
            torch.set_num_threads(1)  # process CPU time then measures the step, not idle spinning
        batches: list = []
        while len(batches) < steps:  # the loader's epochs, as many as the steps need
            batches += [
                b for _, b in zip(range(steps - len(batches)), trainer.loader, strict=False)
            ]
        runs = interleave(
            {
                "without": lambda: _steps(trainer, batches, False, min_s),
                "with": lambda: _steps(trainer, batches, True, min_s),
            },
            trials,
        )
        without, with_guard = (Summary.of(runs[k], False) for k in ("without", "with"))
        tensors = len(trainer.weights.tensors)
        print(
            f"{name} on {trainer.device}: passes over {len(batches)} batches for >= {min_s:g} s "
            f"per trial ({'wall clock' if trainer.device.type == 'cuda' else 'CPU time, 1 thread'}), "
            f"{trials} interleaved trials, {tensors} tensors watched"
        )
        print(f"  ms per step without the guard: {without.scaled(1e3).format('.3f')}")
        print(f"  ms per step with the guard:    {with_guard.scaled(1e3).format('.3f')}")
        print(headline("  guard: with/without", with_guard / without, ".3f"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30, help="batches of one pass")
    p.add_argument("--trials", type=int, default=TRIALS, help="interleaved trials of each")
    p.add_argument(
        "--min-trial-s",
        type=float,
        default=MIN_TRIAL_S,
        help="least time of one trial (CPU time on the CPU)",
    )
    args = p.parse_args()
    for name, overrides in SETTINGS.items():
        measure(name, overrides, args.steps, args.trials, args.min_trial_s)


if __name__ == "__main__":
    main()
