"""The training loop: P x K batches -> embedding net -> loss -> optimizer, then retrieval evaluation.

Everything is built from the Hydra config with ``_target_`` instantiation; the
trainer only wires the pieces together, logs, evaluates and checkpoints.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm import tqdm

from softmine.config import build
from softmine.engine.embed import extract_embeddings, raw_inputs
from softmine.engine.logger import CSVLogger
from softmine.engine.setup import resolve_device, seed_everything
from softmine.errors import ConfigError
from softmine.evaluation import retrieval_metrics

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
TRAIN_LOG_FILE = "train_log.csv"
CHECKPOINT_DIR = "checkpoints"


def _loss_kwargs(loss_cfg: DictConfig, num_classes: int, embedding_dim: int) -> dict[str, Any]:
    """Fill the run-time sizes a loss config leaves open (``num_classes``, ``embedding_dim``)."""
    extra: dict[str, Any] = {}
    if "num_classes" in loss_cfg and loss_cfg.get("num_classes") is None:
        extra["num_classes"] = num_classes
    if "embedding_dim" in loss_cfg and loss_cfg.get("embedding_dim") is None:
        extra["embedding_dim"] = embedding_dim
    return extra


def _check_train_labels(labels: np.ndarray) -> int:
    """Training labels must be 0..C-1 (the classifier's rows); returns C."""
    classes = np.unique(labels)
    if classes.min() != 0 or classes.max() != len(classes) - 1:
        raise ConfigError(
            "training labels must be contiguous 0..C-1 "
            f"(got {len(classes)} classes from {classes.min()} to {classes.max()}); "
            "the dataset class must remap them"
        )
    return len(classes)


class Trainer:
    """Builds model, loss, optimizer, data and sampler from ``cfg`` and trains in ``run_dir``."""

    def __init__(self, cfg: DictConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        tcfg = cfg.trainer
        if int(tcfg.epochs) < 1:
            raise ConfigError(f"trainer.epochs must be >= 1 (got {tcfg.epochs})")
        self.device = resolve_device(tcfg.device)
        seed_everything(int(cfg.seed), bool(tcfg.get("deterministic", False)))

        self.train_set = build(cfg.dataset.train, "dataset.train")
        self.test_set = build(cfg.dataset.test, "dataset.test")
        labels = np.asarray(self.train_set.labels)
        self.num_classes = _check_train_labels(labels)

        self.model = build(cfg.backbone, "backbone").to(self.device)
        emb_dim = int(cfg.backbone.embedding_dim)
        self.loss_fn = build(
            cfg.loss, "loss", **_loss_kwargs(cfg.loss, self.num_classes, emb_dim)
        ).to(self.device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        params += [p for p in self.loss_fn.parameters() if p.requires_grad]
        self.optimizer = build(cfg.optimizer, "optimizer")(params)

        self.sampler = build(cfg.sampler, "sampler", labels=labels, seed=int(cfg.seed))
        self.loader = DataLoader(
            self.train_set,
            batch_sampler=self.sampler,
            num_workers=int(tcfg.num_workers),
            persistent_workers=int(tcfg.num_workers) > 0,
        )
        self._loss_details = "return_details" in inspect.signature(self.loss_fn.forward).parameters
        self.logger = CSVLogger(self.run_dir / TRAIN_LOG_FILE)
        self.step = 0

    def evaluate(self, model: torch.nn.Module | None = None) -> dict[str, float]:
        """Retrieval metrics of ``model`` (default: the trained one) on the test split."""
        emb, labels = extract_embeddings(
            model or self.model,
            self.test_set,
            device=self.device,
            batch_size=int(self.cfg.trainer.eval_batch_size),
            num_workers=int(self.cfg.trainer.num_workers),
        )
        return retrieval_metrics(emb, labels, self.cfg.evaluation.ks)

    def baselines(self) -> dict[str, dict[str, float]]:
        """Metrics of raw inputs and of the untrained network on the same test split."""
        x, y = raw_inputs(self.test_set)
        return {
            "raw pixels": retrieval_metrics(x, y, self.cfg.evaluation.ks),
            "untrained network": self.evaluate(),
        }

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the sampler's batches; returns the epoch's mean loss pieces."""
        self.model.train()
        self.loss_fn.train()
        self.sampler.set_epoch(epoch)
        sums: dict[str, float] = {}
        n_batches, n_images, t0 = 0, 0, time.perf_counter()
        bar = tqdm(
            self.loader,
            desc=f"epoch {epoch + 1}/{self.cfg.trainer.epochs}",
            leave=False,
            disable=not self.cfg.trainer.progress_bar,
        )
        for x, y in bar:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            emb = self.model(x)
            if self._loss_details:
                loss, details = self.loss_fn(emb, y, return_details=True)
            else:
                loss, details = self.loss_fn(emb, y), {}
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.step += 1
            n_batches += 1
            n_images += len(y)
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            for k in ("l_pos", "l_neg", "ce"):
                if k in details:
                    sums[k] = sums.get(k, 0.0) + float(details[k])
            if "attention" in details:
                sums["attention"] = sums.get("attention", 0.0) + float(details["attention"].mean())
            rate = n_images / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}", img_s=f"{rate:.0f}")
        if n_batches == 0:
            raise ConfigError(
                "the sampler produced no batch: the training set is too small for "
                f"P={self.sampler.P} x K={self.sampler.K}; lower sampler.num_classes or num_samples"
            )
        out = {k: v / n_batches for k, v in sums.items()}
        out["images_per_s"] = n_images / max(time.perf_counter() - t0, 1e-9)
        return out

    def save_checkpoint(self, epoch: int) -> Path:
        """Write ``checkpoints/last.pt`` atomically (temporary file, then rename)."""
        path = self.run_dir / CHECKPOINT_DIR / "last.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "epoch": epoch,
            "step": self.step,
            "model": self.model.state_dict(),
            "loss": self.loss_fn.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(path)
        return path

    def fit(self) -> dict[str, float]:
        """Train for ``trainer.epochs`` epochs, evaluate, write metrics.json; returns the metrics."""
        tcfg = self.cfg.trainer
        base = self.baselines() if tcfg.baselines else None
        metrics: dict[str, float] = {}
        t_start = time.perf_counter()
        for epoch in range(int(tcfg.epochs)):
            row: dict[str, Any] = {"epoch": epoch + 1, "step": self.step}
            row.update(self.train_epoch(epoch))
            row["step"] = self.step
            row["lr"] = self.optimizer.param_groups[0]["lr"]
            last = epoch + 1 == int(tcfg.epochs)
            every = int(tcfg.eval_every)
            evaluated = last or (every > 0 and (epoch + 1) % every == 0)
            if evaluated:
                metrics = self.evaluate()
                row.update(metrics)
            row["elapsed_s"] = time.perf_counter() - t_start
            self.logger.log(row)
            shown = "".join(f" {k} {v:.4f}" for k, v in metrics.items()) if evaluated else ""
            log.info("epoch %d/%d loss %.4f%s", epoch + 1, tcfg.epochs, row["loss"], shown)
            self.save_checkpoint(epoch + 1)
        write_metrics(self.run_dir, metrics)
        if base is not None:
            print(format_table({**base, "trained embedding": metrics}))
        return metrics


def write_metrics(run_dir: Path, metrics: dict[str, float]) -> Path:
    """Write the flat metrics dict to ``metrics.json`` atomically."""
    path = Path(run_dir) / METRICS_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """A small fixed-width table: one row per embedding, one column per metric."""
    cols = list(next(iter(rows.values())).keys())
    name_w = max(len(n) for n in rows) + 2
    head = "".ljust(name_w) + "".join(c.rjust(11) for c in cols)
    lines = [head, "-" * len(head)]
    for name, m in rows.items():
        lines.append(name.ljust(name_w) + "".join(f"{m.get(c, float('nan')):11.4f}" for c in cols))
    return "\n".join(lines)
