"""Everything a training run is made of, built once from the Hydra config.

:func:`build_components` instantiates the data sets, the evaluator, model, loss,
optimiser, schedule, sampler, DataLoader and objective (``_target_`` nodes) in the
order that keeps the random streams of a seed the same, and returns them as one
typed :class:`Components`; the :class:`~softmine.engine.trainer.Trainer` only runs
them. :func:`setup_process` comes first: device, seeds and backends.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from softmine.config import build
from softmine.data.image_sizes import small_images_hint
from softmine.data.run_batches import RunBatchSampler, SeededItems, WholeBatches
from softmine.data.splits import build_train_and_validation
from softmine.engine.distributed import DistEnv
from softmine.engine.eval_history import resolve_monitor
from softmine.engine.evaluator import Evaluator, eval_protocol
from softmine.engine.objective import Objective, build_loss, build_memory
from softmine.engine.optim import build_optimizer
from softmine.engine.precision import PRECISIONS
from softmine.engine.setup import (
    check_shared_memory,
    configure_backends,
    rank_seed,
    resolve_device,
    resolve_num_workers,
    seed_everything,
    set_cpu_threads,
    set_sharing_strategy,
)
from softmine.engine.sync_bn import convert_sync_batchnorm
from softmine.engine.validate import EVERY, NEVER, test_mode
from softmine.errors import ConfigError
from softmine.losses.memory import CrossBatchMemory
from softmine.runs.layout import RunLayout
from softmine.runs.signals import ignore_interrupts

log = logging.getLogger(__name__)


@dataclass
class Components:
    """The built pieces of a run; the trainer steps, evaluates and checkpoints them."""

    dist: DistEnv  # this process's place under torch.distributed (one process: rank 0 of 1)
    device: torch.device
    train_set: Any  # the training split (held-out validation classes removed)
    test_mode: str  # evaluation.test: EVERY, FINAL or NEVER
    evaluator: Evaluator  # validation and test splits, and how they are scored
    num_classes: int  # training classes (labels 0..C-1)
    monitor: str  # the metric that chooses best.pt
    model: torch.nn.Module
    loss_fn: torch.nn.Module
    params: list[torch.nn.Parameter]  # what the optimizer steps and the gradient clip reads
    optimizer: torch.optim.Optimizer
    sampler: Any  # P x K batches of sample indices, one epoch at a time
    batches_per_epoch: int
    total_steps: int  # trainer.max_iters, or epochs x batches_per_epoch
    scheduler: Any  # a torch LR scheduler over total_steps
    num_workers: int  # DataLoader workers (trainer.num_workers resolved)
    device_transform: Any  # dataset.transform.device_transform, or None
    run_batches: RunBatchSampler  # the whole run's batches, for one loader iterator
    loader_generator: torch.Generator  # seeds the loader's workers
    loader: DataLoader
    channels_last: bool  # inputs (and model) in channels-last memory format
    scaler: torch.amp.GradScaler  # fp16 loss scaling (disabled otherwise)
    objective: torch.nn.Module  # model + loss (under DDP / torch.compile when asked)
    memory: CrossBatchMemory | None = None  # loss.memory=xbm: the queue (in the checkpoint)


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


def setup_process(cfg: DictConfig) -> tuple[DistEnv, torch.device]:
    """This process's rank and device; seeds, backends and CPU threads as ``cfg.trainer`` asks."""
    tcfg = cfg.trainer
    dist = DistEnv.current()
    device = resolve_device(tcfg.device)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    seed_everything(int(cfg.seed), bool(tcfg.deterministic))
    configure_backends(bool(tcfg.deterministic), bool(tcfg.get("tf32", True)))
    set_cpu_threads(tcfg.get("num_threads", "auto"))
    return dist, device


