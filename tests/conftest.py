"""Shared test helpers."""

from __future__ import annotations

import os

# One torch/BLAS thread per process: the suite starts training subprocesses on a 2-core
# machine, and oversubscribed threads made them several times slower. Set before torch loads.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import subprocess  # noqa: E402
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(
    args: list[str], cwd: Path, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``python -m <args>`` in ``cwd`` with the test interpreter (``env`` added to the
    environment); returns the completed process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SOFTMINE_DEBUG": "", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


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
