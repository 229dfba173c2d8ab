"""Interleaved timing shared by the benches in scripts/bench/ (a helper, not a bench).

A bench compares a candidate with a baseline measured in the same run. Three rules
make its ratios repeatable:

* every timed trial does at least ``MIN_TRIAL_S`` of work: :func:`run_for` repeats
  a call too short to time until it does (a 40 ms trial measures first-touch
  allocation and the scheduler, not the code);
* the trials of the paths compared alternate (:func:`interleave`: baseline,
  candidate, candidate, baseline, ...), so that load drifting on a shared machine
  hits them alike;
* the bench prints the best and the median of each (:class:`Summary`), and its
  headline ratios from both.

``make bench`` runs every ``scripts/bench/*.py`` but those starting with ``_``.
"""

from __future__ import annotations

import ctypes
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

MIN_TRIAL_S = 1.0  # the least work one timed trial does, in seconds of its clock
TRIALS = 5  # interleaved trials of each path

T = TypeVar("T")


@dataclass(frozen=True)
class Trial:
    """``work`` units (calls, images, steps) done in ``seconds`` of a clock."""

    work: float
    seconds: float

    @property
    def rate(self) -> float:
        """Units per second."""
        return self.work / max(self.seconds, 1e-12)

    @property
    def per_unit(self) -> float:
        """Seconds per unit."""
        return self.seconds / max(self.work, 1e-12)


def fixed_malloc() -> None:
    """Tell glibc's malloc to serve every block over 128 KiB by mmap and to return freed
    memory at once (no-op elsewhere).

    Its default raises the mmap threshold as large blocks are freed, so whether a trial's
    large buffers are fresh pages (a page fault per 4 KiB) or a block reused from the heap
    depends on what the process did before: the same code then ran 1.8x faster in one
    run than in the next. Fixed, every large buffer is fresh pages, as a DataLoader
    worker's shared-memory batches are.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD (fixed: no dynamic raising)
    libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD


def run_for(
    fn: Callable[[], object],
    min_s: float = MIN_TRIAL_S,
    clock: Callable[[], float] = time.perf_counter,
    sync: Callable[[], None] | None = None,
) -> Trial:
    """Call ``fn`` until at least ``min_s`` of ``clock`` have passed: the calls and their seconds.

    Calls run in blocks (``sync``, e.g. ``torch.cuda.synchronize``, after each): the
    first block is one call, each next one at most doubles the calls so far and is
    sized from their rate to end just past ``min_s``, so the clock is read seldom
    and the trial overshoots ``min_s`` by about one call.
    """
    calls, block, t0 = 0, 1, clock()
    while True:
        for _ in range(block):
            fn()
        if sync is not None:
            sync()
        calls += block
        elapsed = clock() - t0
        if elapsed >= min_s:
            return Trial(calls, elapsed)
        wanted = calls * (min_s - elapsed) / elapsed if elapsed > 0 else calls
        block = max(1, min(calls, math.ceil(wanted)))


def interleave(
    trials: dict[str, Callable[[], T]], rounds: int = TRIALS, warmup: bool = True
) -> dict[str, list[T]]:
    """``rounds`` results of each trial, the trials taking turns round by round.

    Odd rounds run the trials in reverse order (A B, B A, A B, ...), so that a
    load rising or falling through the run favours none of them. With ``warmup``
    each trial runs once first, untimed (allocations, caches, lazy imports).
    """
    if warmup:
        for trial in trials.values():
            trial()
    out: dict[str, list[T]] = {name: [] for name in trials}
    order = list(trials)
    for r in range(rounds):
        for name in order if r % 2 == 0 else reversed(order):
            out[name].append(trials[name]())
    return out


@dataclass(frozen=True)
class Summary:
    """The best and the median of a measurement's trials (or of a ratio's)."""

    best: float
    median: float

    @classmethod
    def of(cls, values: Sequence[float], higher_is_better: bool) -> Summary:
        """Best (the largest rate or the smallest time) and median of ``values``."""
        if not values:
            raise ValueError("no trials to summarise")
        best = max(values) if higher_is_better else min(values)
        return cls(float(best), float(statistics.median(values)))

    def __truediv__(self, other: Summary) -> Summary:
        """The ratio of two summaries: best over best, median over median."""
        return Summary(self.best / other.best, self.median / other.median)

    def scaled(self, factor: float) -> Summary:
        """Both figures times ``factor`` (a unit change)."""
        return Summary(self.best * factor, self.median * factor)

    def format(self, spec: str = ".2f") -> str:
        """``best X, median Y`` with ``spec`` for both."""
        return f"best {self.best:{spec}}, median {self.median:{spec}}"


def headline(label: str, ratio: Summary, spec: str = ".2f") -> str:
    """A bench's headline line: ``label = BEST (median MEDIAN)``, the ratio of bests first."""
    return f"{label} = {ratio.best:{spec}} (median {ratio.median:{spec}})"
