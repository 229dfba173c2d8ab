"""Cost of the non-finite weight guard: training steps with and without it, in one run.

After every optimizer step the trainer checks every parameter and floating-point
buffer for NaN/Inf with one fused reduction (:class:`softmine.engine.nonfinite.WeightWatch`)
and reads the result where the step already synchronises. This script times full
training steps of the digits demo's setting (tiny CNN, P x K = 8 x 8) with the guard
and with its update replaced by a no-op, interleaving the two so that load on the
machine affects both alike, and prints the ratio (best of ``--repeats`` rounds of
``--steps`` steps each).

Usage: ``python scripts/bench/guard.py [--steps 30] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from softmine.config import compose_config
from softmine.engine import Trainer

SETTINGS = {"digits tiny CNN (P x K = 8 x 8)": ["trainer.device=auto"]}


def _steps(trainer: Trainer, batches: list, guard: bool) -> float:
    update = trainer.weights.update
    if not guard:
        trainer.weights.update = lambda step: None  # type: ignore[method-assign]
    try:
        t0 = time.perf_counter()
        for x, y in batches:
            trainer.train_step(x, y)
        trainer.check_weights()
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0
    finally:
        trainer.weights.update = update  # type: ignore[method-assign]


def measure(name: str, overrides: list[str], steps: int, repeats: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config(["trainer.progress_bar=false", "trainer.plots=false", *overrides])
        trainer = Trainer(cfg, tmp)
        batches: list = []
        while len(batches) < steps:  # the loader's epochs, as many as the steps need
            batches += [
                b for _, b in zip(range(steps - len(batches)), trainer.loader, strict=False)
            ]
        _steps(trainer, batches[:3], guard=True)  # warm-up
        with_guard, without = [], []
        for _ in range(repeats):
            with_guard.append(_steps(trainer, batches, guard=True))
            without.append(_steps(trainer, batches, guard=False))
        tensors = len(trainer.weights.tensors)
        print(
            f"{name} on {trainer.device}: {len(batches)} steps, {tensors} tensors watched; "
            f"best {min(without):.3f} s without the guard, {min(with_guard):.3f} s with it: "
            f"ratio {min(with_guard) / min(without):.3f}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    for name, overrides in SETTINGS.items():
        measure(name, overrides, args.steps, args.repeats)


if __name__ == "__main__":
    main()
