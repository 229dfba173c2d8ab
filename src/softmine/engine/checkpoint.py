"""Checkpoints: atomic writes, and the full state needed to resume a run bit-for-bit.

A checkpoint holds the model, the loss (class vectors / classifier), optimizer,
scheduler and AMP scaler states, the sampler position (epoch, batch within the
epoch), the running epoch statistics and the RNG states of Python, NumPy, torch
and CUDA. Everything is stored as tensors and plain containers, so it loads with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from softmine.errors import ConfigError

log = logging.getLogger(__name__)

LAST = "last.pt"
BEST = "best.pt"


def capture_rng_state() -> dict[str, Any]:
    """RNG states of Python, NumPy, torch (CPU) and every CUDA device, as safe-to-load objects."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [
            np_name,
            torch.from_numpy(np_keys.astype(np.int64)),
            np_pos,
            np_has_gauss,
            np_gauss,
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        restore_cuda_rng_states(state["cuda"])


def restore_cuda_rng_states(states: list[torch.Tensor]) -> None:
    """Set the RNG state of each visible CUDA device from the saved list, as far as both go.

    A run saved on more GPUs than this process sees (resumed on a smaller node, or
    with ``CUDA_VISIBLE_DEVICES`` narrowed) restores the first ones and says so;
    ``torch.cuda.set_rng_state_all`` would fail with an invalid device instead.
    """
    visible = torch.cuda.device_count()
    for index, rng in enumerate(states[:visible]):
        torch.cuda.set_rng_state(rng, index)
    if len(states) != visible:
        log.warning(
            "the checkpoint holds the RNG states of %d CUDA devices, %d are visible: "
            "restored %d; the random streams of the others start afresh",
            len(states),
            visible,
            min(len(states), visible),
        )


def save_atomic(state: dict[str, Any], path: Path) -> Path:
    """Write ``state`` to ``path`` through a temporary file and a rename.

    A crash or SIGKILL at any moment leaves either the previous file or the new
    one, never a truncated checkpoint.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``), with a clear error for bad files."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # torch raises several types for corrupt or foreign files
        raise ConfigError(
            f"checkpoint {path} cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0]}); "
            "it is corrupt or not a softmine checkpoint"
        ) from e


def load_state_checked(
    module: torch.nn.Module, state: dict[str, Any], what: str, path: Path
) -> None:
    """``module.load_state_dict(state)``, turning a key/shape mismatch into one clear error."""
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:3])
        raise ConfigError(
            f"checkpoint {path} holds a different {what} than this config builds "
            f"({first} {detail}); resume with the config it was trained with or start a new run"
        ) from None
