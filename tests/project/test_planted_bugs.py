"""Tests written against bugs that once survived the suite (each was planted and seen to fail here):

* the P x K sampler dropping a class's leftover samples;
* ranks getting unequal numbers of batches (a DDP deadlock; caught here in milliseconds);
* NMI with another normaliser than the arithmetic mean;
* leave-one-out search with more than k + 1 exact duplicates counting the query itself;
* ``trainer.save_best`` keeping a worse checkpoint than the best;
* ``trainer.grad_clip`` ignored;
* Caffe's xavier filler with bound sqrt(6 / fan_in) instead of sqrt(3 / fan_in);
* NMI from one k-means iteration instead of a converged clustering;
* query/gallery MAP@R and R-Precision searched only to the largest K when R is larger;
* ``trainer.max_iters`` (or ``trainer.epochs``) treated as a bookkeeping key on resume;
* the best evaluation's ties going to the latest row instead of the earliest;
* the central fallback crop of a tall image sized ``W * min(ratio)`` instead of ``W / min(ratio)``.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from softmine.data import PKSampler
from softmine.data.device_transforms import sample_boxes
from softmine.engine import Trainer
from softmine.engine.eval_history import best_row, selection_summary
from softmine.errors import ConfigError
from softmine.evaluation import (
    knn_search,
    nmi,
    query_gallery_metrics,
    ranking_metrics,
    retrieval_metrics,
)
from softmine.losses.heads import ClassifierHead, caffe_xavier_
from softmine.runs.folder import Invocation, config_differences, plan_run
from tests.conftest import FAST_DIGITS, compose


def _labels(counts: list[int]) -> np.ndarray:
    return np.concatenate([np.full(c, i) for i, c in enumerate(counts)])


# ----------------------------------------------------------------------------- the sampler


def test_every_sample_is_drawn_each_epoch_leftovers_included() -> None:
    """With P = 1 every chunk is used: class c gives ceil(n_c / K) batches, all its samples."""
    counts, k = [10, 7, 12, 5], 4
    labels = _labels(counts)
    sampler = PKSampler(labels, classes_per_batch=1, samples_per_class=k, seed=3)
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
            "sampler.classes_per_batch=10",
            "sampler.samples_per_class=8",
            *overrides,
        ]
    )
    return Trainer(cfg, tmp_path)


@pytest.mark.slow
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


# ----------------------------------------------------------------------------- initialisation


@pytest.mark.parametrize("shape", [(1024, 512), (64, 128, 3, 3)])
def test_caffe_xavier_is_uniform_in_plus_minus_sqrt_3_over_fan_in(shape: tuple[int, ...]) -> None:
    """U(-a, a) with a = sqrt(3 / fan_in) has variance a^2 / 3 = 1 / fan_in (Caffe's XavierFiller)."""
    fan_in = math.prod(shape[1:])
    bound = math.sqrt(3.0 / fan_in)
    torch.manual_seed(0)
    w = caffe_xavier_(torch.empty(shape)).double()
    # 70k+ draws: the largest |w| is within 0.1% of the bound, never above it (float32 rounding)
    assert bound * 0.999 < float(w.abs().max()) <= bound * (1 + 1e-6)
    # the sample variance's relative standard error is sqrt(0.8 / n) < 0.4%
    assert float(w.var()) == pytest.approx(1.0 / fan_in, rel=0.01)
    assert float(w.mean()) == pytest.approx(0.0, abs=5 * math.sqrt(1.0 / fan_in / w.numel()))


def test_classifier_head_weights_use_caffe_xavier() -> None:
    torch.manual_seed(1)
    w = ClassifierHead(512, 1000).linear.weight.detach().double()
    assert float(w.abs().max()) <= math.sqrt(3.0 / 512) * (1 + 1e-6)
    assert float(w.var()) == pytest.approx(1.0 / 512, rel=0.01)


# ----------------------------------------------------------------------------- clustering


def _two_arcs() -> tuple[np.ndarray, np.ndarray]:
    """90 points evenly on the arc [0, 0.4] rad (class 0), 10 on [0.8, 0.85] rad (class 1).

    The classes are the best 2-means partition by far, but from two centres drawn among
    the points (most likely both in the big arc) Lloyd's iterations move the boundary
    towards the gap only step by step: a handful of iterations still cut the big arc.
    """
    angles = np.concatenate([np.linspace(0.0, 0.4, 90), np.linspace(0.8, 0.85, 10)])
    labels = np.array([0] * 90 + [1] * 10)
    return np.stack([np.cos(angles), np.sin(angles)], 1), labels


def test_nmi_comes_from_converged_k_means() -> None:
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score

    x, y = _two_arcs()
    # independent reference: sklearn's converged k-means (10 restarts) finds the classes
    ref = KMeans(2, n_init=10, random_state=0).fit_predict(x)
    assert normalized_mutual_info_score(y, ref) == 1.0
    assert nmi(x, y) == 1.0
    assert retrieval_metrics(x, y, ks=(1,))["nmi"] == 1.0
    for seed in range(1, 6):  # not a lucky initialisation
        assert nmi(x, y, seed=seed) == 1.0
    assert nmi(x, y, niter=1) < 0.5  # the test can tell a short k-means apart


# ----------------------------------------------------------------------------- query/gallery


def _unit(angles_deg: list[float]) -> np.ndarray:
    a = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    return np.stack([np.cos(a), np.sin(a)], 1)


def test_query_gallery_map_at_r_looks_beyond_the_largest_k() -> None:
    """R = 3 same-label gallery items and K = 1 only: the search must reach rank R.

    Gallery at 5, 10, 15, 20, 25 degrees, labels 1 2 1 1 2.
    Query at 0 (label 1): ranked 1 2 1 1 2, R = 3: hits at ranks 1 and 3 in the first three:
      AP@R = (1/1 + 2/3) / 3 = 5/9, R-Precision = 2/3.
    Query at 30 (label 2): ranked 2 1 1 2 1, R = 2: a hit at rank 1 only: AP@R = 1/2, RP = 1/2.
    """
    q, g = _unit([0, 30]), _unit([5, 10, 15, 20, 25])
    m = query_gallery_metrics(q, [1, 2], g, [1, 2, 1, 1, 2], ks=(1,))
    assert m == pytest.approx(
        {"recall@1": 1.0, "map@r": (5 / 9 + 1 / 2) / 2, "r_precision": (2 / 3 + 1 / 2) / 2},
        abs=1e-9,
    )


# ----------------------------------------------------------------------------- resume


def test_run_length_keys_are_part_of_the_experiment() -> None:
    diffs = config_differences(
        {"trainer": {"epochs": 2, "max_iters": 10, "device": "cpu"}},
        {"trainer": {"epochs": 3, "max_iters": 20, "device": "cuda"}},
    )
    assert [str(d) for d in diffs] == ["trainer.epochs (2 -> 3)", "trainer.max_iters (10 -> 20)"]


def test_a_resume_with_another_max_iters_is_refused_or_recorded(tmp_path: Path) -> None:
    def invocation(*overrides: str) -> Invocation:
        given = ["trainer.device=cpu", *FAST_DIGITS, *overrides]
        return Invocation(tmp_path, compose(given), given, choices={}, multirun=False)

    from softmine.runs.folder import commit_plan

    commit_plan(plan_run(invocation("trainer.max_iters=10")))  # a run stopped before the end
    with pytest.raises(ConfigError, match=r"trainer.max_iters \(10 -> 20\)"):
        plan_run(invocation("trainer.max_iters=20", "resume=true"))
    plan = plan_run(
        invocation("trainer.max_iters=20", "resume=true", "resume_override=[trainer.max_iters]")
    )
    assert plan.action == "resume"
    assert [(c.key, c.recorded, c.new) for c in plan.changes] == [("trainer.max_iters", 10, 20)]


# ----------------------------------------------------------------------------- best snapshot


def test_best_row_ties_go_to_the_earliest_evaluation() -> None:
    rows = [
        {"iteration": 100, "epoch": 1, "map@r": 0.5, "val/map@r": 0.3},
        {"iteration": 200, "epoch": 2, "map@r": 0.8, "val/map@r": 0.4},
        {"iteration": 300, "epoch": 3, "map@r": 0.8, "val/map@r": 0.4},
        {"iteration": 400, "epoch": 4, "map@r": float("nan"), "val/map@r": 0.2},
    ]
    assert best_row(rows, "map@r")["iteration"] == 200
    summary = selection_summary(rows, "map@r")
    assert summary["best_test_iteration"] == 200 and summary["selected_iteration"] == 200


# ----------------------------------------------------------------------------- augmentation


@pytest.mark.parametrize(
    ("h", "w", "ratio", "expected"),
    [
        # in ratio 31/400 < 3/4: full width 31, height round(31 / (3/4)) = round(41.33) = 41,
        # centred: top = (400 - 41) // 2 = 179
        (400, 31, (3 / 4, 4 / 3), (179, 0, 41, 31)),
        # height round(10 / 0.5) = 20, top = (1000 - 20) // 2 = 490
        (1000, 10, (0.5, 2.0), (490, 0, 20, 10)),
    ],
)
def test_fallback_crop_of_a_tall_image(h: int, w: int, ratio, expected) -> None:
    """No try fits (area >= 90% of the image, so the box is wider than the image): central box
    of aspect ratio min(ratio), torchvision's fallback rule worked out by hand."""
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    got = sample_boxes(torch.tensor([[h, w]] * 4), (0.9, 1.0), ratio)
    assert [tuple(int(t[i]) for t in got) for i in range(4)] == [expected] * 4
    torch.manual_seed(0)
    ref = RandomResizedCrop.get_params(torch.empty(1, h, w), [0.9, 1.0], list(ratio))
    assert tuple(ref) == expected
