"""Config checks that run before anything heavy (data loading, model building, downloads).

Each failure is one :class:`ConfigError` sentence naming the key, the bad value
and the fix.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from omegaconf import DictConfig

from softmine.engine.setup import SHARING_STRATEGIES, resolve_device
from softmine.errors import ConfigError
from softmine.losses.osm_caa import check_loss_hparams

PRECISIONS = ("32", "bf16", "fp16")
ON_NONFINITE = ("stop", "skip")


def _num(cfg: DictConfig, key: str) -> float | None:
    node = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return None
        node = node[part]
    return None if node is None else float(node)


def check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and prove a file can be written in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ConfigError(
            f"cannot write to the output folder {folder} ({e.strerror or e}); "
            "choose another with hydra.run.dir=... or fix its permissions"
        ) from None


def validate_config(cfg: DictConfig, run_dir: Path | None = None) -> None:
    """Check the values that would otherwise fail late or silently."""
    check_loss_hparams(*(_num(cfg, f"loss.{k}") for k in ("margin", "sigma", "lam")))
    dim = _num(cfg, "backbone.embedding_dim")
    if dim is None or dim <= 0 or dim != int(dim):
        raise ConfigError(
            f"backbone.embedding_dim must be a positive integer (got {cfg.backbone.get('embedding_dim')})"
        )
    for key in ("sampler.num_classes", "sampler.num_samples"):
        v = _num(cfg, key)
        if v is not None and (v < 1 or v != int(v)):
            raise ConfigError(f"{key} must be a positive integer (got {v})")
    t = cfg.trainer
    if int(t.epochs) < 1:
        raise ConfigError(f"trainer.epochs must be >= 1 (got {t.epochs})")
    if t.get("max_iters") is not None and int(t.max_iters) < 1:
        raise ConfigError(f"trainer.max_iters must be >= 1 or null (got {t.max_iters})")
    if str(t.get("precision", "32")) not in PRECISIONS:
        raise ConfigError(f"trainer.precision must be one of {PRECISIONS} (got {t.precision!r})")
    if str(t.get("on_nonfinite", "stop")) not in ON_NONFINITE:
        raise ConfigError(
            f"trainer.on_nonfinite must be one of {ON_NONFINITE} (got {t.on_nonfinite!r})"
        )
    strategy = str(t.get("sharing_strategy", "file_descriptor"))
    if strategy not in SHARING_STRATEGIES:
        raise ConfigError(
            f"trainer.sharing_strategy must be one of {SHARING_STRATEGIES} (got {strategy!r})"
        )
    if int(t.get("checkpoint_every", 0)) < 0:
        raise ConfigError(f"trainer.checkpoint_every must be >= 0 (got {t.checkpoint_every})")
    resolve_device(t.device)
    if run_dir is not None:
        check_writable(Path(run_dir))
    if "dataset" in cfg and cfg.dataset.get("root"):
        root = Path(os.path.expanduser(str(cfg.dataset.root)))
        if root.exists() and not root.is_dir():
            raise ConfigError(f"dataset.root {root} is a file, not a folder")
