"""Training engine: the loop, logging, checkpoints and run bookkeeping."""

from softmine.engine.trainer import Trainer, format_table, write_metrics

__all__ = ["Trainer", "format_table", "write_metrics"]
