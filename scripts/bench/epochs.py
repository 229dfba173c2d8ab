"""Epoch boundaries: one DataLoader iterator for the run against one iterator per epoch.

Both loaders read the same P x K batches of a fake CUB (``make_cub`` images scaled
to 500 x 375 JPEGs) through the DML train transform with ``--workers`` workers,
while the main process "trains" by sleeping ``--step-ms`` per batch (a GPU step
the host waits on). The baseline is the trainer before the change: per epoch
``set_epoch`` and a fresh ``iter(loader)`` with persistent workers, whose queue
drains at the end of every epoch and refills at the start of the next. The
measured path is ``RunBatchSampler``: one iterator over all epochs, items seeded
per item (``SeededItems``). The two take turns trial by trial (``--trials`` of
each); ``--epochs`` is raised where needed so that a trial lasts at least
``--min-trial-s`` seconds (sized from an untimed pilot trial). Prints the wall time
per batch of each, best and median, and ``epochs: run/per_epoch = BEST (median
MEDIAN)`` (below 1: faster).

Usage: ``python scripts/bench/epochs.py [--epochs 6] [--workers 2] [--step-ms 20]``.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
from _timing import MIN_TRIAL_S, TRIALS, Summary, headline, interleave
from PIL import Image
from torch.utils.data import DataLoader

from softmine.config import build, compose_config
from softmine.data import CUB200, PKSampler
from softmine.data.run_batches import RunBatchSampler, SeededItems
from softmine.testing.fakes import make_cub


def photos(root: Path) -> None:
    """Replace the fake copy's tiny images by 500 x 375 noisy JPEGs (a real decode cost)."""
    rng = np.random.default_rng(0)
    for p in sorted((root / "images").rglob("*.jpg")):
        pixels = rng.integers(0, 256, size=(375, 500, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(p, quality=90)


def per_epoch(ds: CUB200, sampler: PKSampler, args: argparse.Namespace) -> float:
    """Seconds per batch with an iterator per epoch (persistent workers)."""
    loader = DataLoader(
        ds, batch_sampler=sampler, num_workers=args.workers, persistent_workers=True
    )
    sampler.set_epoch(0)
    next(iter(loader))  # workers started, as in a running trainer
    n, start = 0, time.perf_counter()
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for _ in loader:
            time.sleep(args.step_ms / 1000)
            n += 1
    return (time.perf_counter() - start) / n


def one_run(ds: CUB200, sampler: PKSampler, args: argparse.Namespace) -> float:
    """Seconds per batch with one iterator over all epochs (RunBatchSampler)."""
    run = RunBatchSampler(sampler, seed=0, seed_items=True)
    run.start_at(0, 0, end_epoch=args.epochs + 1)
    loader = DataLoader(SeededItems(ds), batch_sampler=run, num_workers=args.workers)
    batches = iter(loader)
    for _ in range(len(sampler.rank_batches(0))):  # epoch 0 warms up, as above
        next(batches)
    n, start = 0, time.perf_counter()
    for _ in batches:
        time.sleep(args.step_ms / 1000)
        n += 1
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", type=int, default=8, help="training classes (8 images each)")
    parser.add_argument("--epochs", type=int, default=6, help="timed epochs (at least)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--step-ms", type=float, default=20.0, help="simulated step per batch")
    parser.add_argument("--trials", type=int, default=TRIALS, help="interleaved trials of each")
    parser.add_argument(
        "--min-trial-s", type=float, default=MIN_TRIAL_S, help="least wall time of one trial"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = make_cub(
            Path(tmp) / "CUB_200_2011", num_classes=2 * args.classes, images_per_class=8
        )
        photos(root)
        cfg = compose_config(["dataset=cub"])
        ds = CUB200(root, "train", transform=build(cfg.dataset.transform.train, "transform"))
        sampler = PKSampler(ds.labels, 4, 4, seed=0)
        per = len(sampler.rank_batches(0))
        print(f"{len(ds)} images, {per} batches of 16 per epoch")
        # enough epochs that a trial lasts >= --min-trial-s, from an untimed pilot trial
        pilot = per_epoch(ds, sampler, args)
        args.epochs = max(args.epochs, math.ceil(1.2 * args.min_trial_s / (pilot * per)))
        runs = interleave(
            {
                "per_epoch": lambda: per_epoch(ds, sampler, args),
                "run": lambda: one_run(ds, sampler, args),
            },
            args.trials,
            warmup=False,
        )
        b, o = Summary.of(runs["per_epoch"], False), Summary.of(runs["run"], False)
        print(f"{args.epochs} epochs per trial, {args.trials} interleaved trials")
        print(f"  per-epoch iterator: {b.scaled(1e3).format('.1f')} ms/batch")
        print(f"  one iterator:       {o.scaled(1e3).format('.1f')} ms/batch")
        print(headline("epochs: run/per_epoch", o / b))


if __name__ == "__main__":
    main()
