"""What a finished training run hands to the end-of-run reporting.

:meth:`Trainer.train <softmine.engine.trainer.Trainer.train>` returns a
:class:`RunOutputs` once the final checkpoint is written; ``softmine-train``
(:mod:`softmine.commands.train`) gives it to :mod:`softmine.reporting.artifacts`
(plots, ``attention.csv``, ``report.html``) and :mod:`softmine.reporting.crossval`
(``test_embeddings.npz``). These read the run through these fields alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from omegaconf import DictConfig

if TYPE_CHECKING:
    from softmine.engine.components import Components
    from softmine.engine.state import TrainState


@dataclass
class RunOutputs:
    """A finished run, as its reports read it."""

    cfg: DictConfig  # the run's config
    run_dir: Path
    is_main: bool  # rank 0 (the only rank that writes files under torch.distributed)
    model: torch.nn.Module  # the trained network
    loss_fn: torch.nn.Module  # the trained loss (class vectors, attention)
    device: torch.device
    train_set: Any  # the training split (``flipped`` / ``clean_labels`` under label noise)
    test_set: Any | None  # the retrieval test split; None for query/gallery protocols
    num_workers: int  # DataLoader workers for embedding passes
    metrics: dict[str, float]  # the final evaluation's, the trainer's own: reports may add to it
    summary: dict[str, float]  # the rest of metrics.json (chosen snapshots, iteration, dropped)
    baselines: dict[str, dict[str, float]]  # trainer.baselines' rows (empty when off)
    test_embeddings: tuple[np.ndarray, np.ndarray] | None  # final evaluation's (embeddings, labels)
    test_arrays: dict[str, np.ndarray]  # the final evaluation's test arrays ({}: not kept)
    embed_test: Callable[[], dict[str, np.ndarray]]  # embeds the test split (every rank joins)

    def final_metrics(self) -> dict[str, float]:
        """What ``metrics.json`` holds: :attr:`metrics` (with what reports added), then :attr:`summary`."""
        return {**self.metrics, **self.summary}


def run_outputs(
    cfg: DictConfig,
    run_dir: Path,
    parts: Components,
    state: TrainState,
    summary: dict[str, float],
    kept: tuple[int, Any, Any] | None,
) -> RunOutputs:
    """What the end-of-run reports read of a finished run (``summary``: :attr:`RunOutputs.summary`;
    ``kept``: the trainer's ``test_embeddings``, used when they are the final step's)."""
    return RunOutputs(
        cfg=cfg,
        run_dir=run_dir,
        is_main=parts.dist.is_main,
        model=parts.model,
        loss_fn=parts.loss_fn,
        device=parts.device,
        train_set=parts.train_set,
        test_set=getattr(parts.evaluator, "test_set", None),
        num_workers=parts.num_workers,
        metrics=state.metrics,
        summary=summary,
        baselines=state.baselines,
        test_embeddings=(kept[1], kept[2]) if kept is not None and kept[0] == state.step else None,
        test_arrays=parts.evaluator.last_test_arrays if state.last_eval_step == state.step else {},
        embed_test=partial(parts.evaluator.embed_test, parts.model),
    )