def build_components(
    cfg: DictConfig, run_dir: Path, dist: DistEnv, device: torch.device
) -> Components:
    """Data sets, evaluator, model, loss, optimiser, schedule, sampler, loader and objective.

    The image files of every split are checked first (``bad_images.txt`` lists the
    unreadable ones at once), and the model and loss get the sizes their configs leave open.
    """
    tcfg, seed = cfg.trainer, int(cfg.seed)
    # dataset.val_classes / dataset.folds: held-out classes leave the training set
    train_set, validation = build_train_and_validation(
        cfg.dataset, reid=eval_protocol(cfg.dataset) == "reid"
    )
    mode = test_mode(cfg)  # evaluation.test: every evaluation, the final one, never
    evaluator = Evaluator(cfg, device, dist=dist, validation=validation, test=mode != NEVER)
    # every split's image files, before any training: all the unreadable ones at once
    evaluator.check_files(train_set, RunLayout(run_dir).bad_images, write=dist.is_main)
    hint = small_images_hint(train_set, OmegaConf.select(cfg, "dataset.transform"))
    if hint and dist.is_main:  # a resolution that fits the data
        log.warning("%s", hint)
    labels = np.asarray(train_set.labels)
    num_classes = _check_train_labels(labels)
    monitor = resolve_monitor(str(tcfg.monitor), evaluator.metric_names(test=mode == EVERY))

    model, loss_fn, channels_last = _model_and_loss(cfg, device, num_classes)
    if dist.enabled:  # own augmentation/dropout streams per rank (rank 0 keeps the seed)
        torch.manual_seed(rank_seed(seed, dist.rank))
    params = [p for p in model.parameters() if p.requires_grad]
    params += [p for p in loss_fn.parameters() if p.requires_grad]
    named = [(f"model.{n}", p) for n, p in model.named_parameters()]
    named += [(f"loss.{n}", p) for n, p in loss_fn.named_parameters()]
    optimizer = build_optimizer(cfg.optimizer, named)
    sampler = _sampler(cfg, train_set, labels, dist)
    batches_per_epoch = len(sampler)
    total_steps = (
        int(tcfg.max_iters) if tcfg.max_iters is not None else int(tcfg.epochs) * batches_per_epoch
    )
    scheduler = build(cfg.scheduler, "scheduler")(optimizer, total_steps)
    if hasattr(train_set, "bad_image_log"):
        train_set.bad_image_log = str(RunLayout(run_dir).bad_images)
    num_workers = resolve_num_workers(tcfg.num_workers, train_set)
    evaluator.num_workers = num_workers
    set_sharing_strategy(tcfg.get("sharing_strategy", "file_descriptor"))
    device_transform, run_batches, loader_generator, loader = _loader(
        cfg, train_set, sampler, num_workers, dist, device
    )
    in_flight = [(train_set, sampler.P * sampler.K)]  # loaders whose worker batches share memory
    if evaluator.protocol == "retrieval" and evaluator.has_test:
        in_flight.append((evaluator.test_set, int(tcfg.eval_batch_size)))
    check_shared_memory(num_workers, in_flight)
    memory = build_memory(cfg.loss, loss_fn, device)
    scaler, objective, model = _objective(cfg, device, dist, model, loss_fn, memory)
    return Components(
        dist=dist,
        device=device,
        train_set=train_set,
        test_mode=mode,
        evaluator=evaluator,
        num_classes=num_classes,
        monitor=monitor,
        model=model,
        loss_fn=loss_fn,
        params=params,
        optimizer=optimizer,
        sampler=sampler,
        batches_per_epoch=batches_per_epoch,
        total_steps=total_steps,
        scheduler=scheduler,
        num_workers=num_workers,
        device_transform=device_transform,
        run_batches=run_batches,
        loader_generator=loader_generator,
        loader=loader,
        channels_last=channels_last,
        scaler=scaler,
        objective=objective,
        memory=memory,
    )


