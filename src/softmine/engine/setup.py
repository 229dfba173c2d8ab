"""Run setup shared by training and evaluation: seeding and device choice."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from softmine.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (all devices); optionally force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else the CPU; ``cuda`` without a GPU is an error."""
    name = str(name)
    base = name.split(":")[0]
    if base not in DEVICES:
        raise ConfigError(f"trainer.device must be one of {DEVICES} (got {name!r})")
    if base == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if base == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "trainer.device=cuda but no CUDA GPU is visible; use trainer.device=auto or cpu"
        )
    return torch.device(name)


def resolve_num_workers(value: int | str, dataset: object) -> int:
    """``auto``: no worker processes for in-memory sets (``dataset.in_memory``), else min(8, CPUs)."""
    if str(value) == "auto":
        if getattr(dataset, "in_memory", False):
            return 0
        return min(8, os.cpu_count() or 1)
    n = int(value)
    if n < 0:
        raise ConfigError(f"trainer.num_workers must be >= 0 or auto (got {n})")
    return n
