"""What this machine offers a run: the CPUs it may use, and room in shared memory.

Both respect the limits a container or a batch system sets, which the obvious calls
miss: ``os.cpu_count()`` counts every CPU of the node even when SLURM's
``cpus_per_task`` or ``taskset`` allows fewer, and DataLoader workers hand their
batches over through ``/dev/shm``, which Docker limits to 64 MB by default.
"""

from __future__ import annotations

import os
import shutil

SHM = "/dev/shm"


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask where the OS has one, else all."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def free_shared_memory(path: str = SHM) -> int | None:
    """Free bytes in the shared-memory file system, or None where there is none (macOS, Windows)."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None
