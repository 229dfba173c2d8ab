"""Checkpoints: atomic writes, and the full state needed to resume a run bit-for-bit.

A checkpoint holds the model, the loss (class vectors / classifier), the cross-batch
memory's queue (``loss.memory=xbm``), optimizer, scheduler and AMP scaler states,
the sampler position (epoch, batch within the epoch), the running epoch statistics
and the RNG states of Python, NumPy, torch and CUDA. Everything is stored as tensors and plain containers, so it loads with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from softmine.engine.setup import rank_seed
from softmine.engine.state import TrainState
from softmine.errors import ConfigError
from softmine.runs.atomic import write_atomic
from softmine.runs.layout import RUN_FILES, RunLayout

if TYPE_CHECKING:
    from softmine.engine.components import Components

log = logging.getLogger(__name__)

CHECKPOINT_DIR = RUN_FILES.checkpoints.name  # a run's checkpoints/ folder and the names in it
LAST = RUN_FILES.last_checkpoint.name
BEST = RUN_FILES.best_checkpoint.name


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
    one, never a truncated checkpoint; a failed write (a full disk) removes its
    temporary file and raises :class:`~softmine.errors.StorageError`.
    """
    return write_atomic(Path(path), lambda f: torch.save(state, f))


#: First bytes of a ``torch.save`` file: a zip archive (since torch 1.6) or a legacy pickle.
ZIP_MAGIC, PICKLE_MAGIC = b"PK\x03\x04", b"\x80"


