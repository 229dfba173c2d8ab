"""Summarise training run folders: images/s, data wait vs compute, peak GPU memory, full-run time.

Reads each run's ``train_log.csv`` epoch rows (``epoch_time_s``, ``data_s``, ``step_s``,
``images_per_s``, ``peak_mem_gib`` on CUDA) and prints one line per run plus the
wall time extrapolated to ``--full-iters`` iterations (the first epoch, which holds
cuDNN's autotuning and the workers' start, is left out of the rate when there are
more) plus ``--evals`` evaluations, each taking the mean ``eval_s`` of the run's
``eval_log.csv`` (the time one evaluation took there; ``--eval-seconds`` overrides it).
With ``--decode-rate`` (images/s the host decodes with every core, measured by
``gpu_check.sh``) it also prints the full run's data-decode floor: the images it reads
(``--full-iters`` x images per iteration + ``--evals`` x ``--eval-images``) over that
rate, and the full run's time as a multiple of it (the issue's goal: within 2x).
Used by ``scripts/gpu_check.sh``. Usage:
``python scripts/gpu_report.py RUN_DIR [RUN_DIR ...] [--full-iters 3000]``.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from softmine.runs.layout import RUN_FILES, RunLayout


def summarise(run_dir: Path, full_iters: int) -> dict[str, float]:
    """Rates and times of one run folder (its epoch rows)."""
    files = RunLayout(run_dir)
    rows = [r for r in csv.DictReader(files.train_log.open()) if r.get("epoch_time_s")]
    if not rows:
        raise SystemExit(f"{run_dir}: no epoch rows in {RUN_FILES.train_log}")
    steps = [int(float(r["step"])) for r in rows]
    per_epoch = [b - a for a, b in zip([0, *steps[:-1]], steps, strict=True)]
    use = slice(1, None) if len(rows) > 1 else slice(None)
    seconds = sum(float(r["epoch_time_s"]) for r in rows[use])
    iters = sum(per_epoch[use])
    data = sum(float(r["data_s"]) for r in rows[use])
    images = sum(float(r["images_per_s"]) * float(r["epoch_time_s"]) for r in rows[use])
    peak = max((float(r["peak_mem_gib"]) for r in rows if r.get("peak_mem_gib")), default=0.0)
    evals = files.eval_log
    eval_times = (
        [float(r["eval_s"]) for r in csv.DictReader(evals.open())] if evals.is_file() else []
    )
    return {
        "eval_s": sum(eval_times) / len(eval_times) if eval_times else float("nan"),
        "iters": steps[-1],
        "images_per_s": images / seconds,
        "data_share": data / seconds,
        "s_per_iter": seconds / iters,
        "peak_mem_gib": peak,
        "full_train_s": full_iters * seconds / iters,
        "images_per_iter": images / iters,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--full-iters", type=int, default=3000)
    p.add_argument(
        "--eval-seconds", type=float, default=None, help="one evaluation's time (default: measured)"
    )
    p.add_argument("--evals", type=int, default=9, help="evaluations of the full run")
    p.add_argument("--decode-rate", type=float, default=None, help="host JPEG decodes per second")
    p.add_argument("--eval-images", type=int, default=5924, help="images one evaluation reads")
    args = p.parse_args()
    floor = None
    print(
        f"{'run':<28}{'iters':>6}{'img/s':>9}{'data wait':>10}{'s/iter':>8}"
        f"{'peak GiB':>9}{'eval s':>8}{'full run':>10}{'/ floor':>9}"
    )
    for run in args.runs:
        s = summarise(run, args.full_iters)
        one_eval = s["eval_s"] if args.eval_seconds is None else args.eval_seconds
        total = s["full_train_s"] + args.evals * one_eval
        images = args.full_iters * s["images_per_iter"] + args.evals * args.eval_images
        floor = None if args.decode_rate is None else images / args.decode_rate
        ratio = f"{total / floor:>8.2f}x" if floor else f"{'-':>9}"
        print(
            f"{run.name:<28}{s['iters']:>6.0f}{s['images_per_s']:>9.0f}{s['data_share']:>9.0%}"
            f"{s['s_per_iter']:>8.3f}{s['peak_mem_gib']:>9.2f}{one_eval:>8.1f}{total / 60:>8.1f} m"
            f"{ratio}"
        )
    if floor:
        print(
            f"decode floor of the full run: {images:,.0f} images / {args.decode_rate:,.0f} images/s"
            f" = {floor / 60:.1f} m"
        )


if __name__ == "__main__":
    main()
