"""scripts/gpu_report.py (the summary of gpu_check.sh) on hand-made run folders."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_report.py"


def fake_run(folder: Path) -> Path:
    """Three epochs of 10 iterations; the first (autotuning) is slow and must be left out."""
    folder.mkdir(parents=True)
    pd.DataFrame(
        {
            "epoch": [1, 2, 3],
            "step": [10, 20, 30],
            "epoch_time_s": [50.0, 4.0, 6.0],
            "data_s": [1.0, 1.0, 2.0],
            "images_per_s": [11.2, 140.0, 560 / 6],  # 56 images per iteration
            "peak_mem_gib": [3.0, 3.5, 3.25],
        }
    ).to_csv(folder / "train_log.csv", index=False)
    pd.DataFrame({"iteration": [30], "epoch": [3], "recall@1": [0.5], "eval_s": [12.0]}).to_csv(
        folder / "eval_log.csv", index=False
    )
    return folder


def test_rates_leave_out_the_first_epoch_and_evaluations_are_measured(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "bf16_cache")
    cmd = [sys.executable, str(SCRIPT), str(run), "--full-iters", "3000", "--decode-rate", "1000"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    row = next(line for line in out.splitlines() if line.startswith("bf16_cache")).split()
    # epochs 2-3: 20 iterations, 1,120 images in 10 s; data 3 s of 10
    # full run: 3000 * 0.5 s = 1500 s + 9 evaluations x 12 s = 1608 s = 26.8 m
    # floor: (3000 * 56 + 9 * 5924) images / 1000 per s = 221.316 s; 1608 / 221.316 = 7.27
    assert row[1:9] == ["30", "112", "30%", "0.500", "3.50", "12.0", "26.8", "m"]
    assert row[9] == "7.27x"
    assert "221,316 images / 1,000 images/s = 3.7 m" in out


def test_eval_seconds_override_the_measured_time(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "fp32")
    cmd = [sys.executable, str(SCRIPT), str(run), "--eval-seconds", "0", "--evals", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    row = next(line for line in out.splitlines() if line.startswith("fp32")).split()
    assert row[6:9] == ["0.0", "25.0", "m"] and row[9] == "-"
