"""What a stopped run says: why it stopped, what it kept where, and what to do next.

Every sentence a training run ends with when it cannot go on is written here,
from the run's :class:`~softmine.engine.checkpoint.Checkpoints` (where ``last.pt``
is, and its step): non-finite values (with the lower-learning-rate hint), a failed
write (what was kept), an interrupt (the command that resumes), a failed final
evaluation (where the trained network is), and the unreadable files a run skipped.
"""

from __future__ import annotations

import errno
import logging
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from softmine.data.file_check import read_listing, write_listing
from softmine.engine.checkpoint import Checkpoints
from softmine.engine.state import TrainState
from softmine.errors import Interrupted, StorageError, TrainingError
from softmine.runs.layout import RunLayout

log = logging.getLogger(__name__)

#: errno values of a failed write (full disk, quota, read-only filesystem, file size limit).
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


def kept(ckpts: Checkpoints) -> str:
    """Where the last checkpoint with finite weights is (for stop and write-failure messages)."""
    if not ckpts.last.exists():
        return "no checkpoint was written yet"
    at = f" (step {ckpts.saved_step})" if ckpts.saved_step is not None else ""
    return f"the last checkpoint, with finite weights, is {ckpts.last}{at}"


def lower_lr_hint(ckpts: Checkpoints, lr: Any) -> str:
    """How to go on with a tenth of the learning rate ``lr`` (``optimizer.lr``, or None)."""
    lower = f"{float(lr) / 10:g}" if lr is not None else "<lower>"
    if not ckpts.last.exists():
        return f"Start again with a lower learning rate (e.g. optimizer.lr={lower})"
    return (
        "Lower the learning rate: start again, or continue from that checkpoint with "
        f"resume=true resume_override=[optimizer.lr] optimizer.lr={lower}"
    )


def saved_model_hint(ckpts: Checkpoints, step: int) -> str:
    """After a failed final evaluation: where the trained network is and how to evaluate it."""
    return (
        f"The trained network is saved in {ckpts.last} (step {step}): "
        f"once the cause is fixed, finish the run with the same command plus resume=true "
        f"hydra.run.dir={ckpts.run_dir}, or evaluate it with `softmine-eval {ckpts.run_dir}`"
    )


def kept_files(ckpts: Checkpoints, step: int, finished: bool) -> str:
    """What a failed write left, and where (the results first)."""
    metrics = RunLayout(ckpts.run_dir).metrics
    if finished and metrics.exists():
        older = (
            f" ({ckpts.last} still holds step {ckpts.saved_step})"
            if ckpts.last.exists() and ckpts.saved_step is not None
            else ""
        )
        return (
            f"the results are safe in {metrics}, but the final weights were not saved{older}; "
            "free space and run the same command with resume=true to write them"
        )
    return (
        f"training stopped at step {step}; {kept(ckpts)}; free space and continue with resume=true"
    )


def explain_stop(
    e: BaseException, ckpts: Checkpoints, step: int, finished: bool
) -> BaseException | None:
    """The error a run stopped by ``e`` raises instead: a second Ctrl-C becomes
    :class:`Interrupted`, a failed write one :class:`StorageError` saying what was kept
    where; None for any other error (raised as it is)."""
    if isinstance(e, KeyboardInterrupt):  # a second Ctrl-C: the last checkpoint stays valid
        return Interrupted(
            f"aborted at step {step} by an interrupt; {kept(ckpts)}. "
            f"Resume with the same command plus: resume=true hydra.run.dir={ckpts.run_dir}",
            signal.SIGINT,
        )
    if isinstance(e, StorageError):
        return StorageError(f"{e}; {kept_files(ckpts, step, finished)}", errno=e.errno)
    if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
        where = f" {e.filename}" if e.filename else f" into {ckpts.run_dir}"
        return StorageError(
            f"cannot write{where} ({e.strerror}); {kept_files(ckpts, step, finished)}",
            errno=e.errno,
        )
    return None


@contextmanager
def explaining_stops(ckpts: Checkpoints, state: Callable[[], TrainState]) -> Iterator[None]:
    """A second Ctrl-C or a failed write inside becomes one error saying what was kept where
    (:func:`explain_stop`); ``state`` gives the run's position when it stopped."""
    try:
        yield
    except (KeyboardInterrupt, StorageError, OSError) as e:
        s = state()
        better = explain_stop(e, ckpts, s.step, s.finished)
        if better is None:
            raise
        raise better from (None if isinstance(e, KeyboardInterrupt) else e)


def interrupted(step: int, path: Path, run_dir: Path, signum: int) -> Interrupted:
    """A stop asked for by a signal, once the checkpoint ``path`` is saved."""
    return Interrupted(
        f"interrupted at step {step}: checkpoint saved to {path}. Resume with the "
        f"same command plus: resume=true hydra.run.dir={run_dir}",
        signum,
    )


def nonfinite_step(
    what: str, step: int, values: dict[str, float], ckpts: Checkpoints, lr: Any
) -> TrainingError:
    """A non-finite loss or gradient (``what``) at ``step``, with the step's logged values."""
    pieces = ", ".join(f"{k}={v:.6g}" for k, v in values.items())
    return TrainingError(
        f"non-finite {what} at step {step} ({pieces}); {kept(ckpts)}. "
        f"{lower_lr_hint(ckpts, lr)}, or set trainer.on_nonfinite=skip to skip such steps"
    )


def nonfinite_weights(
    step: int, name: str, ckpts: Checkpoints, lr: Any, skip: bool
) -> TrainingError:
    """Weights that became non-finite at ``step`` (``name``: the first such tensor)."""
    return TrainingError(
        f"the weights became non-finite at step {step} ({name}); {kept(ckpts)}. "
        f"{lower_lr_hint(ckpts, lr)}"
        + (" (trainer.on_nonfinite=skip cannot undo a step already applied)" if skip else "")
    )


def optimizer_overflow(step: int, ckpts: Checkpoints, lr: Any) -> TrainingError:
    """An optimizer step beyond float32 (e.g. Adam's lr / (1 - beta1))."""
    return TrainingError(
        f"the optimizer step {step} overflowed float32 "
        f"(optimizer.lr={lr} is too large); {kept(ckpts)}"
    )


def nonfinite_embeddings(step: int, ckpts: Checkpoints, lr: Any) -> TrainingError:
    """Test embeddings with NaN or Inf although the weights are finite."""
    return TrainingError(
        f"the test embeddings are not finite at step {step} (the weights are "
        f"finite but too large: the learning rate {lr} is "
        f"probably too high); {kept(ckpts)}"
    )


def report_skipped_images(path: Path, dropped: dict[str, int]) -> None:
    """Say how many unreadable files were skipped and evaluation items left out
    (data.on_bad_image=skip); ``bad_images.txt`` lists each file once, with its reason."""
    if not path.exists():
        return
    bad = read_listing(path)
    if not bad:
        return
    write_listing(path, bad)  # sorted, each file once
    dropped = {k: v for k, v in dropped.items() if v}
    left_out = (
        "; evaluation left out " + ", ".join(f"{n} {name} item(s)" for name, n in dropped.items())
        if dropped
        else ""
    )
    msg = f"{len(bad)} unreadable image files were skipped{left_out} (listed in {path})"
    log.warning(msg)
    print(f"warning: {msg}")
