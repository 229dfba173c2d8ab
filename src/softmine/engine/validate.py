"""Config checks that run before anything heavy (data loading, model building, downloads).

Each failure is one :class:`ConfigError` sentence naming the key, the bad value
and the fix.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from softmine.engine.evaluator import eval_protocol, reid_variants
from softmine.engine.logger import check_loggers
from softmine.engine.precision import PRECISIONS
from softmine.engine.setup import SHARING_STRATEGIES, resolve_device
from softmine.engine.time_estimate import time_estimate_mode
from softmine.errors import ConfigError
from softmine.evaluation.reid import AP_TYPES
from softmine.evaluation.rerank import EXPANSIONS
from softmine.losses.osm_caa import check_loss_hparams

EVERY, FINAL, NEVER = "every", "final", "never"  # when the test split is scored (evaluation.test)
TEST_MODES = {True: EVERY, "final": FINAL, False: NEVER}


def test_mode(cfg: DictConfig) -> str:
    """``evaluation.test`` as one of :data:`EVERY` (``true``, the default), :data:`FINAL`, :data:`NEVER`."""
    value = cfg.evaluation.get("test", True)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    if not (isinstance(value, bool) or value == "final"):
        raise ConfigError(
            f"evaluation.test must be true (score the test split at every evaluation), final "
            f"(at the final one only) or false (never: tuning on held-out classes), got {value!r}"
        )
    return TEST_MODES[value]


ON_NONFINITE = ("stop", "skip")


def _node(cfg: DictConfig, key: str) -> object:
    node: object = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return None
        node = node[part]
    return node


def _num(cfg: DictConfig, key: str) -> float | None:
    """The number at ``key`` (None when absent or null); a non-number is a :class:`ConfigError`."""
    node = _node(cfg, key)
    if node is None:
        return None
    if isinstance(node, bool) or not isinstance(node, int | float):
        raise ConfigError(f"{key} must be a number (got {node!r})")
    return float(node)


def _int(cfg: DictConfig, key: str, low: int, what: str = "") -> int | None:
    """The whole number at ``key`` (None when absent or null), at least ``low``."""
    value = _num(cfg, key)
    if value is None:
        return None
    if value != int(value) or value < low:
        raise ConfigError(f"{key} must be {what or f'a whole number >= {low}'} (got {value:g})")
    return int(value)


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


def _check_seed(cfg: DictConfig) -> None:
    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be a whole number (got {seed!r}); e.g. seed=3")


def _check_lr(cfg: DictConfig) -> None:
    lr = _num(cfg, "optimizer.lr")
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"optimizer.lr must be a finite number > 0 (got {lr:g})")


def _check_optimizer(cfg: DictConfig) -> None:
    """The hyperparameters torch's optimizers check only when built (with a traceback)."""
    for key in ("weight_decay", "momentum", "dampening", "eps"):
        value = _num(cfg, f"optimizer.{key}")
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"optimizer.{key} must be a finite number >= 0 (got {value:g})")
    betas = _node(cfg, "optimizer.betas")
    if betas is not None:
        values = list(betas) if isinstance(betas, ListConfig) else []
        if len(values) != 2 or not all(
            isinstance(b, int | float) and not isinstance(b, bool) and 0 <= b < 1 for b in values
        ):
            raise ConfigError(
                f"optimizer.betas must be two numbers in [0, 1), e.g. [0.9, 0.999] (got {_shown(betas)})"
            )
    if _node(cfg, "optimizer.nesterov") is True and not (
        (_num(cfg, "optimizer.momentum") or 0) > 0 and not _num(cfg, "optimizer.dampening")
    ):
        raise ConfigError(
            "optimizer.nesterov=true needs optimizer.momentum > 0 and no dampening; "
            "set optimizer.momentum=0.9, say, or optimizer.nesterov=false"
        )


def _shown(node: object) -> object:
    """A config value as the user wrote it (a list, not a ListConfig)."""
    if isinstance(node, DictConfig | ListConfig):
        return OmegaConf.to_container(node)
    return repr(node)


def _whole_numbers(cfg: DictConfig, key: str, example: str) -> None:
    """``key`` must be a non-empty list of whole numbers >= 1."""
    node = _node(cfg, key)
    values = list(node) if isinstance(node, ListConfig) else []
    if not values or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values
    ):
        raise ConfigError(
            f"{key} must be a list of whole numbers >= 1, e.g. {key}={example} (got {_shown(node)})"
        )


