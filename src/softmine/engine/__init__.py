"""Training engine: the loop, logging, checkpoints and run bookkeeping."""

from softmine.engine.results import format_table, write_metrics
from softmine.engine.trainer import Trainer

__all__ = ["Trainer", "format_table", "write_metrics"]
