"""Shared test helpers."""

from __future__ import annotations

import os

# One torch/BLAS thread per process: the suite starts training subprocesses on a 2-core
# machine, and oversubscribed threads made them several times slower. Set before torch loads.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import io  # noqa: E402
import logging
import runpy
import signal
import subprocess
import sys
import threading
import traceback
import warnings
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: one worker more than the usable cores. Many tests wait on a command they
    started (a sweep, torchrun, a signal test's training process); the spare worker fills
    those waits (the suite on 2 cores: 384 s with 2 workers, 354 s with 3)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (cores or 1) + 1


def run_cli(
    args: list[str], cwd: Path, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``python -m <args>`` in ``cwd`` with the test interpreter (``env`` added to the
    environment); returns the completed process (a child forked as :class:`ForkedPopen`)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SOFTMINE_DEBUG": "", **(env or {})}
    return run_forked(
        [sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, timeout=timeout
    )


def run_forked(
    cmd: list[str], *, capture_output: bool = False, timeout: float | None = None, **kwargs: Any
) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, text=True, ...)`` with its child started as :class:`ForkedPopen`
    (``check`` and ``input`` are not taken)."""
    if capture_output:
        kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    kwargs.setdefault("text", True)
    with ForkedPopen(cmd, **kwargs) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


class ForkedPopen(subprocess.Popen):
    """A ``Popen`` of ``python -m <module> ...`` whose child is forked from the test process
    instead of a fresh interpreter: its own process (pid, exit status, signals, pipes, session)
    that does not pay the few seconds of importing torch, Hydra and the engine again.

    Where a fork would differ from a fresh interpreter (``env`` changes a ``PYTHON*``
    variable, CUDA is initialised in this process, the command is not ``python -m``) the
    child is a fresh interpreter, as ``Popen`` makes it.
    """

    def _execute_child(  # type: ignore[override]
        self,
        args: list[str],
        executable: Any,
        preexec_fn: Any,
        close_fds: bool,
        pass_fds: Any,
        cwd: Any,
        env: Any,
        startupinfo: Any,
        creationflags: int,
        shell: bool,
        p2cread: int,
        p2cwrite: int,
        c2pread: int,
        c2pwrite: int,
        errread: int,
        errwrite: int,
        restore_signals: bool,
        gid: Any,
        gids: Any,
        uid: Any,
        umask: int,
        start_new_session: bool,
        *rest: Any,
    ) -> None:
        env = dict(os.environ if env is None else env)
        forkable = isinstance(args, list) and args[:2] == [sys.executable, "-m"] and not shell
        if not (forkable and _can_fork(env, cwd)):
            super()._execute_child(  # type: ignore[misc]
                args, executable, preexec_fn, close_fds, pass_fds, cwd, env, startupinfo,
                creationflags, shell, p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite,
                restore_signals, gid, gids, uid, umask, start_new_session, *rest,
            )  # fmt: skip
            return
        from tests.run_imports import import_what_a_run_imports

        import_what_a_run_imports()  # once per xdist worker: no child imports them again
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                if start_new_session:
                    os.setsid()
                if preexec_fn is not None:
                    preexec_fn()
                for fd, target in ((p2cread, 0), (c2pwrite, 1), (errwrite, 2)):
                    if fd != -1:
                        os.dup2(fd, target)
                for fd in (p2cwrite, c2pread, errread):
                    if fd != -1:
                        os.close(fd)
                code = _child(args[2:], Path(cwd or os.getcwd()), env)
            finally:
                os._exit(code)
        self.pid = pid
        self._child_created = True
        if p2cread != -1 and p2cwrite != -1:
            os.close(p2cread)
        if c2pwrite != -1 and c2pread != -1:
            os.close(c2pwrite)
        if errwrite != -1 and errread != -1:
            os.close(errwrite)
        if hasattr(self, "_devnull"):
            os.close(self._devnull)


def _can_fork(env: dict[str, str], cwd: Any) -> bool:
    """Whether a forked child runs a command as a fresh interpreter with ``env`` in ``cwd`` would:
    the ``PYTHON*`` variables read at start-up are this process's, but for a ``PYTHONPATH``
    that adds only folders this process has on its path (or the child's working folder)."""
    if not hasattr(os, "fork"):
        return False
    read_at_start = {k for k in {*env, *os.environ} if k.startswith("PYTHON")}
    changed = {k for k in read_at_start if env.get(k) != os.environ.get(k)}
    if changed - {"PYTHONUNBUFFERED", "PYTHONPATH"}:
        return False
    if "PYTHONPATH" in changed:

        def entries(value: str | None) -> set[str]:
            return {os.path.realpath(p) for p in (value or "").split(os.pathsep) if p}

        here = {os.path.realpath(p) for p in [*sys.path, cwd or os.getcwd()] if p}
        wanted = entries(env.get("PYTHONPATH"))
        if not (wanted <= here and entries(os.environ.get("PYTHONPATH")) <= wanted):
            return False
    torch = sys.modules.get("torch")
    return torch is None or not torch.cuda.is_initialized()


def _child(args: list[str], cwd: Path, env: dict[str, str]) -> int:
    """Set the forked child up as ``python -m`` would start, run the module; its exit code."""
    try:
        sys.stdin = open(0, closefd=False)  # noqa: SIM115
        sys.stdout = sys.__stdout__ = _stream(1, "strict")
        sys.stderr = sys.__stderr__ = _stream(2, "backslashreplace")
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(s, signal.SIG_DFL)
        _fresh_warnings()
        _fresh_logging()
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(int(env.get("OMP_NUM_THREADS") or os.cpu_count() or 1))
        hydra = sys.modules.get("hydra.core.global_hydra")
        if hydra is not None:
            hydra.GlobalHydra.instance().clear()
        sys.path[0] = str(cwd)
        sys.argv = ["-m", *args[1:]]
        sys.modules.pop(f"{args[0]}.__main__", None)  # run as __main__, as ``python -m`` does
        module = sys.modules.get(args[0])
        if module is not None and not hasattr(module, "__path__"):  # a module, not a package
            del sys.modules[args[0]]
            if module.__name__ != args[0]:  # an old path (softmine._moved): the module it became
                sys.modules.pop(module.__name__, None)
    except BaseException:
        traceback.print_exc()
        return 1
    code = 0
    try:
        runpy.run_module(args[0], run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        code = -1
    except BaseException:
        traceback.print_exc()
        code = 1
    _shut_down()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    if code == -1:  # an uncaught Ctrl-C ends the process by SIGINT, as Python does
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        code = 130
    return code


def _shut_down() -> None:
    """What the interpreter's exit does for the command: join its threads and run its
    threading exit hooks (a process pool's shutdown, softmine's :func:`signals.exiting`),
    then flush logging. ``atexit`` is left out: it holds pytest's handlers too."""
    try:
        threading._shutdown()  # type: ignore[attr-defined]
    except BaseException:
        traceback.print_exc()
    logging.shutdown()


def _stream(fd: int, errors: str) -> io.TextIOWrapper:
    """An unbuffered text stream on ``fd``, as ``PYTHONUNBUFFERED=1`` gives."""
    return io.TextIOWrapper(
        io.FileIO(fd, "w", closefd=False), encoding="utf-8", errors=errors, write_through=True
    )


def _fresh_warnings() -> None:
    """The warning filters and printing of a fresh interpreter (pytest records them instead)."""
    warnings.resetwarnings()
    warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.simplefilter("ignore", category, append=True)

    def show(msg: warnings.WarningMessage) -> None:
        sys.stderr.write(
            warnings.formatwarning(msg.message, msg.category, msg.filename, msg.lineno, msg.line)
        )

    warnings._showwarnmsg_impl = show  # type: ignore[attr-defined]
    warnings.showwarning = warnings._showwarning_orig  # type: ignore[attr-defined]


def _fresh_logging() -> None:
    """Logging as a fresh interpreter has it: no handlers (pytest's capture), level WARNING."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)
    logging.disable(logging.NOTSET)


@pytest.fixture
def repo() -> Path:
    return REPO


def compose(overrides: list[str] | None = None):
    """The composed training config (as ``softmine-train`` would build it), for in-process tests."""
    from softmine.config import compose_config

    return compose_config(overrides)


FAST_DIGITS = [
    "trainer.progress_bar=false",
    "trainer.plots=false",
    "trainer.tensorboard=false",
    "sampler.classes_per_batch=5",
    "sampler.samples_per_class=4",
]

#: A short CPU run on a fake CUB (tests/fakes): 2 classes x 3 images a batch, RGB input.
FAST_CUB = [
    "dataset=cub",
    "trainer.device=cpu",
    "trainer.progress_bar=false",
    "trainer.tensorboard=false",
    "trainer.plots=false",
    "sampler.classes_per_batch=2",
    "sampler.samples_per_class=3",
    "backbone.trunk.in_channels=3",
]
