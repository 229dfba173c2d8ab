"""Validation on held-out training classes: what the sampler sees, what metrics.json says."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from softmine.data.datasets.digits import Digits
from softmine.data.splits import (
    ClassSubset,
    ReIDView,
    build_train_and_validation,
    held_out_classes,
    reid_query_gallery,
)
from softmine.engine.eval_history import resolve_monitor, selection_summary
from softmine.errors import ConfigError
from tests.conftest import FAST_DIGITS, compose, run_cli

NAMES = ["recall@1", "map@r", "nmi"]
VAL_NAMES = NAMES + ["val/recall@1", "val/map@r", "val/nmi"]


def test_validation_classes_never_reach_the_training_batches(tmp_path: Path) -> None:
    from softmine.engine import Trainer

    cfg = compose(
        [*FAST_DIGITS, "dataset.val_classes=3", "dataset.val_seed=5", "trainer.device=cpu"]
    )
    trainer = Trainer(cfg, tmp_path / "run")
    raw = Digits(split="train")  # the whole training split, built independently
    held = set(trainer.evaluator.validation.classes.tolist())
    assert len(held) == 3 and held <= set(range(10))
    kept = sorted(set(range(10)) - held)
    assert trainer.num_classes == 7 and trainer.loss_fn.class_vectors.shape[0] == 7

    index = np.asarray(trainer.train_set.index)  # positions in the raw training split
    seen_raw, seen_labels = set(), set()
    for epoch in range(3):
        trainer.sampler.set_epoch(epoch)
        for batch in trainer.sampler:
            seen_raw |= set(raw.targets[index[batch]].tolist())
            seen_labels |= set(trainer.train_set.labels[batch].tolist())
    assert seen_raw == set(kept)  # every remaining class trains, no held-out one
    assert seen_labels == set(range(7))  # relabelled 0..C-1
    # the relabelling keeps the order of the original labels
    for new, old in enumerate(kept):
        assert set(raw.targets[index[trainer.train_set.labels == new]]) == {old}
    # what the DataLoader hands the loss: labels 0..6 and the images of the kept classes
    trainer.sampler.set_epoch(0)
    x, y = next(iter(trainer.loader))
    assert int(y.max()) < 7
    # the validation split: every image of the held-out classes, and only those
    val = trainer.evaluator.validation.test
    assert sorted(set(val.labels.tolist())) == sorted(held)
    assert len(val) == int(np.isin(raw.targets, list(held)).sum())
    assert len(val) + len(trainer.train_set) == len(raw)
    assert val.dataset.transform is None  # read as the test split reads (no augmentation)
    first = int(val.index[0])
    assert torch.equal(val[0][0], raw.images[first])


def test_label_noise_applies_to_the_remaining_classes_only() -> None:
    cfg = compose(["dataset.val_classes=2", "dataset.label_noise=0.3"])
    train, val = build_train_and_validation(cfg.dataset)
    assert set(np.unique(train.labels)) <= set(range(8))  # flipped among the 8 kept classes
    assert int(train.flipped.sum()) == round(0.3 * len(train))
    assert np.array_equal(train.clean_labels, train.dataset.labels)
    assert set(val.test.labels.tolist()) == set(val.classes.tolist())


@pytest.mark.slow
def test_issue_command_writes_the_three_numbers(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [
        "softmine.commands.train",
        *FAST_DIGITS,
        "dataset=digits",
        "dataset.val_classes=2",
        "trainer.epochs=3",
        "trainer.eval_every=1",
        "trainer.monitor=val/map@r",
        "trainer.save_best=true",
        f"hydra.run.dir={run}",
    ]
    res = run_cli(args, tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    metrics = json.loads((run / "metrics.json").read_text())
    log = pd.read_csv(run / "eval_log.csv")
    assert len(log) == 3
    final, by_val, by_test = log.iloc[-1], log.loc[log["val/map@r"].idxmax()], log["map@r"].idxmax()
    assert metrics["map@r"] == final["map@r"]
    assert metrics["val/map@r"] == final["val/map@r"]
    assert metrics["selected_iteration"] == by_val["iteration"]
    assert metrics["selected/map@r"] == by_val["map@r"]  # the TEST score of the val-chosen one
    assert metrics["selected/val/map@r"] == by_val["val/map@r"]
    assert metrics["best_test_iteration"] == log.loc[by_test, "iteration"]
    assert metrics["best_test/map@r"] == log["map@r"].max()
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert best["train_state"]["step"] == by_val["iteration"]  # best.pt follows validation


def test_resolve_monitor() -> None:
    assert resolve_monitor("auto", NAMES) == "map@r"
    assert resolve_monitor("auto", VAL_NAMES) == "val/map@r"
    assert resolve_monitor("test/recall@1", VAL_NAMES) == "recall@1"
    assert resolve_monitor("val/nmi", VAL_NAMES) == "val/nmi"
    with pytest.raises(ConfigError, match="dataset.val_classes"):
        resolve_monitor("val/map@r", NAMES)
    with pytest.raises(ConfigError, match="test/cmc@1"):
        resolve_monitor("test/cmc@1", VAL_NAMES)


def test_selection_summary_by_hand() -> None:
    rows = [
        {"iteration": 10, "epoch": 1, "map@r": 0.5, "val/map@r": 0.7},
        {"iteration": 20, "epoch": 2, "map@r": 0.6, "val/map@r": 0.9},  # val's choice
        {"iteration": 30, "epoch": 3, "map@r": 0.8, "val/map@r": 0.8},  # the test's choice
    ]
    for monitor in ("val/map@r", "map@r"):  # either name makes both choices
        out = selection_summary(rows, monitor)
        assert out["selected_iteration"] == 20 and out["selected/map@r"] == 0.6
        assert out["selected/val/map@r"] == 0.9
        assert out["best_test_iteration"] == 30 and out["best_test/map@r"] == 0.8
    no_val = selection_summary([{k: v for k, v in r.items() if "val" not in k} for r in rows], "x")
    assert not any(k.startswith("selected") for k in no_val)


def test_held_out_classes_rules() -> None:
    classes = np.arange(20) * 3  # any label values
    a = held_out_classes(classes, val_classes=4, seed=1)
    assert len(a) == 4 and set(a) <= set(classes)
    assert np.array_equal(a, held_out_classes(np.repeat(classes, 5), val_classes=4, seed=1))
    assert not np.array_equal(a, held_out_classes(classes, val_classes=4, seed=2))
    assert len(held_out_classes(classes)) == 0
    for bad in (
        {"val_classes": 20},
        {"val_classes": -1},
        {"val_classes": 2, "folds": 4},
        {"folds": 1},
        {"folds": 4, "fold": 4},
        {"fold": 1},
    ):
        with pytest.raises(ConfigError):
            held_out_classes(classes, **bad)


def test_class_subset_forwards_and_relabels() -> None:
    raw = Digits(split="train")
    sub = ClassSubset(raw, np.array([7, 2, 9]))
    assert sorted(set(sub.labels.tolist())) == [0, 1, 2]
    assert set(raw.targets[sub.index].tolist()) == {2, 7, 9}
    x, y = sub[5]
    assert torch.equal(x, raw.images[sub.index[5]]) and y == int(sub.labels[5])
    sub.transform = "marker"  # attributes are the wrapped dataset's
    assert raw.transform == "marker"


class _Cams:
    """A labelled set with cameras: item i is (i, label, ...)."""

    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3])
    camids = np.array([0, 1, 0, 0, 0, 1, 0, 1, 2])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return i, int(self.labels[i])


def test_reid_validation_view_by_hand() -> None:
    data = _Cams()
    index = np.array([0, 1, 2, 5, 6, 7])  # identities 0 and 2 held out
    gallery = ReIDView(data, index)
    assert gallery.pids.tolist() == [0, 0, 0, 2, 2, 2]
    assert gallery.camids.tolist() == [0, 1, 0, 1, 0, 1]
    q = reid_query_gallery(gallery.pids, gallery.camids)
    # first item of each (identity, camera): (0,0) at 0, (0,1) at 1, (2,1) at 3, (2,0) at 4
    assert q.tolist() == [0, 1, 3, 4]
    assert gallery[3] == (5, 2, 1)
    with pytest.raises(ConfigError, match="camera"):
        ReIDView(Digits(split="test"), np.arange(3))


def test_reid_validation_on_a_fake_mars(tmp_path: Path) -> None:
    from softmine.testing.fakes import make_mars

    root = make_mars(tmp_path / "mars")
    cfg = compose(["dataset=mars", f"dataset.root={root}", "dataset.val_classes=1"])
    train, val = build_train_and_validation(cfg.dataset, reid=True)
    assert val.protocol == "reid" and val.test is None
    held = set(val.classes.tolist())
    assert set(val.gallery.pids.tolist()) == held
    assert not held & set(train.original_labels.tolist())
    assert val.gallery.dataset.sampling == cfg.dataset.test_sampling  # read as the query set
    pairs = list(zip(val.query.pids.tolist(), val.query.camids.tolist(), strict=True))
    every = set(zip(val.gallery.pids.tolist(), val.gallery.camids.tolist(), strict=True))
    assert len(pairs) == len(set(pairs)) == len(every)
    assert len(val.gallery.tracklets) == len(val.gallery)


@pytest.mark.slow
def test_bad_options_stop_before_training(tmp_path: Path) -> None:
    run = tmp_path / "run"
    base = ["softmine.commands.train", *FAST_DIGITS, f"hydra.run.dir={run}"]
    for extra, words in (
        (["dataset.val_classes=10"], "dataset.val_classes=10"),
        (["dataset.val_classes=2", "dataset.folds=3"], "set one of them to 0"),
        (["trainer.monitor=val/map@r"], "dataset.val_classes=N"),
    ):
        res = run_cli([*base, *extra], tmp_path)
        assert res.returncode == 2, res.stderr[-1000:]
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith("error:") and words in last
        assert "Traceback" not in res.stderr
    assert not (run / "train_log.csv").exists()


class _MeanColour(torch.nn.Module):
    """Frames (n, 3, H, W) -> their mean colour: fake MARS frames differ by identity in blue."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().mean(dim=(2, 3))