def _check_rerank(cfg: DictConfig) -> None:
    """``evaluation.rerank_k1`` >= 1, ``rerank_k2`` in 1..k1+1, ``rerank_lambda`` in [0, 1],
    ``rerank_expansion`` one of :data:`~softmine.evaluation.rerank.EXPANSIONS`."""
    for key in ("rerank_k1", "rerank_k2", "rerank_lambda"):
        if key in cfg.evaluation and cfg.evaluation[key] is None:
            raise ConfigError(f"evaluation.{key} must be a number (got null)")
    k1 = _int(cfg, "evaluation.rerank_k1", 1)
    k2 = _int(cfg, "evaluation.rerank_k2", 1)
    if k1 is not None and k2 is not None and k2 > k1 + 1:
        raise ConfigError(
            f"evaluation.rerank_k2 must be at most evaluation.rerank_k1 + 1 = {k1 + 1} (got {k2}); "
            "it averages over the k2 nearest of the k1 neighbours"
        )
    lam = _num(cfg, "evaluation.rerank_lambda")
    if lam is not None and not 0.0 <= lam <= 1.0:
        raise ConfigError(f"evaluation.rerank_lambda must be a number in [0, 1] (got {lam:g})")
    expansion = cfg.evaluation.get("rerank_expansion", "zhong")
    if expansion not in EXPANSIONS:
        raise ConfigError(
            f"evaluation.rerank_expansion must be one of {', '.join(EXPANSIONS)} (got {expansion!r})"
        )


def _check_evaluation(cfg: DictConfig) -> None:
    """Every ``evaluation.*`` value, so that a bad one fails now and not after training."""
    if not isinstance(_node(cfg, "evaluation"), DictConfig):
        return
    _whole_numbers(cfg, "evaluation.ks", "[1,2,4,8]")
    _whole_numbers(cfg, "evaluation.ranks", "[1,5,10,20]")
    ap = _node(cfg, "evaluation.ap")
    if ap not in AP_TYPES:
        raise ConfigError(f"evaluation.ap must be one of {AP_TYPES} (got {_shown(ap)})")
    if not isinstance(_node(cfg, "evaluation.rerank"), bool):
        raise ConfigError(
            f"evaluation.rerank must be true or false (got {_shown(_node(cfg, 'evaluation.rerank'))})"
        )
    _check_rerank(cfg)
    if _node(cfg, "evaluation.frame_batch_size") is None:
        raise ConfigError("evaluation.frame_batch_size must be a whole number >= 1 (got null)")
    _int(cfg, "evaluation.frame_batch_size", 1)
    variants = _node(cfg, "evaluation.reid_variants")
    if variants is not None and not isinstance(variants, DictConfig):
        raise ConfigError(
            "evaluation.reid_variants must be a mapping name -> {junk_pids, distractor_pids, ap} "
            f"(got {_shown(variants)})"
        )
    if variants and "dataset" in cfg:
        for name, opts in reid_variants(cfg, eval_protocol(cfg.dataset)).items():
            if opts["ap"] not in AP_TYPES:
                raise ConfigError(
                    f"evaluation.reid_variants.{name}.ap must be one of {AP_TYPES} "
                    f"(got {opts['ap']!r})"
                )


def _check_resume_override(cfg: DictConfig) -> None:
    keys = cfg.get("resume_override")
    keys = [keys] if isinstance(keys, str) else list(keys or [])
    for key in keys:
        if OmegaConf.select(cfg, str(key), default=_ABSENT) is _ABSENT:
            raise ConfigError(
                f"resume_override names {key!r}, which is not a key of this config; give keys "
                "as in resume_override=[trainer.epochs,optimizer.lr]"
            )


_ABSENT = object()


def _check_test_mode(cfg: DictConfig) -> None:
    """``evaluation.test`` other than ``true`` needs held-out classes, and no baselines."""
    mode = test_mode(cfg)
    if mode == EVERY:
        return
    shown = f"evaluation.test={str(cfg.evaluation.test).lower()}"
    d = cfg.get("dataset") or {}
    if not (int(d.get("val_classes") or 0) or int(d.get("folds") or 0)):
        raise ConfigError(
            f"{shown} keeps the test split out of the evaluations during training, so they "
            "score held-out training classes instead: set dataset.val_classes=N or dataset.folds=K"
        )
    if cfg.trainer.get("baselines"):
        raise ConfigError(
            f"trainer.baselines scores raw pixels and the untrained network on the test split, "
            f"which {shown} keeps for the end or never reads; set trainer.baselines=false"
        )


