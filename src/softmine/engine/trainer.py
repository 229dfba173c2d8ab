"""The training loop: P x K batches -> embedding net -> loss -> optimizer, then evaluation.

Everything is built from the Hydra config with ``_target_`` instantiation; the
trainer wires the pieces together, logs, evaluates, checkpoints and resumes.

Training length: ``trainer.epochs`` passes over the sampler's batches, or, when
``trainer.max_iters`` is set, exactly that many iterations (epochs then only
mark where the sampler reshuffles and where ``trainer.eval_every`` counts).
Either way one DataLoader iterator serves the whole run
(:class:`~softmine.data.run_batches.RunBatchSampler`); the loop finds the epoch
boundaries by counting each epoch's batches.
"""

from __future__ import annotations

import errno
import json
import logging
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from softmine.config import build
from softmine.data.file_check import read_listing, write_listing
from softmine.data.run_batches import RunBatchSampler, SeededItems
from softmine.data.splits import build_train_and_validation
from softmine.engine.checkpoint import (
    BEST,
    LAST,
    capture_rng_state,
    load_checkpoint,
    load_state_checked,
    reapply_optimizer_settings,
    require_finite_state,
    restore_rng_state,
    save_atomic,
)
from softmine.engine.distributed import DistEnv, any_rank, barrier, broadcast_buffers
from softmine.engine.embedding import raw_inputs, to_model_input
from softmine.engine.eval_history import resolve_monitor, selection_summary, write_eval_log
from softmine.engine.evaluator import Evaluator, eval_protocol
from softmine.engine.logger import RunLogger
from softmine.engine.nonfinite import LOSS, StepGuard, WeightWatch
from softmine.engine.objective import Objective, build_loss
from softmine.engine.optim import build_optimizer
from softmine.engine.precision import PRECISIONS
from softmine.engine.setup import (
    check_shared_memory,
    configure_backends,
    describe_device,
    rank_seed,
    resolve_device,
    resolve_num_workers,
    seed_everything,
    set_cpu_threads,
    set_sharing_strategy,
)
from softmine.engine.step_stats import EPOCH, INTERVAL, StepStats
from softmine.engine.sync_bn import convert_sync_batchnorm
from softmine.engine.validate import EVERY, FINAL, NEVER, test_mode, validate_config
from softmine.errors import (
    ConfigError,
    DataError,
    Interrupted,
    StorageError,
    TrainingError,
)
from softmine.evaluation import retrieval_metrics
from softmine.evaluation.knn import NonFiniteEmbeddings
from softmine.reporting.artifacts import write_run_artifacts
from softmine.reporting.crossval import save_fold_embeddings
from softmine.runs.atomic import remove_partial
from softmine.runs.layout import RUN_FILES
from softmine.runs.metrics_file import STEP_KEY, format_table, write_metrics
from softmine.runs.signals import GracefulInterrupt, ignore_interrupts

log = logging.getLogger(__name__)

TRAIN_LOG_FILE = RUN_FILES.train_log.name
EVAL_LOG_FILE = RUN_FILES.eval_log.name
METRICS_FILE = RUN_FILES.metrics.name
CHECKPOINT_DIR = RUN_FILES.checkpoints.name
BAD_IMAGES_FILE = RUN_FILES.bad_images.name
#: errno values of a failed write (full disk, quota, read-only filesystem, file size limit).
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


@dataclass
class TrainState:
    """Where the run is: enough, with the RNG states, to resume it exactly."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # current epoch (0-based)
    batch: int = 0  # batches of the current epoch already consumed
    sums: dict[str, float] = field(
        default_factory=dict
    )  # running sums of this epoch's logged values
    batches_in_epoch: int = 0
    interval_sums: dict[str, float] = field(
        default_factory=dict
    )  # running sums since the last trainer.log_every row
    interval_steps: int = 0  # applied steps in interval_sums
    skipped_steps: int = 0  # steps skipped for non-finite values (on_nonfinite=skip)
    best: float | None = None  # best monitored metric so far
    metrics: dict[str, float] = field(default_factory=dict)  # latest evaluation
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)
    finished: bool = False
    log_rows: int = 0  # rows in train_log.csv when this state was saved
    evals: list[dict[str, float]] = field(default_factory=list)  # every evaluation (eval_log.csv)
    last_eval_step: int = -1  # step of the latest evaluation


def run_time_sizes(
    node: DictConfig,
    num_classes: int,
    embedding_dim: int,
    feature_dims: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Fill the sizes a loss or backbone config leaves open (``null``): ``num_classes``,
    ``embedding_dim``, and ``feature_dims`` (the sizes of the model's named features)."""
    extra: dict[str, Any] = {}
    if "num_classes" in node and node.get("num_classes") is None:
        extra["num_classes"] = num_classes
    if "embedding_dim" in node and node.get("embedding_dim") is None:
        extra["embedding_dim"] = embedding_dim
    if "feature_dims" in node and node.get("feature_dims") is None and feature_dims is not None:
        extra["feature_dims"] = dict(feature_dims)
    return extra


