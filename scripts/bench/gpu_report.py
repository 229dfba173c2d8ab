"""Summarise training run folders: images/s, data wait vs compute, peak GPU memory, full-run time.

Reads each run's ``train_log.csv`` epoch rows (``epoch_time_s``, ``data_s``, ``step_s``,
``images_per_s``, ``peak_mem_gib`` on CUDA) and prints one line per run plus the
wall time extrapolated to ``--full-iters`` iterations (the first epoch, which holds
cuDNN's autotuning and the workers' start, is left out of the rate when there are
more), plus the evaluation time measured by ``--eval-seconds`` when given.
Used by ``scripts/gpu_check.sh``. Usage:
``python scripts/bench/gpu_report.py RUN_DIR [RUN_DIR ...] [--full-iters 3000]``.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def summarise(run_dir: Path, full_iters: int) -> dict[str, float]:
    """Rates and times of one run folder (its epoch rows)."""
    rows = [r for r in csv.DictReader((run_dir / "train_log.csv").open()) if r.get("epoch_time_s")]
    if not rows:
        raise SystemExit(f"{run_dir}: no epoch rows in train_log.csv")
    steps = [int(float(r["step"])) for r in rows]
    per_epoch = [b - a for a, b in zip([0, *steps[:-1]], steps, strict=True)]
    use = slice(1, None) if len(rows) > 1 else slice(None)
    seconds = sum(float(r["epoch_time_s"]) for r in rows[use])
    iters = sum(per_epoch[use])
    data = sum(float(r["data_s"]) for r in rows[use])
    images = sum(float(r["images_per_s"]) * float(r["epoch_time_s"]) for r in rows[use])
    peak = max((float(r["peak_mem_gib"]) for r in rows if r.get("peak_mem_gib")), default=0.0)
    return {
        "iters": steps[-1],
        "images_per_s": images / seconds,
        "data_share": data / seconds,
        "s_per_iter": seconds / iters,
        "peak_mem_gib": peak,
        "full_train_s": full_iters * seconds / iters,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--full-iters", type=int, default=3000)
    p.add_argument("--eval-seconds", type=float, default=0.0, help="one evaluation's time")
    p.add_argument("--evals", type=int, default=9, help="evaluations of the full run")
    args = p.parse_args()
    print(
        f"{'run':<28}{'iters':>6}{'img/s':>9}{'data wait':>10}{'s/iter':>8}"
        f"{'peak GiB':>9}{'full run':>10}"
    )
    for run in args.runs:
        s = summarise(run, args.full_iters)
        total = s["full_train_s"] + args.evals * args.eval_seconds
        print(
            f"{run.name:<28}{s['iters']:>6.0f}{s['images_per_s']:>9.0f}{s['data_share']:>9.0%}"
            f"{s['s_per_iter']:>8.3f}{s['peak_mem_gib']:>9.2f}{total / 60:>8.1f} m"
        )


if __name__ == "__main__":
    main()