def _sampler(cfg: DictConfig, train_set: Any, labels: np.ndarray, dist: DistEnv) -> Any:
    """The P x K batch sampler of the training labels (this rank's share under torch.distributed)."""
    shard_args = {"rank": dist.rank, "world_size": dist.world_size} if dist.enabled else {}
    sampler = build(
        cfg.sampler,
        "sampler",
        labels=labels,
        seed=int(cfg.seed),
        class_names=getattr(train_set, "class_names", None),
        **shard_args,
    )
    if len(sampler) == 0:
        raise ConfigError(
            "the sampler produces no batch: the training set is too small for "
            f"P={sampler.P} x K={sampler.K}; lower sampler.classes_per_batch or "
            "samples_per_class"
        )
    return sampler


def _loader(
    cfg: DictConfig,
    train_set: Any,
    sampler: Any,
    num_workers: int,
    dist: DistEnv,
    device: torch.device,
) -> tuple[Any, RunBatchSampler, torch.Generator, DataLoader]:
    """The device transform, the run's batch sampler, the generator that seeds the loader's
    workers, and the one DataLoader of the whole run."""
    node = OmegaConf.select(cfg, "dataset.transform.device_transform")
    device_transform = None if node is None else build(node, "dataset.transform.device_transform")
    # one loader iterator for the whole run; items seeded unless drawn in-process from memory
    seed_items = num_workers > 0 or not getattr(train_set, "in_memory", False)
    run_batches = RunBatchSampler(
        sampler, seed=int(cfg.seed), rank=dist.rank, seed_items=seed_items
    )
    generator = torch.Generator()
    # an in-memory set fetched in this process gives whole batches (data/run_batches.py)
    fetch = None if seed_items or device_transform else getattr(train_set, "get_batch", None)
    if fetch is not None:
        loader = DataLoader(
            WholeBatches(fetch),
            sampler=run_batches,
            batch_size=None,
            pin_memory=device.type == "cuda",
            generator=generator,
        )
        return device_transform, run_batches, generator, loader
    loader = DataLoader(
        SeededItems(train_set) if seed_items else train_set,
        batch_sampler=run_batches,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        generator=generator,
        collate_fn=getattr(device_transform, "collate", None),
        worker_init_fn=ignore_interrupts,
    )
    return device_transform, run_batches, generator, loader


def _model_and_loss(
    cfg: DictConfig, device: torch.device, num_classes: int
) -> tuple[torch.nn.Module, torch.nn.Module, bool]:
    """The backbone and the loss on ``device``, and whether inputs go channels-last."""
    emb_dim = int(cfg.backbone.embedding_dim)
    model = build(
        cfg.backbone, "backbone", **run_time_sizes(cfg.backbone, num_classes, emb_dim)
    ).to(device)
    channels_last = bool(cfg.trainer.channels_last) and device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    sizes = run_time_sizes(cfg.loss, num_classes, emb_dim, getattr(model, "feature_dims", None))
    loss_fn = build_loss(cfg.loss, model, **sizes).to(device)
    return model, loss_fn, channels_last


def _objective(
    cfg: DictConfig,
    device: torch.device,
    dist: DistEnv,
    model: torch.nn.Module,
    loss_fn: torch.nn.Module,
    memory: CrossBatchMemory | None = None,
) -> tuple[torch.amp.GradScaler, torch.nn.Module, torch.nn.Module]:
    """The AMP scaler, the objective (model + loss; DDP, compiled when asked) and the model
    (SyncBatchNorm converted when ``trainer.sync_bn``)."""
    tcfg = cfg.trainer
    precision = str(tcfg.precision)
    autocast_dtype = PRECISIONS.get(precision)
    scaler = torch.amp.GradScaler(
        device.type, enabled=precision == "fp16" and device.type == "cuda"
    )
    if tcfg.sync_bn:  # BatchNorm statistics of the global batch (no-op in one process)
        model = convert_sync_batchnorm(model, device)
    objective: torch.nn.Module = Objective(model, loss_fn, autocast_dtype, memory)
    if dist.enabled:
        objective = DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None
        )
    if tcfg.get("compile", False):  # model + loss as one graph; the first steps compile it
        objective = torch.compile(objective)
    return scaler, objective, model
