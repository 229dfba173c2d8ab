"""CSV logging of training rows (one row per logged epoch or step)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any


class CSVLogger:
    """Appends dict rows to a CSV file; new keys extend the header (file rewritten once)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        if self.path.exists():
            with self.path.open(newline="") as f:
                self.rows = list(csv.DictReader(f))

    def log(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        fields: list[str] = []
        for r in self.rows:
            fields.extend(k for k in r if k not in fields)
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.rows)
        tmp.replace(self.path)