def _check_tuned(cfg: DictConfig) -> None:
    """experiment=fair: the loss's tuned setting on this data set must exist."""
    if "tuned" in cfg.keys() and OmegaConf.is_missing(cfg, "tuned"):  # `in` skips ??? values
        from hydra.core.hydra_config import HydraConfig

        dataset = str(cfg.dataset.get("name") or "<dataset>")
        loss = HydraConfig.get().runtime.choices.get("loss") if HydraConfig.initialized() else None
        loss = loss or "<loss>"
        raise ConfigError(
            f"experiment=fair trains loss={loss} with its tuned setting on dataset={dataset}, "
            f"and there is none (configs/tuned/{dataset}/{loss}.yaml); run "
            f"`make tune DATASET={dataset} LOSS={loss}` first (docs/fair-benchmark.md)"
        )


def validate_config(cfg: DictConfig, run_dir: Path | None = None) -> None:
    """Check the values that would otherwise fail late, silently, or with a traceback."""
    _check_seed(cfg)
    _check_test_mode(cfg)
    _check_tuned(cfg)
    check_loss_hparams(*(_num(cfg, f"loss.{k}") for k in ("margin", "sigma", "lam")))
    if _num(cfg, "backbone.embedding_dim") is None:
        raise ConfigError("backbone.embedding_dim must be a positive integer (got null)")
    _int(cfg, "backbone.embedding_dim", 1, "a positive integer")
    for key in ("sampler.classes_per_batch", "sampler.samples_per_class"):
        if _node(cfg, key) != "auto":  # auto: fitted to the training labels (sampler=pk_auto)
            _int(cfg, key, 1, "a positive integer or auto")
    _check_lr(cfg)
    _check_optimizer(cfg)
    _check_evaluation(cfg)
    _check_resume_override(cfg)
    t = cfg.trainer
    _int(cfg, "trainer.epochs", 1, "a whole number >= 1")
    _int(cfg, "trainer.max_iters", 1, "a whole number >= 1 or null")
    _int(cfg, "trainer.eval_every", 0)
    _int(cfg, "trainer.log_every", 0)
    _int(cfg, "trainer.interrupt_every", 1, "a whole number >= 1")
    interval = _num(cfg, "trainer.progress_interval")
    if interval is not None and not interval >= 0:
        raise ConfigError(
            f"trainer.progress_interval must be a number of seconds >= 0 (got {interval:g})"
        )
    _int(cfg, "trainer.eval_batch_size", 1)
    clip = _num(cfg, "trainer.grad_clip")
    if clip is not None and not clip > 0:
        raise ConfigError(f"trainer.grad_clip must be > 0 or null (got {clip:g})")
    if str(t.get("precision", "32")) not in PRECISIONS:
        raise ConfigError(
            f"trainer.precision must be one of {tuple(PRECISIONS)} (got {t.precision!r})"
        )
    if str(t.get("on_nonfinite", "stop")) not in ON_NONFINITE:
        raise ConfigError(
            f"trainer.on_nonfinite must be one of {ON_NONFINITE} (got {t.on_nonfinite!r})"
        )
    strategy = str(t.get("sharing_strategy", "file_descriptor"))
    if strategy not in SHARING_STRATEGIES:
        raise ConfigError(
            f"trainer.sharing_strategy must be one of {SHARING_STRATEGIES} (got {strategy!r})"
        )
    _int(cfg, "trainer.checkpoint_every", 0)
    plots = t.get("plots", True)
    if not isinstance(plots, bool) and plots != "all":
        raise ConfigError(f"trainer.plots must be true, false or all (got {_shown(plots)})")
    if not isinstance(t.get("tf32", True), bool):
        raise ConfigError(f"trainer.tf32 must be true or false (got {_shown(t.get('tf32'))})")
    if str(t.get("num_threads", "auto")) != "auto":
        _int(cfg, "trainer.num_threads", 1, "auto or a whole number >= 1")
    resolve_device(t.device, warn=False)
    time_estimate_mode(t)
    check_loggers(t.get("loggers", ["csv"]))
    if run_dir is not None:
        check_writable(Path(run_dir))
    if "dataset" in cfg and cfg.dataset.get("root"):
        root = Path(os.path.expanduser(str(cfg.dataset.root)))
        if root.exists() and not root.is_dir():
            raise ConfigError(f"dataset.root {root} is a file, not a folder")
