"""Sweeps (``softmine-train -m``) that survive a bad job, and say how to resume when stopped.

* Each job's outcome in this invocation (``ok``, ``failed`` with a one-line reason,
  ``interrupted``) is written to ``<sweep>/.jobs/<num>.json``; a failed job never
  stops the others.
* ``summary.csv`` at the sweep root has one row per job, planned ones included:
  its overrides, ``status`` (``ok`` | ``failed`` | ``interrupted`` | ``not started``),
  ``reason`` and metrics. It is written at the end, also when jobs failed, and when
  the sweep is interrupted.
* Ctrl-C / SIGTERM stops the sweep gracefully: running jobs save a checkpoint and
  stop, jobs not yet started are skipped (a marker, ``.jobs/STOP``, tells them, also
  in the worker processes of the joblib launcher); then ``summary.csv`` is written
  and the one command that resumes the sweep is printed,
  ``softmine-train -m ... resume=true hydra.sweep.dir=<sweep>``, which skips the
  finished jobs and continues the others from their checkpoints. A second signal
  aborts at once (the summary is still written).
* A sweep folder has one writer at a time (:class:`~softmine.runs.folder.RunLock`);
  a new sweep into a folder that holds one is refused with that command. ``resume=true``
  into a new sweep folder starts the sweep (so a SLURM sweep can carry ``resume=true``
  from the start and its requeued jobs continue from their checkpoints).

The sweep parent keeps its state in :data:`ACTIVE` (set by the Hydra callback at the
start of the sweep, read by ``softmine-train`` when the sweep ends or is stopped).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from omegaconf import DictConfig, OmegaConf

from softmine.config import override_key, parse_override
from softmine.errors import ConfigError
from softmine.evaluation.metric_names import selection_metric
from softmine.runs import signals
from softmine.runs.atomic import write_atomic, write_text_atomic
from softmine.runs.folder import RunLock, strip_command_keys
from softmine.runs.layout import SWEEP_FILES, RunLayout, SweepLayout

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


def sweep_score(metrics: dict[str, float]) -> float:
    """What a job returns to the sweeper (Optuna maximises it): its main metric, on held-out
    training classes when the run has them, never on the test split then (0.0 if none;
    :func:`~softmine.evaluation.metric_names.selection_metric`)."""
    key = selection_metric(metrics)
    return float(metrics[key]) if key is not None else 0.0


OK, FAILED, INTERRUPTED, NOT_STARTED = "ok", "failed", "interrupted", "not started"
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


@dataclass
class SweepState:
    """The running sweep, as the parent process knows it."""

    folder: Path
    argv: list[str]  # the command line, to print the command that resumes the sweep
    planned: list[list[str]] | None = None  # every job's overrides, when the sweeper is known
    lock: RunLock | None = None
    failed: list[tuple[int, str]] = field(default_factory=list)
    total: int = 0
    done: bool = False  # summary.csv written and the folder released
    signal: int | None = None  # the first SIGINT/SIGTERM this process received during the sweep
    previous_handlers: dict[int, Any] = field(default_factory=dict)


ACTIVE: SweepState | None = None


def request_stop(sweep_dir: Path, signum: int) -> None:
    """Ask every job of the sweep that has not started yet to skip itself (the first request wins)."""
    path = SweepLayout(sweep_dir).stop
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:  # another job (or the parent) asked first
        return
    try:
        os.write(fd, str(int(signum)).encode())
    finally:
        os.close(fd)


def stop_requested(sweep_dir: Path) -> int | None:
    """The signal that stopped the sweep in ``sweep_dir``, or None while it runs on."""
    path = SweepLayout(sweep_dir).stop
    try:
        text = path.read_text()
    except OSError:
        return None
    return int(text) if text.strip().isdigit() else int(signal.SIGINT)  # being written


# ----------------------------------------------------------------------------- job outcomes


def record_outcome(
    sweep_dir: Path, num: int, overrides: Sequence[str], status: str, reason: str = ""
) -> Path:
    """Write job ``num``'s outcome in this invocation to ``<sweep>/.jobs/<num>.json``."""
    data = {
        "job": int(num),
        "overrides": strip_command_keys(overrides),
        "status": status,
        "reason": reason,
    }
    return write_text_atomic(SweepLayout(sweep_dir).job(num), json.dumps(data))


