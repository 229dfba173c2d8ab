"""Run logging: a CSV of training rows always, TensorBoard scalars when it is installed."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class RunLogger:
    """Writes dict rows to ``<run_dir>/<csv_name>`` (header grows with new keys) and to TensorBoard.

    Args:
        run_dir: the run folder.
        csv_name: file name of the CSV log.
        tensorboard: ``auto`` (use it when installed), ``true`` (require it) or ``false``.
        enabled: False keeps rows in memory only (ranks other than 0 under torch.distributed).
    """

    def __init__(
        self, run_dir: Path, csv_name: str, tensorboard: str | bool = "auto", enabled: bool = True
    ) -> None:
        self.path = Path(run_dir) / csv_name
        self.enabled = enabled
        self.rows: list[dict[str, Any]] = []
        if self.path.exists():
            with self.path.open(newline="") as f:
                self.rows = list(csv.DictReader(f))
        self.writer = self._tensorboard(Path(run_dir), str(tensorboard).lower())

    @staticmethod
    def _tensorboard(run_dir: Path, mode: str) -> Any:
        if mode in ("false", "0", "no", "none"):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            if mode in ("true", "1", "yes"):
                from softmine.errors import ConfigError

                raise ConfigError(
                    "trainer.tensorboard=true but tensorboard is not installed; "
                    "pip install 'softmine[tensorboard]' or set trainer.tensorboard=auto"
                ) from None
            return None
        return SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def __len__(self) -> int:
        return len(self.rows)

    def truncate(self, n_rows: int) -> None:
        """Keep only the first ``n_rows`` rows (rows written after a checkpoint are replayed on resume)."""
        if n_rows < len(self.rows):
            self.rows = self.rows[:n_rows]
            self._write()

    def log(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self._write()
        if self.writer is not None and "step" in row:
            for k, v in row.items():
                if isinstance(v, int | float) and k not in ("step", "epoch"):
                    self.writer.add_scalar(k, v, int(row["step"]))

    def _write(self) -> None:
        if not self.enabled:
            return
        fields: list[str] = []
        for r in self.rows:
            fields.extend(k for k in r if k not in fields)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.rows)
        tmp.replace(self.path)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None
