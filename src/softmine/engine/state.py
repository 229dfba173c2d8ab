"""Where a training run is: the plain record a checkpoint stores to resume it exactly."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainState:
    """Where the run is: enough, with the RNG states, to resume it exactly."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # current epoch (0-based)
    batch: int = 0  # batches of the current epoch already consumed
    sums: dict[str, float] = field(
        default_factory=dict
    )  # running sums of this epoch's logged values
    batches_in_epoch: int = 0
    interval_sums: dict[str, float] = field(
        default_factory=dict
    )  # running sums since the last trainer.log_every row
    interval_steps: int = 0  # applied steps in interval_sums
    skipped_steps: int = 0  # steps skipped for non-finite values (on_nonfinite=skip)
    best: float | None = None  # best monitored metric so far
    metrics: dict[str, float] = field(default_factory=dict)  # latest evaluation
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)
    finished: bool = False
    log_rows: int = 0  # rows in train_log.csv when this state was saved
    evals: list[dict[str, float]] = field(default_factory=list)  # every evaluation (eval_log.csv)
    last_eval_step: int = -1  # step of the latest evaluation
