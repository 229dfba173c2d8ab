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

It prints images/s of both (best of ``--trials``) and ``trainer/bare`` last per
setting: 1.00 would mean the loop around the step costs nothing.

Settings: the digits demo (tiny CNN, P x K = 8 x 8, one CPU thread as ``make demo``;
small enough that per-step overheads show) and, with ``--cub``, the authors-CUB
setting (BN-Inception, 8 x 7, ``backbone.pretrained=false``) on a fake CUB folder at
``--cub-size`` pixels.
Usage: ``python scripts/bench/train.py [--steps 150] [--trials 3] [--cub]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from softmine.config import compose_config
from softmine.engine import Trainer
from softmine.testing.fakes import make_cub

QUIET = ["trainer.progress_bar=false", "trainer.plots=false", "trainer.tensorboard=false"]


def settings(root: Path | None, cub_size: int) -> dict[str, list[str]]:
    """Name -> config overrides of each measured setting."""
    out = {"digits tiny CNN (P x K = 8 x 8)": ["trainer.grad_clip=10.0", "trainer.num_threads=1"]}
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


def bare(overrides: list[str], steps: int) -> float:
    """Images/s of bare optimizer steps of the trainer's objective on prefetched device batches."""
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
        t0 = time.perf_counter()
        for x, y in batches:
            step(x, y)
        _sync(t.device)
        return sum(len(y) for _, y in batches) / (time.perf_counter() - t0)


def trainer(overrides: list[str], steps: int) -> float:
    """Images/s of ``Trainer.fit`` over ``steps`` iterations (its loop, evaluations left out)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config([*QUIET, *overrides, f"trainer.max_iters={steps}"])
        t = Trainer(cfg, Path(tmp))
        batch = t.sampler.P * t.sampler.K
        spent = {"loop": 0.0, "evaluations": 0.0}
        t._loop = _timed(t._loop, spent, "loop")  # type: ignore[method-assign]
        t._evaluate_now = _timed(t._evaluate_now, spent, "evaluations")  # type: ignore[method-assign]
        t.fit()
        return steps * batch / (spent["loop"] - spent["evaluations"])


def _timed(fn: Callable[[], Any], spent: dict[str, float], key: str) -> Callable[[], Any]:
    """``fn`` adding its wall time to ``spent[key]``."""

    def timed() -> Any:
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            spent[key] += time.perf_counter() - t0

    return timed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=150, help="timed iterations (digits)")
    p.add_argument("--cub-steps", type=int, default=6, help="timed iterations (CUB)")
    p.add_argument("--trials", type=int, default=3, help="interleaved trials, best of each")
    p.add_argument("--cub", action="store_true", help="also the authors-CUB setting")
    p.add_argument("--cub-size", type=int, default=96, help="CUB image size (pixels)")
    args = p.parse_args()
    device = "cuda " + torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"training images/s, {device}, {os.cpu_count()} CPUs, best of {args.trials}")
    with tempfile.TemporaryDirectory() as data:
        root = (
            make_cub(Path(data) / "CUB_200_2011", num_classes=16, images_per_class=8, size=64)
            if args.cub
            else None
        )
        for name, overrides in settings(root, args.cub_size).items():
            steps = args.cub_steps if "cub" in name else args.steps
            bare_best, real_best = 0.0, 0.0
            for _ in range(args.trials):
                bare_best = max(bare_best, bare(overrides, steps))
                real_best = max(real_best, trainer(overrides, steps))
            print(f"{name}, {steps} iterations:")
            print(f"  bare optimizer step:  {bare_best:9.1f} images/s")
            print(f"  Trainer.fit:          {real_best:9.1f} images/s")
            print(f"  trainer/bare = {real_best / bare_best:.2f}")


if __name__ == "__main__":
    main()