def _first_sentence(e: BaseException) -> str:
    line = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    return line.split(". ", 1)[0].rstrip(".")


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``), with one clear sentence for a bad file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4)
    except FileNotFoundError:
        raise ConfigError(f"checkpoint {path} does not exist") from None
    except OSError as e:
        raise ConfigError(f"cannot read the checkpoint {path} ({e.strerror or e})") from None
    if size == 0:
        raise ConfigError(
            f"checkpoint {path} is empty (0 bytes): it was cut off while being copied or "
            "written; use another checkpoint (softmine itself never leaves one half-written)"
        )
    if head != ZIP_MAGIC and not head.startswith(PICKLE_MAGIC):
        raise ConfigError(
            f"{path} is not a PyTorch checkpoint (it does not start like a file written by "
            "torch.save); give a checkpoint written by softmine-train"
        )
    foreign = _foreign_objects(path) if head == ZIP_MAGIC else []
    if foreign:
        raise ConfigError(
            f"{path} stores Python objects ({', '.join(foreign[:3])}), so it is not a softmine "
            "checkpoint (softmine's hold only tensors and plain containers and are never "
            "unpickled as code)"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or damaged files
        raise ConfigError(
            f"checkpoint {path} is truncated or damaged ({type(e).__name__}: {_first_sentence(e)}); "
            "use another checkpoint"
        ) from e


def checkpoint_step(path: Path) -> int | None:
    """The training step a softmine checkpoint holds (``train_state.step``), None if it has none.

    Memory-maps the file, so only the small ``train_state`` entry is read from disk.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip checkpoint (mmap needs one): load it the checked way
        state = load_checkpoint(path)
    train_state = state.get("train_state") if isinstance(state, dict) else None
    if not isinstance(train_state, dict) or "step" not in train_state:
        return None
    return int(train_state["step"])


def _foreign_objects(path: Path) -> list[str]:
    """Classes a zip checkpoint would need to unpickle (empty for softmine's own checkpoints)."""
    lister = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if lister is None:
        return []
    try:
        return list(lister(path))
    except Exception:  # a damaged archive: torch.load below names the damage
        return []


def reapply_optimizer_settings(
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    recorded: dict[str, Any],
    current: dict[str, Any],
) -> list[str]:
    """Apply the optimizer settings of this run's config over those loaded from a checkpoint.

    ``optimizer.load_state_dict`` restores the hyperparameters saved with the
    checkpoint; when a resume changes them (``resume_override=[optimizer.lr]``), the
    new values must win. The learning rate is scaled by ``current/recorded`` in every
    parameter group (and in the scheduler's base rates), other hyperparameters are set.
    Settings equal to the recorded ones are left untouched (an exact resume stays exact).
    Returns the keys applied.
    """
    applied = []
    for key, new in current.items():
        if key.startswith("_") or recorded.get(key) == new or new is None:
            continue
        if key == "lr":
            ratio = float(new) / float(recorded["lr"])
            for group in optimizer.param_groups:
                group["initial_lr"] = group.get("initial_lr", group["lr"]) * ratio
            if hasattr(scheduler, "base_lrs"):
                scheduler.base_lrs = [b * ratio for b in scheduler.base_lrs]
            if hasattr(scheduler, "lr_lambdas"):  # LambdaLR: the rate of the current step
                for group, base, fn in zip(
                    optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
                ):
                    group["lr"] = base * fn(scheduler.last_epoch)
            else:
                for group in optimizer.param_groups:
                    group["lr"] *= ratio
        elif all(key in g for g in optimizer.param_groups):
            value = tuple(new) if isinstance(new, list) else new
            for group in optimizer.param_groups:
                group[key] = value
        else:
            continue
        applied.append(f"optimizer.{key}")
    return applied


def first_nonfinite(named: list[tuple[str, Any]]) -> str | None:
    """The name of the first floating-point tensor of ``named`` that holds NaN or Inf, else None."""
    tensors = [(n, t) for n, t in named if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not tensors:
        return None
    finite = torch.stack([torch.isfinite(t).all() for _, t in tensors])
    return None if bool(finite.all()) else tensors[int((~finite).nonzero()[0])][0]


def require_finite_state(
    path: Path, ckpt: dict[str, Any], optimizer: torch.optim.Optimizer, names: dict[int, str]
) -> None:
    """Refuse a checkpoint whose weights or optimizer state hold NaN or Inf.

    Training never saves one (its steps stop at the first non-finite value), so the file
    is damaged; resumed, its NaN would surface steps later as a diverging run, blamed on
    the learning rate. ``names`` maps ``id(parameter)`` to its name, for the message.
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]
    order = [names.get(id(p), f"parameter {i}") for i, p in enumerate(params)]
    named = [(f"the weight {k}", t) for k, t in ckpt["model"].items()]
    named += [(f"the loss's {k}", t) for k, t in ckpt["loss"].items()]
    named += [
        (f"the optimizer's {key} of {order[int(i)] if int(i) < len(order) else i}", t)
        for i, state in (ckpt["optimizer"].get("state") or {}).items()
        for key, t in state.items()
    ]
    bad = first_nonfinite(named)
    if bad is not None:
        raise ConfigError(
            f"checkpoint {path} is damaged: {bad} holds NaN or Inf, which training never "
            "saves; resume from an intact copy of it, or start a new run"
        )


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


class Checkpoints:
    """A run's ``checkpoints/`` folder: the training state written there, and read back to resume.

    Only rank 0 writes (under torch.distributed every rank holds the same weights).
    :attr:`saved_step` is the step of ``last.pt`` on disk, when known: the failure
    messages (:mod:`softmine.engine.failures`) name it.
    """

    def __init__(self, run_dir: Path, is_main: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / CHECKPOINT_DIR
        self.is_main = is_main
        self.saved_step: int | None = None

    @property
    def last(self) -> Path:
        """``checkpoints/last.pt``: the latest state, the one ``resume=true`` continues from."""
        return self.dir / LAST

    def check_run_folder(self, resume: bool) -> None:
        """Never overwrite a finished (or resumable) run unless asked to resume it."""
        if resume:
            return
        taken = [p for p in (RunLayout(self.run_dir).metrics, self.last) if p.exists()]
        if taken:
            raise ConfigError(
                f"the run folder {self.run_dir} already holds a run ({taken[0].name}); "
                "continue it with resume=true, or pick a new folder with hydra.run.dir=..."
            )

    def save(self, parts: Components, state: TrainState, cfg: DictConfig, name: str) -> Path:
        """Write the whole training state atomically to ``checkpoints/<name>`` (rank 0)."""
        path = self.dir / name
        if self.is_main:
            save_atomic(training_state(parts, state, cfg), path)
            if name == LAST:
                self.saved_step = state.step
        return path

    def load(self, path: Path, parts: Components, cfg: DictConfig) -> TrainState:
        """Restore into ``parts`` everything :meth:`save` wrote, checking it fits this config;
        returns the run's position (and the RNG streams are the saved ones)."""
        state = load_training_state(path, parts, cfg)
        self.saved_step = state.step
        return state


def training_state(parts: Components, state: TrainState, cfg: DictConfig) -> dict[str, Any]:
    """What a checkpoint holds: weights, optimiser, schedule, scaler, position, RNG, config
    (and the cross-batch memory when the run has one)."""
    memory = {} if parts.memory is None else {"memory": parts.memory.state()}
    return {
        "format": 1,
        "num_classes": parts.num_classes,
        "model": parts.model.state_dict(),
        "loss": parts.loss_fn.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "scaler": parts.scaler.state_dict(),
        "train_state": asdict(state),
        "rng": capture_rng_state(),
        "config": OmegaConf.to_container(cfg, resolve=True),
        **memory,
    }


def load_training_state(path: Path, parts: Components, cfg: DictConfig) -> TrainState:
    """Load a checkpoint of :func:`training_state` into ``parts`` and the RNG streams."""
    ckpt = load_checkpoint(path)
    missing = {"model", "loss", "optimizer", "train_state", "rng"} - set(ckpt)
    if missing:
        raise ConfigError(f"{path} is not a softmine training checkpoint (lacks {sorted(missing)})")
    names = {id(p): f"model.{n}" for n, p in parts.model.named_parameters()}
    names |= {id(p): f"loss.{n}" for n, p in parts.loss_fn.named_parameters()}
    require_finite_state(path, ckpt, parts.optimizer, names)
    load_state_checked(parts.model, ckpt["model"], "model", path)
    load_state_checked(parts.loss_fn, ckpt["loss"], "loss (class vectors / classifier)", path)
    _load_memory(parts, ckpt, path)
    try:
        parts.optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError) as e:
        raise ConfigError(
            f"checkpoint {path} holds optimizer state for other parameters ({e}); "
            "resume with the config it was trained with"
        ) from None
    _load_schedule(parts.scheduler, ckpt["scheduler"])
    recorded = (ckpt.get("config") or {}).get("optimizer") or {}
    current = OmegaConf.to_container(cfg.optimizer, resolve=True)
    for key in reapply_optimizer_settings(parts.optimizer, parts.scheduler, recorded, current):
        log.info("%s changed on resume: now %s", key, cfg.optimizer[key.split(".")[1]])
    parts.scaler.load_state_dict(ckpt["scaler"])
    state = TrainState(**ckpt["train_state"])
    restore_rng_state(ckpt["rng"])
    if parts.dist.rank > 0:  # the checkpoint holds rank 0's streams: give this rank its own
        torch.manual_seed(rank_seed(int(cfg.seed), parts.dist.rank, state.step))
    return state


def _load_memory(parts: Components, ckpt: dict[str, Any], path: Path) -> None:
    """The cross-batch memory's queue from a checkpoint; an error if only one side has one."""
    if parts.memory is None and "memory" not in ckpt:
        return
    if parts.memory is None:
        raise ConfigError(
            f"checkpoint {path} holds a cross-batch memory and this config has none; resume "
            "with the config it was trained with (loss.memory=xbm)"
        )
    if "memory" not in ckpt:
        raise ConfigError(
            f"this config has a cross-batch memory (loss.memory=xbm) and checkpoint {path} has "
            "none; resume with the config it was trained with (loss.memory=null)"
        )
    parts.memory.load_state(ckpt["memory"])


def _load_schedule(scheduler: Any, saved: dict[str, Any]) -> None:
    """The schedule's position from a checkpoint; its shape follows this run's config
    (a resume may extend ``trainer.epochs``)."""
    lambdas = getattr(scheduler, "lr_lambdas", [])
    fresh = [dict(vars(fn)) if hasattr(fn, "__dict__") else None for fn in lambdas]
    scheduler.load_state_dict(saved)
    for fn, attrs in zip(lambdas, fresh, strict=True):
        if attrs is not None:
            vars(fn).update(attrs)
