"""Training engine: the loop, logging, checkpoints and run bookkeeping.

``Trainer``, ``format_table`` and ``write_metrics`` are loaded on first use, so the
light modules of the engine (the run folder's lock and record, sweeps) import
without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from softmine.engine.trainer import Trainer, format_table, write_metrics

__all__ = ["Trainer", "format_table", "write_metrics"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from softmine.engine import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
