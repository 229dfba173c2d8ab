"""Per-sample class-aware attention over the whole training set, and how well it finds noisy labels.

At the end of a run the trained loss scores every training sample with the
attention it would give it in a batch (Wang et al., AAAI 2019, Sec. "Class-Aware
Attention": a_i = p(y_i | x_i) from the class vectors). Under label noise
(:mod:`softmine.data.noise`) a good attention is low on the flipped samples;
:func:`attention_auc` measures that as the area under the ROC curve of
attention separating clean (positive) from flipped samples: 1 = every clean sample
gets more attention than every flipped one, 0.5 = chance.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from softmine.losses.base import needs_of
from softmine.runs.layout import RunLayout


def loss_details(
    loss_fn: nn.Module, embeddings: torch.Tensor, labels: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The ``details`` dict of ``loss_fn(embeddings, labels, return_details=True)``; {} for a loss
    that declares no ``returns_details``."""
    if not needs_of(loss_fn).returns_details:
        return {}
    out = loss_fn(embeddings, labels, return_details=True)
    return dict(out[1]) if isinstance(out, tuple) else {}


@torch.no_grad()
def sample_attention(
    loss_fn: nn.Module, embeddings: torch.Tensor, labels: torch.Tensor, chunk: int = 1024
) -> np.ndarray | None:
    """Attention a_i (n,) the loss gives each sample, or None if the loss has no attention.

    Reads the ``attention`` entry of the loss's own details (so it is exactly what
    training used), in chunks: a_i depends only on sample i and the class vectors.
    A loss whose classifier heads read other backbone features than the embeddings
    (its declared ``requires``, e.g. the authors' heads on pool5) cannot be scored
    from embeddings alone: None.
    """
    if needs_of(loss_fn).requires:
        return None
    was_training = loss_fn.training
    loss_fn.eval()
    try:
        parts = []
        for start in range(0, len(labels), chunk):
            details = loss_details(
                loss_fn, embeddings[start : start + chunk], labels[start : start + chunk]
            )
            if "attention" not in details:
                return None
            parts.append(details["attention"].float().cpu())
    finally:
        loss_fn.train(was_training)
    return torch.cat(parts).numpy() if parts else None


def attention_auc(attention: np.ndarray, flipped: np.ndarray) -> float:
    """ROC AUC of attention as a score for 'clean label' (flipped samples are the negatives).

    NaN when all samples are clean or all are flipped (the AUC is undefined).
    """
    flipped = np.asarray(flipped, dtype=bool)
    if flipped.all() or not flipped.any():
        return float("nan")
    return float(roc_auc_score(~flipped, np.asarray(attention, dtype=np.float64)))


@contextmanager
def deterministic_transform(train_set: Any, test_set: Any) -> Iterator[None]:
    """Temporarily give ``train_set`` the deterministic transform of ``test_set`` (no augmentation)."""
    if not (hasattr(train_set, "transform") and hasattr(test_set, "transform")):
        yield
        return
    saved = train_set.transform
    train_set.transform = test_set.transform
    try:
        yield
    finally:
        train_set.transform = saved


def write_attention_csv(
    run_dir: Path,
    attention: np.ndarray,
    labels: np.ndarray,
    clean_labels: np.ndarray | None = None,
    flipped: np.ndarray | None = None,
) -> Path:
    """``attention.csv``: one row per training sample (index, label used, clean label, flipped, attention).

    ``attention`` may be all NaN (a loss without attention): the file then records the flips only.
    """
    n = len(attention)
    table = pd.DataFrame(
        {
            "index": np.arange(n),
            "label": np.asarray(labels),
            "clean_label": np.asarray(labels if clean_labels is None else clean_labels),
            "flipped": np.zeros(n, dtype=bool) if flipped is None else np.asarray(flipped),
            "attention": np.asarray(attention, dtype=np.float64),
        }
    )
    path = RunLayout(run_dir).attention
    table.to_csv(path, index=False)
    return path
