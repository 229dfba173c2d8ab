"""Run setup shared by training and evaluation: seeding, device choice, DataLoader workers."""

from __future__ import annotations

import logging
import os
import random
import shutil
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from softmine.errors import ConfigError
from softmine.hardware import SHM, available_cpus, free_shared_memory

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
SHARING_STRATEGIES = ("file_descriptor", "file_system")
PREFETCH = 2  # batches each DataLoader worker prepares ahead (torch's prefetch_factor default)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (all devices); optionally force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def configure_backends(deterministic: bool, tf32: bool = True) -> None:
    """cuDNN picks the fastest convolution algorithms for the (fixed) batch shape, unless
    ``trainer.deterministic`` asks for exact repeats; ``tf32`` sets :func:`set_tf32`."""
    torch.backends.cudnn.benchmark = not deterministic
    set_tf32(tf32)


def set_tf32(on: bool) -> None:
    """``trainer.tf32``: float32 matrix products and cuDNN convolutions in TF32 on Ampere and
    later GPUs (faster, 10-bit mantissa inputs), or in full float32.

    torch's defaults differ (matmul off, cuDNN on); both are set here, through the flags
    every torch >= 2.4 has (torch 2.9's ``fp32_precision`` reads them back consistently).
    """
    torch.backends.cuda.matmul.allow_tf32 = bool(on)
    torch.backends.cudnn.allow_tf32 = bool(on)


def describe_tf32() -> str:
    """``TF32 on`` / ``TF32 off`` as the flags stand now (each named when they differ)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if matmul == cudnn:
        return f"TF32 {'on' if matmul else 'off'}"
    return f"TF32 matmul {'on' if matmul else 'off'}, cuDNN {'on' if cudnn else 'off'}"


def set_cpu_threads(value: object) -> int | None:
    """``trainer.num_threads``: ``auto`` leaves torch's default (``OMP_NUM_THREADS``, else the
    usable cores); a number N pins torch's and faiss's CPU thread pools to N threads.

    The thread count changes the order of floating-point sums, so a run on the CPU gives
    the same numbers on any machine only with a fixed count. Returns N, or None for auto.
    """
    if str(value) == "auto":
        return None
    import faiss

    n = int(value)  # type: ignore[call-overload]
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)
    return n


def describe_device(device: torch.device) -> str:
    """One line naming the device (the GPU, torch and CUDA versions, or the CPU's usable
    cores) and whether float32 runs in TF32 (which only CUDA GPUs use)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return (
            f"{torch.cuda.get_device_name(index)} (cuda:{index}, torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}), {describe_tf32()}"
        )
    return f"CPU ({available_cpus()} usable cores, torch {torch.__version__}), {describe_tf32()}"


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of rank ``rank``'s random streams: ``seed`` itself on rank 0 at step 0.

    Every other (rank, step) gets a seed of its own, so the ranks of a distributed
    run (and a rank resumed at ``step``) draw different augmentations.
    """
    if rank == 0 and step == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(rank), int(step)]).generate_state(1)[0])


def nvidia_driver_present() -> bool:
    """Whether this machine has an NVIDIA driver loaded (Linux) or its ``nvidia-smi``."""
    return os.path.exists("/proc/driver/nvidia/version") or shutil.which("nvidia-smi") is not None


def resolve_device(name: str, warn: bool = True) -> torch.device:
    """``auto`` picks CUDA when available, else the CPU; ``cuda`` without a GPU is an error.

    With ``warn``, ``auto`` falling back to the CPU on a machine that has an NVIDIA
    driver while this torch was built for CUDA is a warning (a torch newer than the
    driver, or ``CUDA_VISIBLE_DEVICES`` empty); on a machine without a GPU it is not
    (pip's default torch is a CUDA build everywhere).
    """
    name = str(name)
    base = name.split(":")[0]
    if base not in DEVICES:
        raise ConfigError(f"trainer.device must be one of {DEVICES} (got {name!r})")
    if base == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if warn and torch.version.cuda is not None and nvidia_driver_present():
            log.warning(
                "trainer.device=auto: this torch was built for CUDA %s but finds no usable GPU "
                "(no driver, a driver older than the build, or CUDA_VISIBLE_DEVICES empty); "
                "training on the CPU. Check nvidia-smi, or install a torch that matches the driver",
                torch.version.cuda,
            )
        return torch.device("cpu")
    if base == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "trainer.device=cuda but no CUDA GPU is visible; use trainer.device=auto or cpu"
        )
    return torch.device(name)


def resolve_num_workers(value: int | str, dataset: object) -> int:
    """``auto``: no worker processes for in-memory sets (``dataset.in_memory``), else min(8, CPUs).

    CPUs are those this process may use (its affinity: SLURM ``cpus_per_task``,
    ``taskset``), not every CPU of the machine.
    """
    if str(value) == "auto":
        if getattr(dataset, "in_memory", False):
            return 0
        return min(8, available_cpus())
    n = int(value)
    if n < 0:
        raise ConfigError(f"trainer.num_workers must be >= 0 or auto (got {n})")
    return n


def set_sharing_strategy(name: str) -> None:
    """How DataLoader workers hand tensors to the main process (``trainer.sharing_strategy``).

    ``file_descriptor`` (torch's default on Linux) passes an open descriptor per
    tensor; ``file_system`` passes a file name instead, for systems whose open-file
    limit is too low ("Too many open files"). Both keep the data in ``/dev/shm``.
    A strategy the platform lacks (macOS has only ``file_system``) leaves its default.
    """
    import torch.multiprocessing as mp

    name = str(name)
    if name not in SHARING_STRATEGIES:
        raise ConfigError(
            f"trainer.sharing_strategy must be one of {SHARING_STRATEGIES} (got {name!r})"
        )
    if name not in mp.get_all_sharing_strategies():
        log.warning(
            "trainer.sharing_strategy=%s is not available here; keeping %s",
            name,
            mp.get_sharing_strategy(),
        )
        return
    mp.set_sharing_strategy(name)


def item_bytes(dataset: Any) -> int:
    """Bytes of the tensors in ``dataset[0]`` (RNG untouched: a probe must not shift a seeded run)."""
    with torch.random.fork_rng(devices=[]):
        item = dataset[0]
    tensors = [v for v in (item if isinstance(item, tuple) else (item,)) if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)


def check_shared_memory(workers: int, batches: Sequence[tuple[Any, int]]) -> None:
    """Warn when ``/dev/shm`` cannot hold what ``workers`` DataLoader workers keep in flight.

    Each worker prepares :data:`PREFETCH` batches ahead in shared memory; ``batches``
    lists ``(dataset, batch size)`` of the loaders that may run (training, evaluation).
    Docker gives containers 64 MB there by default, too little for image batches:
    the workers then die with a bus error or "No space left on device".
    """
    free = free_shared_memory()
    if workers == 0 or free is None or not batches:
        return
    need = max(workers * PREFETCH * size * item_bytes(ds) for ds, size in batches)
    if need > free:
        log.warning(
            "%s has %.0f MB free but %d DataLoader workers may keep about %.0f MB of batches "
            "there: give the container more (docker run --shm-size=2g, or --ipc=host), or "
            "lower trainer.num_workers (0 uses none)",
            SHM,
            free / 1e6,
            workers,
            need / 1e6,
        )