def _outcomes(sweep_dir: Path) -> dict[int, dict[str, Any]]:
    out = {}
    for f in sorted(SweepLayout(sweep_dir).jobs.glob("*.json")):
        try:
            data = json.loads(f.read_text())
            out[int(data["job"])] = data
        except (OSError, ValueError, KeyError):
            continue
    return out


def _recorded_overrides(job_dir: Path) -> list[str] | None:
    f = RunLayout(job_dir).overrides
    if not f.is_file():
        return None
    return [str(o) for o in yaml.safe_load(f.read_text()) or []]


def collect_runs(sweep_dir: Path, planned: Sequence[Sequence[str]] | None = None) -> pd.DataFrame:
    """One row per job of the sweep: ``job``, one column per override key, ``status``,
    ``reason`` and the metrics of finished jobs.

    Jobs are those planned (when known), those with an outcome in this invocation and
    those whose folder holds a run. A job's status is its outcome in this invocation if
    it has one; else ``ok`` when its folder has ``metrics.json``, ``interrupted`` when
    the folder holds an unfinished run, ``not started`` otherwise.
    """
    sweep_dir = Path(sweep_dir)
    outcomes = _outcomes(sweep_dir)
    jobs: dict[int, list[str] | None] = {i: list(o) for i, o in enumerate(planned or [])}
    for num, data in outcomes.items():
        jobs.setdefault(num, data.get("overrides"))
    for d in sweep_dir.iterdir() if sweep_dir.is_dir() else []:
        if d.is_dir() and d.name.isdigit() and RunLayout(d).record_dir.is_dir():
            jobs.setdefault(int(d.name), None)
    rows = []
    for num in sorted(jobs):
        job_dir = sweep_dir / str(num)
        outcome = outcomes.get(num)
        overrides = jobs[num] or (outcome or {}).get("overrides") or _recorded_overrides(job_dir)
        row: dict[str, Any] = {"job": num}
        for item in strip_command_keys(overrides or []):
            key, value = parse_override(item)
            row[key] = value
        metrics_file = RunLayout(job_dir).metrics
        if outcome is not None:
            row["status"], row["reason"] = outcome["status"], outcome.get("reason", "")
        elif metrics_file.exists():
            row["status"], row["reason"] = OK, ""
        elif RunLayout(job_dir).record_dir.is_dir():
            row["status"], row["reason"] = INTERRUPTED, "stopped before it finished"
        else:
            row["status"], row["reason"] = NOT_STARTED, ""
        if row["status"] == OK and metrics_file.exists():
            row.update(json.loads(metrics_file.read_text()))
        rows.append(row)
    import pandas as pd  # 0.3 s: read where a sweep's runs are collected, not in every run

    return pd.DataFrame(rows)


def write_summary(sweep_dir: Path, planned: Sequence[Sequence[str]] | None = None) -> Path | None:
    """Write ``summary.csv`` at the sweep root (atomically); None when the sweep has no job."""
    df = collect_runs(sweep_dir, planned)
    if df.empty:
        return None
    path = SweepLayout(sweep_dir).summary
    write_atomic(path, lambda f: f.write(df.to_csv(index=False).encode()))
    return path


# ----------------------------------------------------------------------------- the sweep's life


