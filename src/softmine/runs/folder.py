"""The run folder as the unit of truth: one writer at a time, and a record that describes its run.

A run folder holds one run: its record (``.hydra/config.yaml``, ``overrides.yaml``,
``hydra.yaml``), checkpoints, logs and ``metrics.json``. This module keeps them
consistent:

* :class:`RunLock` lets one process at a time write into a folder. It is held for
  the run's life and released on any exit; a lock left by a process that died
  (SIGKILL, power loss) is stale and taken over.
* :func:`plan_run` decides, before anything is written, whether a command may use
  the folder: a new run into a folder that holds a run is refused; ``resume=true``
  is refused when the command's settings differ from the recorded ones, except for
  the keys named in ``resume_override`` and the bookkeeping keys of
  :data:`BOOKKEEPING_KEYS`; ``resume=true`` on a folder with no run is an error.
* :func:`commit_plan` writes the record (Hydra is configured not to write it
  itself, ``hydra.output_subdir: null``), so a refused command changes nothing.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import logging
import os
import socket
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from softmine.config import (
    current_choices,
    flatten,
    loading_option,
    override_key,
    upgrade_config,
)
from softmine.errors import ConfigError
from softmine.runs.atomic import write_text_atomic
from softmine.runs.layout import RUN_FILES, RunLayout, read_metrics
from softmine.runs.metrics_file import STEP_KEY

log = logging.getLogger(__name__)

LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's format

#: Keys that never change a run's numbers: they may differ when resuming, they are not
#: recorded as part of the experiment's identity, and ``softmine-report`` does not group by them.
BOOKKEEPING_KEYS = (
    "resume",
    "resume_override",
    "debug",
    "dataset.root",
    "trainer.device",
    "trainer.num_workers",
    "trainer.eval_batch_size",
    "trainer.checkpoint_every",
    "trainer.log_every",
    "trainer.progress_bar",
    "trainer.tensorboard",
    "trainer.plots",
    "evaluation.frame_batch_size",
)
#: Overrides about the command rather than the run: never written into ``overrides.yaml``.
COMMAND_KEYS = ("resume", "resume_override")
#: Keys whose change extends (or shortens) a run.
LENGTH_KEYS = ("trainer.epochs", "trainer.max_iters")


class RunFolderBusy(ConfigError):
    """Another live process holds the run folder's lock."""


# ----------------------------------------------------------------------------- the lock


def _process_start(pid: int) -> str | None:
    """Start time of process ``pid`` (clock ticks since boot, Linux), to tell a reused PID apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the process that wrote ``holder`` still runs (assumed so when on another host)."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = int(holder.get("pid", 0))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by someone else
    started = holder.get("started_ticks")
    return started is None or _process_start(pid) in (None, started)


def _read_holder(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


class RunLock:
    """An exclusive lock on a folder: ``<folder>/.softmine.lock`` holding the owner's PID and host.

    The lock is an ``flock`` on that file, which the kernel drops when the holder
    exits in any way, so a killed run never blocks its folder. The file also names
    the holder (PID, host, process start time): a second process is refused with
    that name, and a file whose holder is gone is stale and taken over (also where
    the filesystem has no ``flock``, or an orphaned child still holds it).

    Under ``torchrun`` only rank 0 takes the lock: the job is one writer.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = RunLayout(self.folder).lock
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = _read_holder(self.path)
                if holder and not _alive(holder):
                    self._unlink_if_same(holder)  # its owner died; an orphan still holds it
                    continue
                raise self._busy(holder) from None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    os.close(fd)
                    raise
                # no flock on this filesystem: the PID + host check below decides alone
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed the file between our open and flock
                os.close(fd)
                continue
            holder = _read_holder(self.path)
            if holder and holder.get("pid") != os.getpid() and _alive(holder):
                os.close(fd)
                raise self._busy(holder)
            self._fd = fd
            self._write_holder()
            return self
        raise RunFolderBusy(f"could not lock the run folder {self.folder}; try again")

    def _write_holder(self) -> None:
        assert self._fd is not None
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started_ticks": _process_start(os.getpid()),
            "since": _dt.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
        }
        data = json.dumps(info).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def _unlink_if_same(self, holder: dict[str, Any]) -> None:
        if _read_holder(self.path) == holder:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def _busy(self, holder: dict[str, Any]) -> RunFolderBusy:
        who = (
            f"PID {holder.get('pid')} on host {holder.get('host')}, since {holder.get('since')}"
            if holder
            else "another process"
        )
        return RunFolderBusy(
            f"the run folder {self.folder} is in use by another softmine process ({who}); "
            f"wait for it to finish, or choose another folder (if that process is gone, delete "
            f"{self.path})"
        )

    def release(self) -> None:
        """Remove the lock file, then drop the lock (in that order, so no one locks a removed file)."""
        if self._fd is None:
            return
        try:
            if _read_holder(self.path).get("pid") == os.getpid():
                self.path.unlink()
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# ----------------------------------------------------------------------------- overrides and keys


