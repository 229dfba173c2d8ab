"""Tests written against bugs that once survived the suite (each was planted and seen to fail here):

* the P x K sampler dropping a class's leftover samples;
* ranks getting unequal numbers of batches (a DDP deadlock; caught here in milliseconds);
* NMI with another normaliser than the arithmetic mean;
* leave-one-out search with more than k + 1 exact duplicates counting the query itself;
* ``trainer.save_best`` keeping a worse checkpoint than the best;
* ``trainer.grad_clip`` ignored.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from softmine.data import PKSampler
from softmine.engine import Trainer
from softmine.evaluation import knn_search, nmi, ranking_metrics
from tests.conftest import compose


def _labels(counts: list[int]) -> np.ndarray:
    return np.concatenate([np.full(c, i) for i, c in enumerate(counts)])


# ----------------------------------------------------------------------------- the sampler


def test_every_sample_is_drawn_each_epoch_leftovers_included() -> None:
    """With P = 1 every chunk is used: class c gives ceil(n_c / K) batches, all its samples."""
    counts, k = [10, 7, 12, 5], 4
    labels = _labels(counts)
    sampler = PKSampler(labels, num_classes=1, num_samples=k, seed=3)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == sum(math.ceil(c / k) for c in counts)
        assert set(np.concatenate(batches).tolist()) == set(range(len(labels)))
        per_class = Counter(int(labels[b[0]]) for b in batches)
        assert per_class == {c: math.ceil(n / k) for c, n in enumerate(counts)}


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_every_rank_gets_the_same_number_of_batches(world_size: int) -> None:
    """Unequal shares make DDP wait forever for the rank that has one more batch."""
    rng = np.random.default_rng(world_size)
    remainders = set()
    for trial in range(12):
        labels = _labels(rng.integers(4, 30, size=rng.integers(6, 14)).tolist())
        for epoch in range(2):
            total = len(PKSampler(labels, 3, 4, seed=trial).epoch_batches(epoch))
            remainders.add(total % world_size)
            for start in (0, 1):
                lengths = set()
                for rank in range(world_size):
                    s = PKSampler(labels, 3, 4, seed=trial, rank=rank, world_size=world_size)
                    s.set_epoch(epoch, start_batch=start)
                    expected = len(s)
                    got = len(list(s))
                    assert got == expected, (trial, epoch, rank)
                    lengths.add(got)
                assert lengths == {total // world_size - start}, (trial, epoch, start)
    assert remainders - {0}, "no trial had a batch count the ranks cannot split evenly"


# ----------------------------------------------------------------------------- metrics


def _nmi_reference(labels: np.ndarray, clusters: np.ndarray) -> float:
    """I(U;V) / mean(H(U), H(V)) in float64, from the contingency table."""
    n = len(labels)
    joint: Counter = Counter(zip(labels.tolist(), clusters.tolist(), strict=True))
    a, b = Counter(labels.tolist()), Counter(clusters.tolist())
    mi = sum(c / n * math.log(n * c / (a[i] * b[j])) for (i, j), c in joint.items())
    h_a = -sum(c / n * math.log(c / n) for c in a.values())
    h_b = -sum(c / n * math.log(c / n) for c in b.values())
    return mi / ((h_a + h_b) / 2)


def test_nmi_uses_the_arithmetic_mean_of_the_entropies() -> None:
    """Three distinct points (k-means has one partition to find) of sizes 8, 2, 2, and three
    balanced classes: the entropies differ, so every other normaliser gives another number."""
    clusters = np.array([0] * 8 + [1] * 2 + [2] * 2)
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    x = np.eye(3)[clusters]
    expected = _nmi_reference(labels, clusters)
    assert nmi(x, labels) == pytest.approx(expected, abs=1e-12)
    from sklearn.metrics import normalized_mutual_info_score as other

    for method in ("geometric", "min", "max"):  # the test can tell them apart
        assert abs(other(labels, clusters, average_method=method) - expected) > 1e-3


def test_leave_one_out_with_more_than_k_plus_one_duplicates() -> None:
    """Six identical vectors of six different classes, each class's other item far away: no
    query has a same-class item among its 4 nearest others, unless it counts itself."""
    rng = np.random.default_rng(0)
    far = np.array([0.0, 1.0, 0.0]) + rng.normal(scale=0.05, size=(6, 3))
    x = np.vstack([np.tile([1.0, 0.0, 0.0], (6, 1)), far])
    y = np.concatenate([np.arange(6), np.arange(6)])
    sims, idx = knn_search(x, k=4, exclude_self=True)
    for q in range(6):
        assert q not in idx[q] and len(idx[q]) == 4
        assert set(idx[q]) <= set(range(6)) and np.allclose(sims[q], 1.0)
    m = ranking_metrics(x, y, ks=(1, 2, 4))
    assert m == {
        "recall@1": 0.0,
        "recall@2": 0.0,
        "recall@4": 0.0,
        "map@r": 0.0,
        "r_precision": 0.0,
    }


# ----------------------------------------------------------------------------- the trainer


def _trainer(tmp_path: Path, *overrides: str) -> Trainer:
    cfg = compose(
        [
            "trainer.device=cpu",
            "trainer.progress_bar=false",
            "trainer.plots=false",
            "trainer.tensorboard=false",
            "sampler.num_classes=10",
            "sampler.num_samples=8",
            *overrides,
        ]
    )
    return Trainer(cfg, tmp_path)


def test_save_best_keeps_the_best_evaluation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = _trainer(tmp_path, "trainer.epochs=4", "trainer.eval_every=1", "trainer.save_best=true")
    scores = iter([0.5, 0.8, 0.6, 0.7])  # the best is neither the first nor the last
    monkeypatch.setattr(t, "evaluate", lambda model=None: {"map@r": next(scores)})
    t.fit()
    best = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    assert best["train_state"]["metrics"]["map@r"] == 0.8
    assert best["train_state"]["epoch"] == 2  # saved after the second evaluation
    last = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert last["train_state"]["metrics"]["map@r"] == 0.7


@pytest.mark.parametrize("clip", [None, 1e-3])
def test_grad_clip_bounds_the_update(tmp_path: Path, clip: float | None) -> None:
    """Plain SGD with lr 1: the update is minus the (clipped) gradient, so its norm is the clip."""
    t = _trainer(
        tmp_path,
        "optimizer=sgd",
        "optimizer.lr=1.0",
        "optimizer.momentum=0.0",
        "optimizer.weight_decay=0.0",
        f"trainer.grad_clip={'null' if clip is None else clip}",
    )
    before = [p.detach().clone() for p in t.params]
    x, y = next(iter(t.loader))
    values = t.train_step(x, y)
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(t.params, before, strict=True)])
    grad_norm = float(values["grad_norm"])  # before clipping
    assert grad_norm > 10 * (clip or 0)
    expected = grad_norm if clip is None else clip
    assert float(step.norm()) == pytest.approx(expected, rel=1e-4)
