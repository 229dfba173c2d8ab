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
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(
    args: list[str], cwd: Path, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``python -m <args>`` in ``cwd`` with the test interpreter (``env`` added to the
    environment); returns the completed process.

    The command runs in a child process forked from the test process (:func:`_forked`), so
    it has its own exit status, signals and module state but does not pay the few seconds
    of importing torch and the rest again; where a fork would differ from a fresh
    interpreter (``env`` changes a ``PYTHON*`` variable, CUDA is initialised here) it is a
    fresh ``python -m`` instead.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SOFTMINE_DEBUG": "", **(env or {})}
    if _can_fork(env):
        return _forked(args, cwd, timeout, env)
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _can_fork(env: dict[str, str]) -> bool:
    """Whether a forked child runs a command as a fresh interpreter with ``env`` would."""
    if not hasattr(os, "fork"):
        return False
    read_at_start = {k for k in {*env, *os.environ} if k.startswith("PYTHON")}
    if any(env.get(k) != os.environ.get(k) for k in read_at_start - {"PYTHONUNBUFFERED"}):
        return False
    torch = sys.modules.get("torch")
    return torch is None or not torch.cuda.is_initialized()


def _forked(
    args: list[str], cwd: Path, timeout: float, env: dict[str, str]
) -> subprocess.CompletedProcess:
    """``python -m <args>`` in a child forked from this process (stdout, stderr captured)."""
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            code = _child(args, cwd, env, out.fileno(), err.fileno())
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise subprocess.TimeoutExpired(["python", "-m", *args], timeout)
        time.sleep(0.02)
    texts = []
    for f in (out, err):
        f.seek(0)
        texts.append(f.read().decode("utf-8", "replace"))
        f.close()
    return subprocess.CompletedProcess(
        ["python", "-m", *args], os.waitstatus_to_exitcode(status), texts[0], texts[1]
    )


def _child(args: list[str], cwd: Path, env: dict[str, str], out: int, err: int) -> int:
    """Set the forked child up as ``python -m`` would start, run the module; its exit code."""
    try:
        os.dup2(out, 1)
        os.dup2(err, 2)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
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
        sys.modules.pop(args[0], None)  # run as __main__, as ``python -m`` does
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
    logging.shutdown()
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
