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
"""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.util  # registers its exit handler now, so ours (below) runs before it
import signal
import threading
from types import FrameType, TracebackType

_pending: int | None = None


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
    step if the request is still pending then.
    """
    if threading.current_thread() is threading.main_thread():
        for s in GracefulInterrupt.SIGNALS:
            signal.signal(s, _start_up_handler)


def _start_up_handler(signum: int, frame: FrameType | None) -> None:
    note_pending(signum)
    raise KeyboardInterrupt


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