def _check_train_labels(labels: np.ndarray) -> int:
    """Training labels must be 0..C-1 (the classifier's rows); returns C."""
    classes = np.unique(labels)
    if len(classes) == 0:
        raise ConfigError("the training set is empty; check dataset.root and the split")
    if classes.min() != 0 or classes.max() != len(classes) - 1:
        raise ConfigError(
            "training labels must be contiguous 0..C-1 "
            f"(got {len(classes)} classes from {classes.min()} to {classes.max()}); "
            "the dataset class must remap them"
        )
    return len(classes)


def _pair_weight_means(weights: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean mining weight over positive and negative pairs (0 where a batch has none), on the device."""
    same = labels[:, None] == labels[None, :]
    off = ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    w = weights.detach()
    out = {}
    for name, mask in (("osm_weight_pos", same & off), ("osm_weight_neg", ~same)):
        n = mask.sum()
        out[name] = torch.where(n > 0, torch.where(mask, w, 0).sum() / n.clamp(min=1), 0.0)
    return out


def step_values(loss: torch.Tensor, details: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The values logged for a step, as 0-d device tensors (reading them is left to the caller)."""
    values = {"loss": loss.detach()}
    values.update(
        {k: v.detach() for k, v in details.items() if torch.is_tensor(v) and v.dim() == 0}
    )
    if "attention" in details:
        a = details["attention"].detach().float()
        values["attention"] = a.mean()
        values["attention_std"] = a.std() if a.numel() > 1 else torch.zeros((), device=a.device)
    if "weights" in details:
        values.update(_pair_weight_means(details["weights"], details["labels"]))
    return values


class Trainer:
    """Builds model, loss, optimizer, data and sampler from ``cfg`` and trains in ``run_dir``."""

    def __init__(self, cfg: DictConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        validate_config(cfg, self.run_dir)
        tcfg = cfg.trainer
        self.dist = DistEnv.current()
        self.device = resolve_device(tcfg.device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        seed_everything(int(cfg.seed), bool(tcfg.deterministic))
        configure_backends(bool(tcfg.deterministic), bool(tcfg.get("tf32", True)))
        set_cpu_threads(tcfg.get("num_threads", "auto"))
        if self.dist.is_main:
            log.info("training on %s", describe_device(self.device))
        self.ckpt_dir = self.run_dir / CHECKPOINT_DIR
        self._check_run_folder()

        # dataset.val_classes / dataset.folds: held-out classes leave the training set
        self.train_set, validation = build_train_and_validation(
            cfg.dataset, reid=eval_protocol(cfg.dataset) == "reid"
        )
        self.test_mode = test_mode(cfg)  # evaluation.test: every evaluation, the final one, never
        self.evaluator = Evaluator(
            cfg, self.device, dist=self.dist, validation=validation, test=self.test_mode != NEVER
        )
        # every split's image files, before any training: all the unreadable ones at once
        self.evaluator.check_files(
            self.train_set, self.run_dir / BAD_IMAGES_FILE, write=self.dist.is_main
        )
        labels = np.asarray(self.train_set.labels)
        self.num_classes = _check_train_labels(labels)
        self.monitor = resolve_monitor(
            str(tcfg.monitor), self.evaluator.metric_names(test=self.test_mode == EVERY)
        )

        emb_dim = int(cfg.backbone.embedding_dim)
        self.model = build(
            cfg.backbone, "backbone", **run_time_sizes(cfg.backbone, self.num_classes, emb_dim)
        ).to(self.device)
        self.channels_last = bool(tcfg.channels_last) and self.device.type == "cuda"
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        sizes = run_time_sizes(
            cfg.loss, self.num_classes, emb_dim, getattr(self.model, "feature_dims", None)
        )
        self.loss_fn = build_loss(cfg.loss, self.model, **sizes).to(self.device)
        if self.dist.enabled:  # own augmentation/dropout streams per rank (rank 0 keeps the seed)
            torch.manual_seed(rank_seed(int(cfg.seed), self.dist.rank))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.params += [p for p in self.loss_fn.parameters() if p.requires_grad]
        named = [(f"model.{n}", p) for n, p in self.model.named_parameters()]
        named += [(f"loss.{n}", p) for n, p in self.loss_fn.named_parameters()]
        self.optimizer = build_optimizer(cfg.optimizer, named)

        shard_args = (
            {"rank": self.dist.rank, "world_size": self.dist.world_size}
            if self.dist.enabled
            else {}
        )
        self.sampler = build(
            cfg.sampler,
            "sampler",
            labels=labels,
            seed=int(cfg.seed),
            class_names=getattr(self.train_set, "class_names", None),
            **shard_args,
        )
        self.batches_per_epoch = len(self.sampler)
        if self.batches_per_epoch == 0:
            raise ConfigError(
                "the sampler produces no batch: the training set is too small for "
                f"P={self.sampler.P} x K={self.sampler.K}; lower sampler.classes_per_batch or "
                "samples_per_class"
            )
        self.total_steps = (
            int(tcfg.max_iters)
            if tcfg.max_iters is not None
            else int(tcfg.epochs) * self.batches_per_epoch
        )
        self.scheduler = build(cfg.scheduler, "scheduler")(self.optimizer, self.total_steps)
        if hasattr(self.train_set, "bad_image_log"):
            self.train_set.bad_image_log = str(self.run_dir / BAD_IMAGES_FILE)
        self.num_workers = resolve_num_workers(tcfg.num_workers, self.train_set)
        self.evaluator.num_workers = self.num_workers
        set_sharing_strategy(tcfg.get("sharing_strategy", "file_descriptor"))
        node = OmegaConf.select(cfg, "dataset.transform.device_transform")
        self.device_transform = (
            None if node is None else build(node, "dataset.transform.device_transform")
        )
        # one loader iterator for the whole run; items seeded unless drawn in-process from memory
        seed_items = self.num_workers > 0 or not getattr(self.train_set, "in_memory", False)
        self.run_batches = RunBatchSampler(
            self.sampler,
            seed=int(cfg.seed),
            rank=self.dist.rank,
            seed_items=seed_items,
        )
        self.loader_generator = torch.Generator()
        self.loader = DataLoader(
            SeededItems(self.train_set) if seed_items else self.train_set,
            batch_sampler=self.run_batches,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=self.loader_generator,
            collate_fn=getattr(self.device_transform, "collate", None),
            worker_init_fn=ignore_interrupts,
        )
        check_shared_memory(self.num_workers, self._loaders_in_flight())
        precision = str(tcfg.precision)
        autocast_dtype = PRECISIONS.get(precision)
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=precision == "fp16" and self.device.type == "cuda"
        )
        if tcfg.sync_bn:  # BatchNorm statistics of the global batch (no-op in one process)
            self.model = convert_sync_batchnorm(self.model, self.device)
        self.objective: torch.nn.Module = Objective(self.model, self.loss_fn, autocast_dtype)
        if self.dist.enabled:
            self.objective = DistributedDataParallel(
                self.objective,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
            )
        if tcfg.get("compile", False):  # model + loss as one graph; the first steps compile it
            self.objective = torch.compile(self.objective)
        self.state = TrainState()
        self._start_run_batches()
        self.weights = WeightWatch([self.model, self.loss_fn])
        self.guard = StepGuard(self.device)
        self.stats = StepStats(self.device)
        self.saved_step: int | None = None  # step of checkpoints/last.pt on disk, when known
        self._restored = False  # resume=true: the checkpoint is loaded (restore())
        self.test_embeddings: tuple[int, np.ndarray, np.ndarray] | None = None
        self.logger = RunLogger.from_config(
            self.run_dir, TRAIN_LOG_FILE, cfg, enabled=self.dist.is_main
        )

    def _loaders_in_flight(self) -> list[tuple[Any, int]]:
        """(dataset, batch size) of the loaders whose worker batches sit in shared memory."""
        batches = [(self.train_set, self.sampler.P * self.sampler.K)]
        if self.evaluator.protocol == "retrieval" and self.evaluator.has_test:
            batches.append((self.evaluator.test_set, int(self.cfg.trainer.eval_batch_size)))
        return batches

    # ---------------------------------------------------------------- run folder / resume
    def _check_run_folder(self) -> None:
        """Never overwrite a finished (or resumable) run unless asked to resume it."""
        if self.cfg.resume:
            return
        taken = [p for p in (self.run_dir / METRICS_FILE, self.ckpt_dir / LAST) if p.exists()]
        if taken:
            raise ConfigError(
                f"the run folder {self.run_dir} already holds a run ({taken[0].name}); "
                "continue it with resume=true, or pick a new folder with hydra.run.dir=..."
            )

    def _state_dict(self) -> dict[str, Any]:
        s = self.state
        s.log_rows = len(self.logger)
        s.sums, s.batches_in_epoch = self.stats.sums_of(EPOCH), self.stats.steps(EPOCH)
        s.interval_sums, s.interval_steps = self.stats.sums_of(INTERVAL), self.stats.steps(INTERVAL)
        return {
            "format": 1,
            "num_classes": self.num_classes,
            "model": self.model.state_dict(),
            "loss": self.loss_fn.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "train_state": asdict(self.state),
            "rng": capture_rng_state(),
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }

    def save_checkpoint(self, name: str = LAST) -> Path:
        """Write a checkpoint atomically into ``checkpoints/`` (rank 0 only under torch.distributed).

        Only finite weights are ever saved: the weight check runs first.
        """
        self.check_weights()
        path = self.ckpt_dir / name
        if self.dist.is_main:
            save_atomic(self._state_dict(), path)
            if name == LAST:
                self.saved_step = self.state.step
        return path

    def load_checkpoint(self, path: Path) -> None:
        """Restore everything :meth:`save_checkpoint` wrote, checking it fits this config."""
        ckpt = load_checkpoint(path)
        missing = {"model", "loss", "optimizer", "train_state", "rng"} - set(ckpt)
        if missing:
            raise ConfigError(
                f"{path} is not a softmine training checkpoint (lacks {sorted(missing)})"
            )
        names = {id(p): f"model.{n}" for n, p in self.model.named_parameters()}
        names |= {id(p): f"loss.{n}" for n, p in self.loss_fn.named_parameters()}
        require_finite_state(path, ckpt, self.optimizer, names)
        load_state_checked(self.model, ckpt["model"], "model", path)
        load_state_checked(self.loss_fn, ckpt["loss"], "loss (class vectors / classifier)", path)
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as e:
            raise ConfigError(
                f"checkpoint {path} holds optimizer state for other parameters ({e}); "
                "resume with the config it was trained with"
            ) from None
        # the schedule's shape follows this run's config (a resume may extend trainer.epochs)
        lambdas = getattr(self.scheduler, "lr_lambdas", [])
        fresh = [dict(vars(fn)) if hasattr(fn, "__dict__") else None for fn in lambdas]
        self.scheduler.load_state_dict(ckpt["scheduler"])
        for fn, attrs in zip(lambdas, fresh, strict=True):
            if attrs is not None:
                vars(fn).update(attrs)
        recorded = (ckpt.get("config") or {}).get("optimizer") or {}
        current = OmegaConf.to_container(self.cfg.optimizer, resolve=True)
        for key in reapply_optimizer_settings(self.optimizer, self.scheduler, recorded, current):
            log.info("%s changed on resume: now %s", key, self.cfg.optimizer[key.split(".")[1]])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.state = TrainState(**ckpt["train_state"])
        self.stats.load(EPOCH, self.state.sums, self.state.batches_in_epoch)
        self.stats.load(INTERVAL, self.state.interval_sums, self.state.interval_steps)
        restore_rng_state(ckpt["rng"])
        if self.dist.rank > 0:  # the checkpoint holds rank 0's streams: give this rank its own
            torch.manual_seed(rank_seed(int(self.cfg.seed), self.dist.rank, self.state.step))
        self.logger.truncate(self.state.log_rows)
        self.saved_step = self.state.step

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, model: torch.nn.Module | None = None) -> dict[str, float]:
        """Metrics of ``model`` (default: the trained one): retrieval on ``test``, or re-ID.

        ``evaluation.test`` says when the trained network meets the test split: at every
        evaluation (``true``), at the final one only (``final``), or never (``false``: the
        validation split alone, for tuning).

        Under torch.distributed every rank first takes rank 0's BatchNorm statistics,
        so all ranks embed with the network rank 0 saves. The test embeddings of the
        trained network are kept (``test_embeddings``, with the step) for the plots.
        """
        if model is None:
            broadcast_buffers(self.model)
            broadcast_buffers(self.loss_fn)
        test = self.test_mode == EVERY or (self.test_mode == FINAL and self._done())
        try:
            metrics = self.evaluator.evaluate(model or self.model, test=test or model is not None)
        except NonFiniteEmbeddings:
            raise TrainingError(
                f"the test embeddings are not finite at step {self.state.step} (the weights are "
                f"finite but too large: the learning rate {self.cfg.optimizer.get('lr')} is "
                f"probably too high); {self._kept()}"
            ) from None
        if model is None and self.evaluator.embeddings is not None:
            self.test_embeddings = (self.state.step, *self.evaluator.embeddings)
        return metrics

    def baselines(self) -> dict[str, dict[str, float]]:
        """Metrics of raw inputs and of the untrained network on the same test split."""
        if self.evaluator.protocol != "retrieval":
            raise ConfigError("trainer.baselines needs a retrieval test split (a `test` node)")
        x, y = raw_inputs(self.evaluator.test_set)
        return {
            "raw pixels": retrieval_metrics(x, y, self.cfg.evaluation.ks),
            "untrained network": self.evaluate(),
        }

    # ---------------------------------------------------------------- one step
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Forward, backward and optimizer step on one batch; returns the values to log.

        The values stay 0-d device tensors and nothing here waits for the device,
        except with ``trainer.on_nonfinite=skip``: the host must then know whether the
        loss and gradient are finite before it steps (one read per step; {} when skipped).
        With ``stop`` the step's finiteness goes into :attr:`guard`, read by
        :meth:`check_weights`, which names the exact step however late it reads it.
        """
        x = to_model_input(x, self.device, self.device_transform)
        y = y.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        loss, details = self.objective(x, y)
        values = step_values(loss, details)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        clip = self.cfg.trainer.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.params, float(clip) if clip else float("inf"))
        values["grad_norm"] = norm.detach()
        loss_ok = torch.isfinite(values["loss"])
        # fp16's gradient scaler skips a step with Inf gradients itself (and lowers its scale)
        step_ok = loss_ok & (torch.isfinite(norm) | self.scaler.is_enabled())
        if self.cfg.trainer.on_nonfinite == "skip":
            ok, loss_fine, bad_weights = torch.stack(
                [step_ok.long(), loss_ok.long(), self.weights.first_bad]
            ).tolist()
            if bad_weights >= 0:
                self.check_weights()
            if not ok:
                return self._skip("loss" if not loss_fine else "gradient", values)
        else:
            self.guard.record(self.state.step + 1, loss_ok, step_ok, self.stats.vector(values))
        try:
            self.scaler.step(self.optimizer)
        except RuntimeError as e:
            if "overflow" not in str(e):
                raise
            raise TrainingError(  # e.g. Adam's lr / (1 - beta1) beyond float32
                f"the optimizer step {self.state.step + 1} overflowed float32 "
                f"(optimizer.lr={self.cfg.optimizer.get('lr')} is too large); {self._kept()}"
            ) from None
        self.scaler.update()
        self.scheduler.step()
        self.weights.update(self.state.step + 1)
        return values

    def check_weights(self) -> None:
        """Stop at the first step whose loss or gradient (``on_nonfinite=stop``), or whose update
        of the weights, was not finite; the earliest is named (one host sync for all records)."""
        bad_step, kind, bad_weights = torch.stack(
            [*self.guard.flags(), self.weights.first_bad.to(self.device)]
        ).tolist()
        if bad_step >= 0 and (bad_weights < 0 or bad_step <= bad_weights):
            assert self.guard.values is not None
            values = dict(zip(self.stats.names, self.guard.values.tolist(), strict=False))
            self._stop_nonfinite("loss" if kind == LOSS else "gradient", bad_step, values)
        if bad_weights < 0:
            return
        name = self.weights.first_bad_name() or "a parameter or buffer"
        raise TrainingError(
            f"the weights became non-finite at step {bad_weights} ({name}); {self._kept()}. "
            f"{self._lower_lr_hint()}"
            + (
                " (trainer.on_nonfinite=skip cannot undo a step already applied)"
                if self.cfg.trainer.on_nonfinite == "skip"
                else ""
            )
        )

    def _saved_model_hint(self) -> str:
        """After a failed final evaluation: where the trained network is and how to evaluate it."""
        return (
            f"The trained network is saved in {self.ckpt_dir / LAST} (step {self.state.step}): "
            f"once the cause is fixed, finish the run with the same command plus resume=true "
            f"hydra.run.dir={self.run_dir}, or evaluate it with `softmine-eval {self.run_dir}`"
        )

    def _kept(self) -> str:
        """Where the last checkpoint with finite weights is (for stop and write-failure messages)."""
        last = self.ckpt_dir / LAST
        if not last.exists():
            return "no checkpoint was written yet"
        at = f" (step {self.saved_step})" if self.saved_step is not None else ""
        return f"the last checkpoint, with finite weights, is {last}{at}"

    def _lower_lr_hint(self) -> str:
        lr = self.cfg.optimizer.get("lr")
        lower = f"{float(lr) / 10:g}" if lr is not None else "<lower>"
        if not (self.ckpt_dir / LAST).exists():
            return f"Start again with a lower learning rate (e.g. optimizer.lr={lower})"
        return (
            "Lower the learning rate: start again, or continue from that checkpoint with "
            f"resume=true resume_override=[optimizer.lr] optimizer.lr={lower}"
        )

    def _skip(self, what: str, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``on_nonfinite=skip``: drop this step's gradients, count it, say so; {} (nothing to log)."""
        pieces = ", ".join(f"{k}={float(v):.6g}" for k, v in values.items())
        self.optimizer.zero_grad(set_to_none=True)
        self.state.skipped_steps += 1
        log.warning(
            "non-finite %s at step %d (%s); step skipped", what, self.state.step + 1, pieces
        )
        return {}

    def _stop_nonfinite(self, what: str, step: int, values: dict[str, float]) -> None:
        pieces = ", ".join(f"{k}={v:.6g}" for k, v in values.items())
        raise TrainingError(
            f"non-finite {what} at step {step} ({pieces}); {self._kept()}. "
            f"{self._lower_lr_hint()}, or set trainer.on_nonfinite=skip to skip such steps"
        )

    # ---------------------------------------------------------------- the loop
    def _start_run_batches(self) -> None:
        """Point the run's batch sampler at the state's epoch and batch, to the run's end."""
        t, s = self.cfg.trainer, self.state
        if t.max_iters is not None:
            self.run_batches.start_at(s.epoch, s.batch, max_batches=int(t.max_iters) - s.step)
        else:
            self.run_batches.start_at(s.epoch, s.batch, end_epoch=int(t.epochs))

    def _done(self) -> bool:
        t = self.cfg.trainer
        if t.max_iters is not None:
            return self.state.step >= int(t.max_iters)
        return self.state.epoch >= int(t.epochs)

    def _end_epoch(self, clock: EpochClock) -> None:
        """Log the epoch's means and timing, evaluate when due, then move to the next epoch."""
        s, t = self.state, self.cfg.trainer
        self.check_weights()
        row: dict[str, Any] = {"epoch": s.epoch + 1, "step": s.step, **self.stats.means(EPOCH)}
        row["lr"] = self.optimizer.param_groups[0]["lr"]
        row.update(clock.row())
        if self.device.type == "cuda":
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        s.epoch += 1
        s.batch = 0
        self.stats.reset(EPOCH)
        every = int(t.eval_every)
        if self._done() or (every > 0 and s.epoch % every == 0):
            if s.last_eval_step != s.step:
                self._evaluate_now()
            row.update(s.metrics)
        self.logger.log(row)
        shown = "".join(f" {k} {v:.4f}" for k, v in s.metrics.items() if k in row)
        log.info(
            "epoch %d step %d loss %.4f%s", s.epoch, s.step, row.get("loss", float("nan")), shown
        )

    def _eval_due_at_step(self) -> bool:
        """``trainer.eval_every_iters`` > 0: every that many iterations from ``eval_start_iter``."""
        t, step = self.cfg.trainer, self.state.step
        every = int(t.get("eval_every_iters", 0) or 0)
        return every > 0 and step >= int(t.get("eval_start_iter", 0) or 0) and step % every == 0

    def _evaluate_now(self) -> dict[str, float]:
        """Evaluate, record the row in ``eval_log.csv`` and track ``best.pt``; returns the metrics."""
        s = self.state
        self.check_weights()
        final = self._done()
        if final and self.saved_step != s.step:  # the trained network is kept whatever happens next
            try:
                self.save_checkpoint()
            except StorageError as e:  # evaluate all the same: fit() says what was kept
                log.warning("%s; evaluating the trained network all the same", e)
        t0 = time.perf_counter()
        try:
            s.metrics = self.evaluate()
        except (ConfigError, DataError, TrainingError) as e:
            if not final:
                raise
            raise type(e)(f"{e}. {self._saved_model_hint()}") from e
        seconds = time.perf_counter() - t0
        s.last_eval_step = s.step
        s.evals.append({"iteration": s.step, "epoch": s.epoch, **s.metrics, "eval_s": seconds})
        if self.dist.is_main:
            write_eval_log(self.run_dir / EVAL_LOG_FILE, s.evals)
        shown = " ".join(f"{k} {v:.4f}" for k, v in s.metrics.items())
        log.info("evaluation at iteration %d (%.1f s): %s", s.step, seconds, shown)
        self._track_best()
        return s.metrics

    def final_metrics(self) -> dict[str, float]:
        """What ``metrics.json`` holds: the final metrics, plus the test-chosen snapshot's
        (``best_test/*``), with a validation split the validation-chosen one's (``selected/*``),
        and the step the final metrics belong to (``iteration``, the step of ``last.pt``)."""
        return {
            **self.state.metrics,
            **selection_summary(self.state.evals, self.monitor),
            STEP_KEY: self.state.last_eval_step,
            **self.evaluator.dropped_counts(),  # dropped_items/*: unreadable, left out
        }

    def _track_best(self) -> None:
        t = self.cfg.trainer
        if not t.save_best:
            return
        value = self.state.metrics.get(self.monitor)
        if value is None:
            raise ConfigError(
                f"trainer.monitor={t.monitor!r} is not among the metrics {sorted(self.state.metrics)}"
            )
        if self.state.best is None or value > self.state.best:
            self.state.best = value
            self.save_checkpoint(BEST)

    def fit(self) -> dict[str, float]:
        """Train (resuming if asked), evaluate, write metrics.json; returns what metrics.json holds.

        A file that cannot be written (a full disk) stops the run with one
        :class:`StorageError` that says what was kept where.
        """
        try:
            return self._fit()
        except KeyboardInterrupt:  # a second Ctrl-C: stop now, the last checkpoint stays valid
            raise Interrupted(
                f"aborted at step {self.state.step} by an interrupt; {self._kept()}. "
                f"Resume with the same command plus: resume=true hydra.run.dir={self.run_dir}",
                signal.SIGINT,
            ) from None
        except StorageError as e:
            raise StorageError(f"{e}; {self._kept_files()}", errno=e.errno) from e
        except OSError as e:
            if e.errno not in WRITE_ERRNOS:
                raise
            where = f" {e.filename}" if e.filename else f" into {self.run_dir}"
            raise StorageError(
                f"cannot write{where} ({e.strerror}); {self._kept_files()}", errno=e.errno
            ) from e

    def _kept_files(self) -> str:
        """What a failed write left, and where (the results first)."""
        metrics, last = self.run_dir / METRICS_FILE, self.ckpt_dir / LAST
        if self.state.finished and metrics.exists():
            older = (
                f" ({last} still holds step {self.saved_step})"
                if last.exists() and self.saved_step is not None
                else ""
            )
            return (
                f"the results are safe in {metrics}, but the final weights were not saved{older}; "
                "free space and run the same command with resume=true to write them"
            )
        return (
            f"training stopped at step {self.state.step}; {self._kept()}; free space and "
            "continue with resume=true"
        )

    def restore(self) -> None:
        """With ``resume=true``, load ``checkpoints/last.pt`` (once; :meth:`fit` calls it too).

        Called before the run's record is touched, so a damaged or foreign checkpoint is
        refused by a command that has written nothing.
        """
        if self._restored or not self.cfg.resume:
            return
        last = self.ckpt_dir / LAST
        if last.exists():
            self.load_checkpoint(last)
        self._restored = True

    def _fit(self) -> dict[str, float]:
        t = self.cfg.trainer
        last = self.ckpt_dir / LAST
        if self.dist.is_main:  # temporary files a killed writer left behind
            remove_partial(self.ckpt_dir)
            remove_partial(self.run_dir)
        if self.cfg.resume and last.exists():
            self.restore()
            log.info(
                "resumed from %s at step %d (epoch %d)", last, self.state.step, self.state.epoch + 1
            )
            if self.state.finished and self._done() and (self.run_dir / METRICS_FILE).exists():
                log.info("this run had already finished; its metrics are unchanged")
                return json.loads((self.run_dir / METRICS_FILE).read_text())
            if self.state.finished:  # extended (resume_override=[trainer.epochs]): train on
                self.state.finished, self.state.metrics = False, {}
        elif self.cfg.resume:
            log.info(
                "resume=true but no checkpoint in %s yet: starting from scratch", self.ckpt_dir
            )
            self.logger.truncate(0)
        if t.baselines and not self.state.baselines:
            self.state.baselines = self.baselines()

        every, log_every = int(t.checkpoint_every), int(t.log_every)
        check_every = int(t.get("interrupt_every", 10))
        steps_here = 0  # steps of this process (a stop requested before the loop: after the first)
        with GracefulInterrupt() as interrupt, self._progress_bar() as bar:
            s = self.state
            self._start_run_batches()
            seed = rank_seed(int(self.cfg.seed), self.dist.rank)  # workers differ per rank
            self.loader_generator.manual_seed(seed * 1_000_003 + s.epoch)
            batches = iter(self.loader)  # the run's batches: epoch boundaries found by counting
            while not self._done():
                bar.set_description(f"epoch {s.epoch + 1}", refresh=False)
                clock = EpochClock()
                left = len(self.sampler.rank_batches(s.epoch)) - s.batch
                for x, y in clock.wrap(batches, left):
                    values = self.train_step(x, y)
                    s.step += 1
                    s.batch += 1
                    steps_here += 1
                    clock.images += len(y)
                    bar.update()
                    if values:
                        self.stats.add(values)
                    if log_every > 0 and s.step % log_every == 0 and self.stats.steps(INTERVAL):
                        self._log_interval()
                    if self._eval_due_at_step():
                        self._evaluate_now()
                    if self._done():
                        break
                    if every > 0 and s.step % every == 0:
                        self.save_checkpoint()
                    if steps_here == 1 or s.step % check_every == 0:
                        self.check_weights()
                        self._show_progress(bar, clock)
                        if any_rank(interrupt.requested, self.device):
                            self._stop_interrupted(interrupt.signum or signal.SIGINT)
                self._end_epoch(clock)
                if any_rank(interrupt.requested, self.device) and not self._done():
                    self._stop_interrupted(interrupt.signum or signal.SIGINT)
            del batches  # its workers stop now, before the final evaluation

        self.check_weights()
        if self.state.last_eval_step != self.state.step:
            self._evaluate_now()
        self.state.finished = True
        if self.dist.is_main:  # the result, naming the step of the checkpoint saved before it
            write_metrics(self.run_dir, self.final_metrics())
        self.save_checkpoint()  # again: the finished state and the final evaluation's row
        if self.dist.is_main:
            write_run_artifacts(self)  # plots; attention.csv + attention_auc under label noise
        save_fold_embeddings(self)  # dataset.folds: test_embeddings.npz for softmine-report
        barrier()
        self._report_bad_images()
        if self.state.baselines and self.dist.is_main:
            print(format_table({**self.state.baselines, "trained embedding": self.state.metrics}))
        self.logger.close()
        return self.final_metrics()

    def _log_interval(self) -> None:
        """A ``trainer.log_every`` row: the means over the applied steps since the previous row."""
        self.check_weights()
        s = self.state
        self.logger.log({"epoch": s.epoch + 1, "step": s.step, **self.stats.means(INTERVAL)})
        self.stats.reset(INTERVAL)

    def _progress_bar(self) -> tqdm:
        """One bar for the run; off a terminal it writes at most every ``trainer.progress_interval`` s."""
        t = self.cfg.trainer
        every = 0.1 if sys.stderr.isatty() else float(t.get("progress_interval", 30))
        return tqdm(
            total=self.total_steps,
            initial=self.state.step,
            leave=False,
            disable=not t.progress_bar or not self.dist.is_main,
            mininterval=every,
            maxinterval=max(every, 10.0),  # tqdm's monitor forces a refresh after maxinterval
        )

    def _show_progress(self, bar: tqdm, clock: EpochClock) -> None:
        """The epoch's mean loss and images/s on the bar (reads the loss sum: one sync)."""
        if bar.disable or not self.stats.steps(EPOCH):
            return
        loss = self.stats.means(EPOCH).get("loss", float("nan"))
        bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{clock.rate():.0f}", refresh=False)

    def _stop_interrupted(self, signum: int) -> None:
        path = self.save_checkpoint()
        self.logger.close()
        raise Interrupted(
            f"interrupted at step {self.state.step}: checkpoint saved to {path}. Resume with the "
            f"same command plus: resume=true hydra.run.dir={self.run_dir}",
            signum,
        )

    def _report_bad_images(self) -> None:
        """Say how many unreadable files were skipped and evaluation items left out
        (data.on_bad_image=skip); ``bad_images.txt`` lists each file once, with its reason."""
        path = self.run_dir / BAD_IMAGES_FILE
        if not self.dist.is_main or not path.exists():
            return
        bad = read_listing(path)
        if bad:
            write_listing(path, bad)  # sorted, each file once
            dropped = {k: v for k, v in self.evaluator.dropped.items() if v}
            left_out = (
                "; evaluation left out "
                + ", ".join(f"{n} {name} item(s)" for name, n in dropped.items())
                if dropped
                else ""
            )
            msg = f"{len(bad)} unreadable image files were skipped{left_out} (listed in {path})"
            log.warning(msg)
            print(f"warning: {msg}")


class EpochClock:
    """Wall time of an epoch split into waiting for the loader (``data_s``) and the rest (``step_s``)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.data_s = 0.0
        self.images = 0

    def wrap(self, batches: Iterator[Any], n: int) -> Iterator[Any]:
        """Yield the next ``n`` of ``batches`` (fewer if it ends), adding the time spent
        waiting for each to :attr:`data_s`."""
        for _ in range(n):
            t0 = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            self.data_s += time.perf_counter() - t0
            yield batch

    def rate(self) -> float:
        return self.images / max(time.perf_counter() - self.start, 1e-9)

    def row(self) -> dict[str, float]:
        """``epoch_time_s``, ``data_s``, ``step_s`` and ``images_per_s`` of the epoch so far."""
        total = time.perf_counter() - self.start
        return {
            "epoch_time_s": total,
            "data_s": self.data_s,
            "step_s": total - self.data_s,
            "images_per_s": self.images / max(total, 1e-9),
        }
