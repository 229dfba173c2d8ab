"""Hydra callbacks: a multirun writes ``summary.csv`` (one row per job) at the sweep root."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def collect_runs(sweep_dir: Path) -> pd.DataFrame:
    """One row per run folder under ``sweep_dir`` that has a ``metrics.json``.

    Columns: ``job`` (folder name), one column per override key (the value given on
    the command line) and one per metric. Runs without metrics (failed) are listed
    with ``status=failed`` so no job is silently missing.
    """
    rows: list[dict[str, Any]] = []
    for overrides_file in sorted(Path(sweep_dir).glob("*/.hydra/overrides.yaml")):
        job_dir = overrides_file.parent.parent
        row: dict[str, Any] = {"job": job_dir.name}
        for item in yaml.safe_load(overrides_file.read_text()) or []:
            key, _, value = str(item).partition("=")
            row[key.lstrip("+~")] = value
        metrics_file = job_dir / "metrics.json"
        if metrics_file.exists():
            row.update(json.loads(metrics_file.read_text()))
            row["status"] = "ok"
        else:
            row["status"] = "failed"
        rows.append(row)
    df = pd.DataFrame(rows)
    if "job" in df and df["job"].str.isdigit().all():
        df = df.iloc[df["job"].astype(int).argsort()].reset_index(drop=True)
    return df


class SummaryCallback(Callback):
    """At the end of a multirun, write ``summary.csv`` at the sweep root."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        df = collect_runs(sweep_dir)
        if df.empty:
            log.warning("no finished runs under %s; summary.csv not written", sweep_dir)
            return
        df.to_csv(sweep_dir / "summary.csv", index=False)
        log.info("wrote %s (%d runs)", sweep_dir / "summary.csv", len(df))


class RunFolderCheck(Callback):
    """Before Hydra creates the run (or sweep) folder, prove it is writable: one line and exit 2 if not."""

    def _check(self, folder: str) -> None:
        import sys

        from softmine.engine.validate import check_writable
        from softmine.errors import ConfigError

        try:
            check_writable(Path(folder))
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir)
