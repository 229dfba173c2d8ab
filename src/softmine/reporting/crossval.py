"""Cross-validation over class folds: each fold's test embeddings, and the K models scored together.

With ``dataset.folds=K dataset.fold=i`` a run trains on K - 1 folds of the training
classes and validates on fold i (:mod:`softmine.data.splits`); a sweep over
``dataset.fold=0..K-1`` gives K models. The benchmark of Musgrave et al. (*A Metric
Learning Reality Check*, ECCV 2020) reports the metrics of the K models (mean and
standard deviation over folds) and the test metrics of the K models together, each test
item embedded as the concatenation of the K models' L2-normalised embeddings.

So every fold run writes its final test embedding arrays to ``test_embeddings.npz``
(:func:`save_fold_embeddings`, called by ``softmine-train`` once the run has trained), in the
layout ``softmine-eval``
reads; ``softmine-report`` finds the K runs of a configuration and seed that differ
only in the fold and scores their concatenation with the runs' own protocol
(:func:`concatenated_metrics`). The report needs neither the data nor the models.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from softmine.engine.evaluator import score_arrays
from softmine.engine.outputs import RunOutputs
from softmine.errors import DataError
from softmine.runs.layout import RunLayout

EMBEDDING_ARRAYS = ("embeddings", "query", "gallery")  # the rest are labels / ids / cameras


def save_fold_embeddings(run: RunOutputs) -> Path | None:
    """Write the final test embeddings of a fold run to ``test_embeddings.npz`` (rank 0).

    Does nothing unless ``dataset.folds`` is set. Reuses the arrays of the final
    evaluation when it ran at the last step, else embeds the test split again (every
    rank takes part, as in any evaluation).
    """
    if not int(run.cfg.dataset.get("folds") or 0):
        return None
    arrays = run.test_arrays or run.embed_test()
    if not run.is_main:
        return None
    path = RunLayout(run.run_dir).test_embeddings
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return path


def concatenate(parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One set of arrays from K: embeddings L2-normalised per model and concatenated.

    The cosine similarity of two concatenated embeddings is the mean of the K models'
    cosine similarities. Every other array (labels, identities, cameras) must be the
    same in every part (the same test split in the same order).
    """
    if not parts:
        raise DataError("no fold embeddings to concatenate")
    keys = set(parts[0])
    out: dict[str, np.ndarray] = {}
    for key in sorted(keys):
        if any(set(p) != keys for p in parts):
            raise DataError(
                "the fold runs saved different arrays; were they trained on one dataset config?"
            )
        values = [np.asarray(p[key]) for p in parts]
        if key in EMBEDDING_ARRAYS:
            unit = [v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12) for v in values]
            out[key] = np.concatenate(unit, axis=1).astype(np.float32)
        else:
            if any(not np.array_equal(v, values[0]) for v in values[1:]):
                raise DataError(
                    f"the fold runs' test splits differ ({key}); their embeddings cannot be "
                    "concatenated"
                )
            out[key] = values[0]
    return out


def concatenated_metrics(run_dirs: Sequence[str | Path], cfg: DictConfig) -> dict[str, float]:
    """Test metrics of the concatenated embeddings of the fold runs in ``run_dirs``.

    ``cfg`` is one run's config (its protocol and evaluation options score the result).
    """
    parts = []
    for d in run_dirs:
        path = RunLayout(d).test_embeddings
        if not path.exists():
            raise DataError(f"{path} is missing; fold runs write it at the end of training")
        with np.load(path) as data:
            parts.append({k: data[k] for k in data.files})
    return score_arrays(concatenate(parts), cfg)
