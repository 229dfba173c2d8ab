"""Hydra callbacks of ``softmine-train``: check the output folder first, write ``summary.csv`` last.

Both run in the launching process; the sweep logic itself is in :mod:`softmine.runs.sweep`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from softmine.engine.validate import check_writable
from softmine.errors import ConfigError
from softmine.runs import sweep
from softmine.runs.layout import SWEEP_FILES

log = logging.getLogger(__name__)


def _exit_user_error(e: ConfigError) -> None:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


class SummaryCallback(Callback):
    """At the end of a multirun, write ``summary.csv`` at the sweep root (failed jobs included)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        state = sweep.ACTIVE
        if state is None:
            return
        path = sweep.finish(state)  # softmine-train sets the exit status from state.failed
        if path is None:
            log.warning("no job ran under %s; %s not written", state.folder, SWEEP_FILES.summary)
        else:
            log.info("wrote %s (%d jobs, %d not ok)", path, state.total, len(state.failed))


class RunFolderCheck(Callback):
    """Before Hydra creates the run (or sweep) folder, prove it is writable: one line and exit 2 if not.

    For a sweep it also takes the sweep folder's lock and refuses a new sweep into a
    folder that holds one (naming the command that resumes it), or ``resume=true``
    into a folder that holds none.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_writable(Path(config.hydra.run.dir))
        except ConfigError as e:
            _exit_user_error(e)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_writable(Path(config.hydra.sweep.dir))
            sweep.start(config, sys.argv[1:])
        except ConfigError as e:
            _exit_user_error(e)
