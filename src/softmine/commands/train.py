"""``softmine-train``: the Hydra app that trains an embedding and evaluates it by retrieval.

Examples::

    softmine-train                                   # OSM+CAA on digits
    softmine-train loss=contrastive trainer.epochs=5
    softmine-train -m loss=osm_caa,contrastive seed=0,1,2   # sweep; writes summary.csv
    torchrun --nproc_per_node=2 -m softmine.commands.train           # data parallel over 2 processes

Before a run touches its folder it takes the folder's lock and checks the command
against what the folder holds (:mod:`softmine.runs.folder`); only then is the
run's record written. In a sweep a failed job is recorded and the sweep goes on
(:mod:`softmine.runs.sweep`). The heavy modules (torch, the engine) are imported
inside :func:`main`, so a Ctrl-C at any point of the start-up is one line too.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from softmine.commands.common import debug_enabled, exit_with_error, user_message, version_line
from softmine.errors import ConfigError, Interrupted, SoftmineError
from softmine.runs.layout import RunLayout, SweepLayout

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from softmine.engine.trainer import Trainer
    from softmine.runs.folder import Invocation

log = logging.getLogger(__name__)
T = TypeVar("T")
#: Old config keys this command line used, renamed before Hydra read it (:func:`_main`).
_RENAMED_KEYS: list[str] = []


def _on_rank0(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 only; every rank returns its result or raises its error's sentence."""
    from softmine.engine.distributed import DistEnv

    env = DistEnv.current()
    if not env.enabled:
        return fn()
    import torch.distributed as dist

    box: list[Any] = [None]
    if env.is_main:
        try:
            box = [("ok", fn())]
        except SoftmineError as e:
            dist.broadcast_object_list([("error", str(e))], src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise ConfigError(value)
    return value


def train(inv: Invocation) -> dict[str, float]:
    """Train (or resume) the run described by ``inv`` in its folder; returns the final metrics.

    Holds the folder's lock (rank 0) from the checks to the end; writes the run's
    record only once the checks have passed and the trainer is built.
    """
    from softmine.engine import Trainer
    from softmine.engine.distributed import DistEnv, barrier, export_submitit_ranks, init_from_env
    from softmine.engine.validate import validate_config
    from softmine.runs.atomic import remove_partial
    from softmine.runs.folder import Plan, RunLock, attach_log, commit_plan, plan_run

    cfg = inv.cfg
    if cfg.get("debug"):
        os.environ["SOFTMINE_DEBUG"] = "1"
    if export_submitit_ranks():  # a task of a multi-task SLURM job: join its process group here
        init_from_env()
    env = DistEnv.current()
    if not env.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    _upgrade_old_names(inv, log_them=env.is_main)
    validate_config(cfg)
    _check_rank_split(cfg, env.world_size)
    lock = RunLock(inv.run_dir) if env.is_main else None
    plan: Plan | None = None

    def decide() -> tuple[str, dict[str, float] | None]:
        nonlocal plan
        assert lock is not None
        lock.acquire()
        plan = plan_run(inv)
        return plan.action, plan.metrics

    handler: logging.Handler | None = None
    try:
        action, metrics = _on_rank0(decide)
        if env.is_main:  # temporary files of a writer killed in this folder
            remove_partial(RunLayout(inv.run_dir).checkpoints)
            remove_partial(inv.run_dir)
        if action == "finished":
            log.info("%s has already finished; its metrics are unchanged", inv.run_dir)
            return dict(metrics or {})
        trainer = Trainer(cfg, inv.run_dir)
        trainer.restore()  # a checkpoint that cannot be resumed is refused before any write
        if plan is not None:
            commit_plan(plan)
            handler = attach_log(inv.run_dir)
            for change in plan.changes:
                log.info("resume_override: %s", change)
        barrier()
        try:
            return fit_and_report(trainer)
        except BaseException as e:
            if handler is not None:  # the reason is in the run's own log, not only on stderr
                _log_failure(handler, e)
            raise
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
        if lock is not None:
            lock.release()


def _check_rank_split(cfg: DictConfig, world_size: int) -> None:
    """A P x K batch that the ranks cannot share (``sampler.split_across_ranks``) is refused
    at once, before the data sets and the model are built (the sampler would refuse it then)."""
    sampler = cfg.get("sampler") or {}
    classes_per_batch = sampler.get("classes_per_batch")
    if world_size > 1 and sampler.get("split_across_ranks") and isinstance(classes_per_batch, int):
        from softmine.data.samplers import check_split_across_ranks

        check_split_across_ranks(classes_per_batch, world_size)


def _upgrade_old_names(inv: Invocation, log_them: bool) -> None:
    """Give the old names this job used (config options, keys, class names) their new ones in
    ``inv.cfg``, so the run is recorded and compared under today's names; log each once."""
    from softmine.config import log_old_names, old_choice_notes, upgrade_config

    notes = [*_RENAMED_KEYS, *old_choice_notes(inv.choices), *upgrade_config(inv.cfg)]
    if log_them:
        log_old_names(notes)


def fit_and_report(trainer: Trainer) -> dict[str, float]:
    """:func:`softmine.reporting.artifacts.fit_and_report`, imported when a run starts (not
    at start-up, so that a Ctrl-C there stays one line); a sweep job's costly plots are left
    to ``softmine-report``."""
    from softmine.reporting.artifacts import fit_and_report as train_and_report

    return train_and_report(trainer, sweep_job=in_sweep_job())


def in_sweep_job() -> bool:
    """True in a job of a sweep (``softmine-train -m``), as Hydra runs it."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _log_failure(handler: logging.Handler, e: BaseException) -> None:
    """Write why the run stopped into its own log (``train.log``) alone: the console gets
    the one-line ``error:`` from the command, not a second copy."""
    if isinstance(e, Interrupted):
        level, text, exc = logging.WARNING, str(e), None
    elif isinstance(e, SoftmineError):
        level, text, exc = logging.ERROR, f"the run stopped: {user_message(e)}", None
    elif isinstance(e, KeyboardInterrupt):
        level, text, exc = logging.WARNING, "the run was interrupted", None
    else:
        level, text, exc = logging.ERROR, "the run stopped on an unexpected error", e
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    record = log.makeRecord(log.name, level, __file__, 0, text, (), exc_info)
    handler.handle(record)


def invocation(cfg: DictConfig) -> Invocation:
    """What Hydra was asked to run, from its runtime config."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from softmine.runs.folder import Invocation

    hc = HydraConfig.get()
    return Invocation(
        run_dir=Path(hc.runtime.output_dir),
        cfg=cfg,
        overrides=[str(o) for o in OmegaConf.to_container(hc.overrides.task, resolve=False)],
        choices=dict(OmegaConf.to_container(hc.runtime.choices)),  # type: ignore[arg-type]
        hydra_cfg=OmegaConf.to_container(hc, resolve=False),  # type: ignore[arg-type]
        multirun=hc.mode == RunMode.MULTIRUN,
    )


def resume_hint(argv: list[str], run_dir: Path) -> str:
    """The command that resumes the run in ``run_dir``: ``argv`` plus ``resume=true hydra.run.dir=...``."""
    from softmine.config import override_key

    keep = [a for a in argv if override_key(a) not in ("resume", "hydra.run.dir")]
    return "softmine-train " + shlex.join([*keep, "resume=true", f"hydra.run.dir={run_dir}"])


def run_job(inv: Invocation) -> float:
    """One run (``softmine-train`` without ``-m``): user errors are one line and exit 2."""
    from softmine.runs.sweep import sweep_score

    try:
        return sweep_score(train(inv))
    except Interrupted as e:
        head = str(e).split(" Resume with", 1)[0]
        print(f"{head} Resume with:\n  {resume_hint(sys.argv[1:], inv.run_dir)}", file=sys.stderr)
        sys.exit(128 + e.signum)
    except SoftmineError as e:
        if debug_enabled():
            raise
        exit_with_error(user_message(e))
    except Exception as e:  # a config value OmegaConf cannot resolve: the user's, not a bug
        from omegaconf.errors import OmegaConfBaseException

        if debug_enabled() or not isinstance(e, OmegaConfBaseException):
            raise
        from softmine.commands.hydra_errors import describe

        exit_with_error(describe(e, sys.argv[1:]))


def sweep_job(inv: Invocation, folder: Path, num: int) -> float | None:
    """Job ``num`` of the sweep in ``folder``: its outcome is recorded, a failure never stops the others.

    When the sweep has been asked to stop, a job that has not started skips itself,
    and an interrupted job records it and asks the rest of the sweep to stop.
    Returns the run's score (:func:`~softmine.runs.sweep.sweep_score`), or None when it has
    none (failed, interrupted, skipped): a sweeper that reads scores, Optuna's, then records a
    failed trial and goes on (it stops the whole study on a NaN).
    """
    from softmine.runs import sweep

    def record(status: str, reason: str = "") -> None:
        try:
            sweep.record_outcome(folder, num, inv.overrides, status, reason)
        except (OSError, SoftmineError) as e:  # the summary then reads the job's folder
            print(f"warning: job {num}: its outcome was not recorded ({e})", file=sys.stderr)

    if sweep.stop_requested(folder) is not None:
        record(sweep.NOT_STARTED, "the sweep was stopped")
        return None
    try:
        score = sweep.sweep_score(train(inv))
    except (Interrupted, KeyboardInterrupt) as e:
        signum = getattr(e, "signum", signal.SIGINT)
        reason = str(e).split(" Resume with", 1)[0] if isinstance(e, Interrupted) else ""
        record(sweep.INTERRUPTED, reason or "interrupted")
        sweep.request_stop(folder, signum)
        return None
    except Exception as e:  # a clean error or a bug: this job failed, the sweep goes on
        if isinstance(e, SoftmineError):
            reason = user_message(e)
        else:
            reason = f"{type(e).__name__}: {user_message(e) or 'no message'}"
            log.exception("job %d raised", num)
        record(sweep.FAILED, reason)
        print(f"error: job {num} failed: {reason}", file=sys.stderr)
        return None
    record(sweep.OK)
    return score


def task(cfg: DictConfig) -> float | None:
    """The Hydra task: one run, or one job of a sweep."""
    inv = invocation(cfg)
    if not inv.multirun:
        return run_job(inv)
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    return sweep_job(inv, Path(str(hc.sweep.dir)), int(hc.job.num))


def _stopped(signum: int) -> None:
    """Ctrl-C / SIGTERM outside the training loop: one line (a sweep: its summary), nothing lost.

    A further signal from here on ends the process at once (:func:`signals.exiting`).
    """
    from softmine.runs import signals

    sweep = sys.modules.get("softmine.runs.sweep")
    state = getattr(sweep, "ACTIVE", None)
    if sweep is not None and state is not None:
        sweep.report_stop(state, signum)  # its summary is written even on a second signal
        signals.exiting()
    else:
        signals.exiting()
        print(signals.STOPPED_BEFORE_TRAINING, file=sys.stderr)
    sys.exit(128 + signum)


def _main() -> None:
    import hydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from softmine.commands.hydra_errors import describe
    from softmine.config import CONFIG_DIR, upgrade_overrides
    from softmine.engine.distributed import init_from_env, run_stamp
    from softmine.runs import sweep

    OmegaConf.register_new_resolver("run_stamp", run_stamp, replace=True)
    sys.argv[1:], _RENAMED_KEYS[:] = upgrade_overrides(sys.argv[1:])  # Hydra refuses unknown keys
    init_from_env()
    keep_hydra_errors = os.environ.get("HYDRA_FULL_ERROR") == "1" or debug_enabled()
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors to us instead of printing them
    hydra_main = hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")(task)
    try:
        hydra_main()
    except (HydraException, OmegaConfBaseException) as e:
        if keep_hydra_errors:
            raise
        exit_with_error(describe(e, sys.argv[1:]))
    state = sweep.ACTIVE
    if state is None:
        return
    signum = sweep.stop_requested(state.folder)
    if signum is not None:
        _stopped(signum)
    if state.failed:
        first_job, first_reason = state.failed[0]
        print(
            f"error: {len(state.failed)} of {state.total} jobs failed (job {first_job}: "
            f"{first_reason}); see {SweepLayout(state.folder).summary}",
            file=sys.stderr,
        )
        sys.exit(1)


def main() -> None:
    """Console entry point; under ``torchrun`` it joins the process group first.

    ``--version`` prints softmine's version (Hydra's own flag would print Hydra's).
    """
    if sys.argv[1:] == ["--version"]:
        print(version_line("softmine-train"))
        return
    from softmine.runs import signals

    signals.interrupt_start_up()
    try:
        _main()
    except KeyboardInterrupt:
        _stopped(signals.pending() or signal.SIGINT)
    except Exception:
        signum = signals.pending()
        if signum is None:
            raise
        _stopped(signum)  # the interrupt broke a library half-way; this error is its consequence


if __name__ == "__main__":
    main()
