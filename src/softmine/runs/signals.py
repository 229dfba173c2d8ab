"""Graceful interruption: SIGINT / SIGTERM set a flag that the training loop checks every
``trainer.interrupt_every`` steps (and after the first step of a run).

A signal that arrived before the loop started (a sweep's handler notes it with
:func:`note_pending`) counts as the first one: the loop stops after its first step.

A Ctrl-C in a terminal reaches the whole foreground process group, DataLoader
workers included, and a batch system's SIGTERM reaches every process of the job.
Workers therefore ignore both (:func:`ignore_interrupts`, their ``worker_init_fn``):
the main process alone decides to stop, saves, and shuts its workers down; a worker
whose main process died exits on its own (torch's watchdog).

Because a worker ignores SIGTERM, multiprocessing's own exit handler (which sends
its daemonic children SIGTERM and then waits for them) would wait forever when the
main process exits with a loader still alive, e.g. after an error raised in the
middle of an epoch. :func:`_kill_loader_workers` runs before it at exit and kills
those workers first: they hold nothing worth keeping.

Once the command is on its way out, a further SIGINT/SIGTERM must not raise
KeyboardInterrupt: raised while Python joins the remaining threads or runs its exit
handlers, it is printed as a traceback ("Exception ignored in atexit callback").
:func:`exiting` (called when an interrupted command stops, and first thing at
interpreter shutdown) makes such a signal end the process at once, quietly.
"""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.util  # registers its exit handler now, so ours (below) runs before it
import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

_pending: int | None = None
#: What an interrupt during start-up prints (the command's last line).
STOPPED_BEFORE_TRAINING = (
    "interrupted before training began; nothing was saved (run the command again)"
)


def note_pending(signum: int) -> None:
    """Remember a stop request that arrived while no :class:`GracefulInterrupt` was active."""
    global _pending
    _pending = signum


def pending() -> int | None:
    """The stop request noted by :func:`note_pending`, if any."""
    return _pending


def interrupt_start_up() -> None:
    """Install the command's handler for SIGINT/SIGTERM until training begins.

    It notes the request (:func:`note_pending`) and raises KeyboardInterrupt, so the
    command stops where it is. Python's own handler only raises, and a
    KeyboardInterrupt can be lost: raised inside a ``__del__`` or a weakref callback
    it is printed and ignored, and the run went on to train. Noted, it is never
    lost: the command checks :func:`pending` when an exception reaches it (an
    interrupt that broke a library half-way, e.g. OmegaConf while Hydra composes,
    surfaces as that library's error), and the training loop stops after its first
    step if the request is still pending then; Python's print of the lost one (a
    traceback) is silenced (:class:`_QuietInterrupts`). A second signal while one is
    pending ends the command at once with the same one line.
    """
    if threading.current_thread() is threading.main_thread():
        for s in GracefulInterrupt.SIGNALS:
            signal.signal(s, _start_up_handler)
    if not isinstance(sys.unraisablehook, _QuietInterrupts):
        sys.unraisablehook = _QuietInterrupts(sys.unraisablehook)


class _QuietInterrupts:
    """``sys.unraisablehook`` that drops a KeyboardInterrupt Python could not raise.

    Raised by our handlers inside a ``__del__``, a weakref callback, an exit handler or
    Python's join of the remaining threads, it would be printed with a traceback and
    ignored; the stop request itself is kept (:func:`pending`, :class:`GracefulInterrupt`).
    Every other unraisable exception goes to the previous hook.
    """

    def __init__(self, previous: Callable[[Any], object]) -> None:
        self.previous = previous

    def __call__(self, info: Any) -> None:
        if not isinstance(info.exc_value, KeyboardInterrupt):
            self.previous(info)


def _start_up_handler(signum: int, frame: FrameType | None) -> None:
    if _pending is not None:  # a second one: the first is already stopping the command, or was lost
        print(STOPPED_BEFORE_TRAINING, file=sys.stderr, flush=True)
        _exit_now(signum, frame)
    note_pending(signum)
    raise KeyboardInterrupt


def exiting() -> None:
    """From now on a SIGINT/SIGTERM ends the process at once (``os._exit(128 + signum)``).

    For a command that is stopping anyway: a KeyboardInterrupt raised now could only land
    in the code that winds the process down (joining threads, exit handlers) and be
    printed there as a traceback. Nothing is lost: what had to be saved was saved before.
    """
    if threading.current_thread() is threading.main_thread():
        for s in GracefulInterrupt.SIGNALS:
            signal.signal(s, _exit_now)


def _exit_now(signum: int, frame: FrameType | None) -> None:
    sys.stderr.flush()
    os._exit(128 + signum)


class GracefulInterrupt:
    """Context manager: the first SIGINT/SIGTERM sets ``self.signum``; a second one aborts at once.

    Only installs handlers in the main thread (signal handlers cannot be set elsewhere).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> GracefulInterrupt:
        self.signum = _pending
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)  # type: ignore[arg-type]
        self._previous.clear()


def ignore_interrupts(worker_id: int = 0) -> None:
    """``worker_init_fn`` of every DataLoader: this worker ignores SIGINT and SIGTERM."""
    for s in GracefulInterrupt.SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def _kill_loader_workers() -> None:
    """At exit: SIGKILL the daemonic children still alive (DataLoader workers ignore SIGTERM).

    multiprocessing would end them with SIGTERM right after this anyway; which
    children are loader workers is not recorded once started, so all daemonic ones go.
    """
    children = [c for c in multiprocessing.active_children() if c.daemon]
    if children and threading.current_thread() is threading.main_thread():
        signal.signal(
            signal.SIGCHLD, signal.SIG_DFL
        )  # torch's handler would report the kill as an error
    for child in children:
        child.kill()


atexit.register(_kill_loader_workers)
# First thing at interpreter shutdown, before Python joins the threads still running (a
# cache build's decoders, say) and runs the exit handlers: an interrupt now ends the process.
getattr(threading, "_register_atexit", atexit.register)(exiting)