def planned_jobs(config: DictConfig) -> list[list[str]] | None:
    """Every job's overrides, in Hydra's order, for the basic sweeper (None for other sweepers)."""
    if OmegaConf.select(config, "hydra.sweeper._target_") != BASIC_SWEEPER:
        return None
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        params = OmegaConf.select(config, "hydra.sweeper.params") or {}
        params = OmegaConf.to_container(params, resolve=False) if params else {}
        args = [f"{k}={v}" for k, v in params.items()]
        args += [str(o) for o in OmegaConf.to_container(config.hydra.overrides.task, resolve=False)]
        parsed = OverridesParser.create().parse_overrides(args)
        return [list(job) for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    except Exception:  # a Hydra version with another layout: summary rows come from the jobs
        return None


def resume_command(argv: Sequence[str], sweep_dir: Path) -> str:
    """The command that resumes the sweep in ``sweep_dir``: the same arguments plus
    ``resume=true hydra.sweep.dir=<sweep_dir>`` (replacing any given)."""
    keep = [a for a in argv if override_key(a) not in ("resume", "hydra.sweep.dir")]
    extra = ["resume=true", f"hydra.sweep.dir={Path(sweep_dir).resolve()}"]
    return "softmine-train " + shlex.join([*keep, *extra])


def holds_sweep(sweep_dir: Path) -> bool:
    """Whether ``sweep_dir`` already holds (part of) a sweep."""
    d = Path(sweep_dir)
    if SweepLayout(d).hydra_record.exists() or SweepLayout(d).summary.exists():
        return True
    return d.is_dir() and any(RunLayout(p).record_dir.is_dir() for p in d.iterdir() if p.is_dir())


def start(config: DictConfig, argv: Sequence[str]) -> SweepState:
    """Lock the sweep folder and check it suits the command (``resume`` or a new sweep).

    Raises :class:`ConfigError` before Hydra writes anything into the folder.
    """
    global ACTIVE
    folder = Path(str(config.hydra.sweep.dir)).resolve()
    lock = RunLock(folder)
    lock.acquire()
    try:
        resume = bool(OmegaConf.select(config, "resume", default=False))
        if not resume and holds_sweep(folder):
            raise ConfigError(
                f"the sweep folder {folder} already holds a sweep; resume it with: "
                f"{resume_command(argv, folder)}  (or choose a new folder with hydra.sweep.dir=...)"
            )
        if resume and not holds_sweep(folder):  # e.g. SLURM: resume=true from the start, so
            log.info(
                "resume=true: %s holds no sweep yet; starting one", folder
            )  # requeues continue
    except BaseException:
        lock.release()
        raise
    files = SweepLayout(folder)
    for old in [*files.jobs.glob("*.json"), files.stop]:
        old.unlink(missing_ok=True)  # outcomes of an earlier invocation
    ACTIVE = SweepState(folder, list(argv), planned_jobs(config), lock)
    _install_handlers(ACTIVE)
    return ACTIVE


def _install_handlers(state: SweepState) -> None:
    """First SIGINT/SIGTERM: stop the sweep gracefully; a second one aborts at once."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handle(signum: int, frame: object) -> None:
        if state.signal is not None:  # this process's second signal (a job's own stop is not one)
            raise KeyboardInterrupt
        state.signal = signum
        request_stop(state.folder, signum)
        signals.note_pending(signum)

    for s in (signal.SIGINT, signal.SIGTERM):
        state.previous_handlers[s] = signal.signal(s, handle)


def _restore_handlers(state: SweepState) -> None:
    for s, handler in state.previous_handlers.items():
        signal.signal(s, handler)
    state.previous_handlers.clear()


def finish(state: SweepState) -> Path | None:
    """Write ``summary.csv``, note the failed jobs in ``state`` and release the sweep folder."""
    try:
        path = write_summary(state.folder, state.planned)
        if path is not None:
            import pandas as pd

            df = pd.read_csv(path, dtype={"reason": str}, keep_default_na=False)
            state.total = len(df)
            bad = df[df["status"] != OK]
            state.failed = [(int(r.job), f"{r.status}: {r.reason}") for r in bad.itertuples()]
        return path
    finally:
        _restore_handlers(state)
        if state.lock is not None:
            state.lock.release()
        state.done = True


def report_stop(state: SweepState, signum: int) -> None:
    """After an interrupted sweep: summary.csv, then the command that resumes it (stderr)."""
    try:
        path = SweepLayout(state.folder).summary if state.done else finish(state)
    except Exception as e:  # the resume command matters more than the summary
        path = None
        print(f"warning: {SWEEP_FILES.summary} not written ({e})", file=sys.stderr)
    where = f"; summary in {path}" if path else ""
    print(
        f"sweep interrupted{where}. Resume it (finished jobs are skipped) with:\n"
        f"  {resume_command(state.argv, state.folder)}",
        file=sys.stderr,
    )