def strip_command_keys(overrides: Iterable[str]) -> list[str]:
    """``overrides`` without ``resume=...`` and ``resume_override=...``."""
    return [str(o) for o in overrides if override_key(o) not in COMMAND_KEYS]


def _covers(prefixes: Iterable[str], key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _container(cfg: DictConfig | dict, resolve: bool = False) -> dict[str, Any]:
    """The config as plain containers; interpolations as written (``${seed}`` follows ``seed``,
    so only the key the user changed differs), or resolved where they can be."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    if resolve:
        try:
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
        except Exception:  # an interpolation that cannot be resolved here: compare as written
            pass
    return OmegaConf.to_container(cfg, resolve=False)  # type: ignore[return-value]


@dataclass(frozen=True)
class Difference:
    """One setting that differs between the recorded run and the new command."""

    key: str
    recorded: Any
    new: Any

    def __str__(self) -> str:
        def show(v: Any) -> str:
            text = "(absent)" if v is _MISSING else json.dumps(v, default=str)
            return text if len(text) <= 40 else text[:37] + "..."

        return f"{self.key} ({show(self.recorded)} -> {show(self.new)})"


class _Missing:
    """A key absent from one of the two configs compared."""

    def __repr__(self) -> str:
        return "(absent)"


_MISSING: Any = _Missing()


def config_differences(
    recorded: dict[str, Any],
    new: dict[str, Any],
    recorded_choices: dict[str, Any] | None = None,
    new_choices: dict[str, Any] | None = None,
) -> list[Difference]:
    """Settings that differ, bookkeeping keys left out.

    A config group whose choice differs (``loss=osm_caa`` -> ``loss=contrastive``) is one
    difference named by the group, not one per key below it.
    """
    diffs: list[Difference] = []
    hidden: list[str] = []
    for group in sorted(set(recorded_choices or {}) | set(new_choices or {})):
        if group.startswith("hydra/"):
            continue
        a = (recorded_choices or {}).get(group, _MISSING)
        b = (new_choices or {}).get(group, _MISSING)
        if a != b and recorded_choices and new_choices:
            diffs.append(Difference(group.replace("/", "."), a, b))
            if group != "experiment":  # the experiment group writes global keys: compare them
                hidden.append(group.replace("/", "."))
    flat_a, flat_b = flatten(recorded), flatten(new)
    for key in sorted(set(flat_a) | set(flat_b)):
        if _covers(BOOKKEEPING_KEYS, key) or _covers(hidden, key):
            continue
        a, b = flat_a.get(key, _MISSING), flat_b.get(key, _MISSING)
        if a != b:
            diffs.append(Difference(key, a, b))
    return diffs


# ----------------------------------------------------------------------------- the record


def read_record(run_dir: Path) -> tuple[dict[str, Any], list[str], dict[str, Any]] | None:
    """The recorded (config, overrides, group choices) of ``run_dir``; None if it has no record."""
    files = RunLayout(run_dir)
    if not files.config.is_file():
        return None
    config = _container(OmegaConf.load(files.config))
    overrides = []
    if files.overrides.is_file():
        overrides = [str(o) for o in yaml.safe_load(files.overrides.read_text()) or []]
    choices: dict[str, Any] = {}
    if files.hydra.is_file():
        hydra_cfg = yaml.safe_load(files.hydra.read_text()) or {}
        choices = ((hydra_cfg.get("hydra") or {}).get("runtime") or {}).get("choices") or {}
    return config, overrides, choices


def holds_run(run_dir: Path) -> str | None:
    """What shows that ``run_dir`` holds a run (a file name), or None if it holds none."""
    for rel in (RUN_FILES.metrics, RUN_FILES.last_checkpoint, RUN_FILES.config):
        if (Path(run_dir) / rel).exists():
            return rel.as_posix()
    return None


# ----------------------------------------------------------------------------- the plan


@dataclass
class Invocation:
    """What a ``softmine-train`` job was asked to do, as Hydra composed it."""

    run_dir: Path
    cfg: DictConfig
    overrides: list[str]  # the command-line overrides of this job (``hydra.overrides.task``)
    choices: dict[str, Any]  # config group choices (``hydra.runtime.choices``)
    hydra_cfg: dict[str, Any] = field(default_factory=dict)  # Hydra's settings, for hydra.yaml
    multirun: bool = False


@dataclass
class Plan:
    """What :func:`plan_run` allowed; :func:`commit_plan` writes it."""

    action: str  # "new" | "resume" | "finished"
    invocation: Invocation
    changes: list[Difference] = field(default_factory=list)  # allowed by resume_override
    metrics: dict[str, Any] | None = None  # of a finished run
    recorded_overrides: list[str] = field(default_factory=list)
    #: The config as the command composed it, taken before anything is built from it:
    #: building resolves interpolations of shared nodes in place (Hydra's ``instantiate``),
    #: and a record written afterwards would no longer compare equal to the same command.
    config_yaml: str = ""


def _new_folder_hint(multirun: bool) -> str:
    if multirun:
        return (
            "resume the sweep with resume=true and the same hydra.sweep.dir, or choose a new "
            "hydra.sweep.dir"
        )
    return "continue it with resume=true, or choose a new folder with hydra.run.dir=..."


def resume_overrides(cfg: DictConfig) -> list[str]:
    """``resume_override`` as a list of keys (it may be given as one key or a list)."""
    value = cfg.get("resume_override")
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    return [str(v) for v in value]


def _length(config: dict[str, Any]) -> tuple[str, int]:
    t = config.get("trainer") or {}
    if t.get("max_iters") is not None:
        return "iterations", int(t["max_iters"])
    return "epochs", int(t.get("epochs") or 0)


def plan_run(inv: Invocation) -> Plan:
    """Check that this command may use its run folder; nothing is written here.

    Raises :class:`ConfigError` (one line naming the folder and the way out) when the
    folder holds a run and this is not ``resume=true``, when ``resume=true`` finds no run,
    or when the command's settings differ from the recorded ones.
    """
    run_dir, cfg = inv.run_dir, inv.cfg
    snapshot = OmegaConf.to_yaml(cfg)
    found = holds_run(run_dir)
    if not bool(cfg.get("resume")):
        if found:
            raise ConfigError(
                f"the run folder {run_dir} already holds a run ({found}); "
                f"{_new_folder_hint(inv.multirun)}"
            )
        return Plan("new", inv, config_yaml=snapshot)
    if not found:
        if inv.multirun:  # a job that had not started when its sweep stopped
            return Plan("new", inv, config_yaml=snapshot)
        raise ConfigError(
            f"resume=true but {run_dir} holds no run (no {RUN_FILES.config}, no "
            f"checkpoint); give the folder of the run to resume with hydra.run.dir=..., or drop "
            "resume=true to start a new run there"
        )
    recorded = read_record(run_dir)
    resolve = recorded is None  # a checkpoint stores its config resolved
    if recorded is None:
        recorded = (_checkpoint_config(RunLayout(run_dir).last_checkpoint), [], {})
    rec_config, rec_overrides, rec_choices = recorded
    upgrade_config(rec_config)  # a run recorded before a rename compares under today's names
    new_config = _container(cfg, resolve)
    allowed = resume_overrides(cfg)
    diffs = config_differences(
        rec_config, new_config, current_choices(rec_choices), current_choices(inv.choices)
    )
    diffs = _same_when_resolved(diffs, rec_config, cfg)
    refused = [d for d in diffs if not _covers(allowed, d.key)]
    if refused:
        shown = ", ".join(str(d) for d in refused[:6])
        more = f" and {len(refused) - 6} more" if len(refused) > 6 else ""
        raise ConfigError(
            f"resume=true with settings that differ from the run recorded in {run_dir}: "
            f"{shown}{more}; resume with the recorded settings (see "
            f"{RunLayout(run_dir).overrides}), or allow a change explicitly with "
            f"resume_override=[{','.join(d.key for d in refused[:6])}]"
        )
    metrics_file = RunLayout(run_dir).metrics
    finished = metrics_file.exists()
    if finished:
        metrics = read_metrics(metrics_file)
        stale = stale_checkpoint(run_dir, metrics)
        if stale is not None:  # killed between the result and the final weights: finish the job
            start = (
                "its last checkpoint"
                if RunLayout(run_dir).last_checkpoint.is_file()
                else "the start"
            )
            log.warning("%s; training again from %s to write it", stale, start)
            return Plan(
                "resume", inv, changes=diffs, recorded_overrides=rec_overrides, config_yaml=snapshot
            )
        if not diffs:
            return Plan("finished", inv, metrics=metrics)
    if diffs:
        _check_length_change(run_dir, rec_config, new_config, finished)
    return Plan(
        "resume", inv, changes=diffs, recorded_overrides=rec_overrides, config_yaml=snapshot
    )


def _same_when_resolved(
    diffs: list[Difference], recorded: dict[str, Any], cfg: DictConfig
) -> list[Difference]:
    """``diffs`` without the keys whose values are equal once interpolations are resolved.

    Keys are compared as written, so that a changed ``seed`` is one difference rather than
    one per key that follows it; a record that holds some values resolved (written by an
    older softmine after building the run had resolved them in place) then differs as
    written but not in value, and is no difference.

    A split node's loading option that only repeats the dataset's (``dataset.test.root:
    ${..root}``, as dataset configs had it before the option was given once) is no
    difference of its own on either side: a changed ``dataset.root`` is reported once.
    """
    if not diffs:
        return diffs
    a = flatten(_container(recorded, resolve=True))
    b = flatten(_container(cfg, resolve=True))

    def repeats(flat: dict[str, Any], key: str) -> bool:
        option = loading_option(key)
        return option is not None and flat.get(key, flat.get(option)) == flat.get(option)

    return [
        d
        for d in diffs
        if not (repeats(a, d.key) and repeats(b, d.key))
        and (d.key not in a or d.key not in b or a[d.key] != b[d.key])
    ]


def stale_checkpoint(run_dir: Path, metrics: dict[str, Any] | None = None) -> str | None:
    """Why ``checkpoints/last.pt`` is not the network ``metrics.json`` describes; None if it is.

    ``metrics.json`` names the step of its final metrics (``iteration``) and a checkpoint
    holds its step; a run stopped between writing the two (SIGKILL, full disk) leaves a
    checkpoint of an earlier step. Runs written before ``iteration`` was recorded, and
    folders without both files, are taken as consistent.
    """
    last, metrics_file = RunLayout(run_dir).last_checkpoint, RunLayout(run_dir).metrics
    if metrics is None:
        if not metrics_file.is_file():
            return None
        metrics = read_metrics(metrics_file)
    if metrics.get(STEP_KEY) is None:
        return None
    final = int(metrics[STEP_KEY])
    if not last.is_file():
        return (
            f"{metrics_file} describes the network at step {final} but there is no {last} "
            "(its final write failed)"
        )
    from softmine.engine.checkpoint import checkpoint_step

    step = checkpoint_step(last)
    if step is None or step == final:
        return None
    return (
        f"{last} holds step {step} but {metrics_file} describes the network at step {final} "
        "(the run stopped before its final checkpoint was written)"
    )


def _checkpoint_config(path: Path) -> dict[str, Any]:
    from softmine.engine.checkpoint import load_checkpoint

    return dict(load_checkpoint(path).get("config") or {})


def _check_length_change(
    run_dir: Path, recorded: dict[str, Any], new: dict[str, Any], finished: bool
) -> None:
    """A finished run may only be extended; no run may be cut below where its checkpoint is."""
    (unit_a, old), (unit_b, end) = _length(recorded), _length(new)
    if finished:
        if unit_a != unit_b or end <= old:
            raise ConfigError(
                f"the run in {run_dir} has finished ({RUN_FILES.metrics}); resume_override can only "
                f"extend it (trainer.epochs or trainer.max_iters beyond its {old} {unit_a}), "
                "anything else would relabel its results; start a new run instead"
            )
        return
    last = RunLayout(run_dir).last_checkpoint
    if not last.exists():
        return
    from softmine.engine.checkpoint import load_checkpoint

    state = load_checkpoint(last).get("train_state") or {}
    step, epoch, batch = (int(state.get(k, 0)) for k in ("step", "epoch", "batch"))
    past = step > end if unit_b == "iterations" else (epoch, batch) > (end, 0)
    if past:
        where = f"step {step}" if unit_b == "iterations" else f"epoch {epoch + 1}, step {step}"
        raise ConfigError(
            f"the checkpoint {last} is already at {where}, past the new end ({end} {unit_b}); "
            "a run cannot be shortened after the fact: resume with a length at or beyond it, or "
            "start a new run"
        )


def _hydra_file_text(hydra_cfg: dict[str, Any]) -> str:
    return OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg}))


def commit_plan(plan: Plan) -> None:
    """Write the record of an allowed plan (call once the run is about to start, rank 0 only).

    A new run records its config, overrides and Hydra settings. A resume that changes
    settings (``resume_override``) rewrites the config and the overrides to the new
    values and appends what changed, and any superseded ``metrics.json``, to
    ``.hydra/resumes.yaml``.
    """
    inv = plan.invocation
    files = RunLayout(inv.run_dir)
    files.record_dir.mkdir(parents=True, exist_ok=True)
    overrides = strip_command_keys(inv.overrides)
    config_text = plan.config_yaml or OmegaConf.to_yaml(inv.cfg)
    if plan.action == "new":
        write_text_atomic(files.config, config_text)
        write_text_atomic(files.hydra, _hydra_file_text(inv.hydra_cfg))
        write_text_atomic(files.overrides, yaml.safe_dump(overrides))
        return
    if plan.action != "resume":
        return
    entry: dict[str, Any] = {
        "time": _dt.datetime.now().isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "overrides": [str(o) for o in inv.overrides],
    }
    if plan.changes:
        changed = [c.key for c in plan.changes]
        entry["changed"] = {
            c.key: {"from": _plain(c.recorded), "to": _plain(c.new)} for c in plan.changes
        }
        kept = [o for o in plan.recorded_overrides if not _covers(changed, override_key(o))]
        given = [o for o in overrides if _covers(changed, override_key(o))]
        write_text_atomic(files.config, config_text)
        write_text_atomic(files.overrides, yaml.safe_dump(kept + given))
        if files.metrics.exists():  # an extended run: its earlier result stays on record here
            entry["superseded_metrics"] = files.read_metrics()
    history = []
    if files.resumes.is_file():
        history = yaml.safe_load(files.resumes.read_text()) or []
    write_text_atomic(files.resumes, yaml.safe_dump([*history, entry], sort_keys=False))
    if plan.changes:
        files.metrics.unlink(missing_ok=True)


def attach_log(run_dir: Path) -> logging.Handler:
    """Send the log to ``<run_dir>/train.log`` too (from now on; detach it with ``removeHandler``).

    Attached only once the run's checks have passed, so a refused command writes no log line
    into a run folder.
    """
    handler = logging.FileHandler(RunLayout(run_dir).log)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger().addHandler(handler)
    return handler


def _plain(value: Any) -> Any:
    return None if value is _MISSING else value
