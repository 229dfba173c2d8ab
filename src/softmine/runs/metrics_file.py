"""The results a run leaves as text: ``metrics.json`` and the printed comparison table.

Both the training loop (:mod:`softmine.engine.trainer`) and the end-of-run
artifacts (:mod:`softmine.reporting.artifacts`) write ``metrics.json``; they import
it from here, so neither of them imports the other.
"""

from __future__ import annotations

import json
from pathlib import Path

from softmine.runs.atomic import write_text_atomic
from softmine.runs.layout import RunLayout, read_metrics

__all__ = ["STEP_KEY", "format_table", "read_metrics", "write_metrics"]

#: The key of ``metrics.json`` that names the training step its final metrics belong to, so
#: that a consumer can tell whether ``checkpoints/last.pt`` holds that same network.
STEP_KEY = "iteration"


def write_metrics(run_dir: Path, metrics: dict[str, float]) -> Path:
    """Write the flat metrics dict to ``metrics.json`` atomically."""
    text = json.dumps(metrics, indent=2, sort_keys=True) + "\n"
    return write_text_atomic(RunLayout(run_dir).metrics, text)


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """A small fixed-width table: one row per embedding, one column per metric."""
    cols = list(next(iter(rows.values())).keys())
    name_w = max(len(n) for n in rows) + 2
    widths = [max(len(c), 7) + 2 for c in cols]
    head = "".ljust(name_w) + "".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))
    lines = [head, "-" * len(head)]
    for name, m in rows.items():
        cells = (f"{m.get(c, float('nan')):{w}.4f}" for c, w in zip(cols, widths, strict=True))
        lines.append(name.ljust(name_w) + "".join(cells))
    return "\n".join(lines)
