"""Training engine: the loop, logging, checkpoints and run bookkeeping.

``Trainer`` is loaded on first use, so the light modules of the engine (the run
folder's lock and record, sweeps) import without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from softmine.runs.metrics_file import format_table, write_metrics

if TYPE_CHECKING:
    from softmine.engine.trainer import Trainer

__all__ = ["Trainer", "format_table", "write_metrics"]


def __getattr__(name: str) -> Any:
    if name == "Trainer":
        from softmine.engine.trainer import Trainer

        return Trainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