class _Constant(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ones(len(x), 3)


def test_reid_validation_is_scored_as_query_gallery(tmp_path: Path) -> None:
    from softmine.engine.evaluator import Evaluator
    from softmine.testing.fakes import make_mars

    root = make_mars(tmp_path / "mars")
    cfg = compose(["dataset=mars", f"dataset.root={root}", "dataset.val_classes=2"])
    _, val = build_train_and_validation(cfg.dataset, reid=True)
    assert len(set(val.gallery.pids.tolist())) == 2
    evaluator = Evaluator(cfg, torch.device("cpu"), validation=val)
    assert "val/mAP" in evaluator.metric_names()
    out = evaluator.evaluate_validation(_MeanColour())
    # two held-out identities, each seen by two or more cameras, told apart by their colour:
    # every query finds its identity in another camera first
    assert out["val/num_skipped_queries"] == 0
    assert out["val/cmc@1"] == 1.0 and out["val/mAP"] == 1.0
    constant = evaluator.evaluate_validation(_Constant())  # ties count against the query
    assert constant["val/cmc@1"] == 0.0


@pytest.mark.slow
def test_label_noise_keeps_the_selections_in_metrics_json(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [
        "softmine.commands.train",
        *FAST_DIGITS,
        "dataset.val_classes=2",
        "dataset.label_noise=0.2",
        "trainer.max_iters=6",
        "trainer.eval_every_iters=3",
        f"hydra.run.dir={run}",
    ]
    res = run_cli(args, tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("attention_auc", "selected_iteration", "selected/map@r", "best_test_iteration"):
        assert key in metrics, key
