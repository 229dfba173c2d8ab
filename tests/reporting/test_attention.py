"""Per-sample attention of the training set, its AUC against flipped labels, and the end-of-run files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from softmine.data import Digits
from softmine.engine import Trainer
from softmine.losses import OSMCAALoss
from softmine.reporting.artifacts import fit_and_report
from softmine.reporting.attention import attention_auc, sample_attention
from tests.conftest import FAST_DIGITS, compose


def _auc_by_pairs(score: np.ndarray, flipped: np.ndarray) -> float:
    """P(score of a clean sample > score of a flipped one), ties counting 1/2: a plain double loop."""
    clean, bad = score[~flipped], score[flipped]
    total = 0.0
    for c in clean:
        for b in bad:
            total += 1.0 if c > b else 0.5 if c == b else 0.0
    return total / (len(clean) * len(bad))


def test_attention_auc_is_the_pairwise_ordering_probability() -> None:
    rng = np.random.default_rng(0)
    score = rng.integers(0, 5, 60).astype(float)  # many ties
    flipped = rng.random(60) < 0.3
    assert attention_auc(score, flipped) == pytest.approx(_auc_by_pairs(score, flipped))
    assert attention_auc(np.array([0.9, 0.8, 0.1]), np.array([False, False, True])) == 1.0
    assert attention_auc(np.array([0.1, 0.8, 0.9]), np.array([False, False, True])) == 0.0
    assert np.isnan(attention_auc(score, np.zeros(60, bool)))


def test_sample_attention_is_the_true_class_probability_of_the_class_vectors() -> None:
    torch.manual_seed(0)
    loss = OSMCAALoss(num_classes=4, embedding_dim=6, scale=3.0)
    x = torch.randn(25, 6, dtype=torch.float64)
    y = torch.arange(25) % 4
    got = sample_attention(loss, x.float(), y, chunk=7)  # chunks of 7: 7 + 7 + 7 + 4
    xs = x / x.norm(dim=1, keepdim=True)
    c = loss.class_vectors.detach().double()
    logits = 3.0 * xs @ (c / c.norm(dim=1, keepdim=True)).T
    expected = (logits.exp() / logits.exp().sum(1, keepdim=True))[torch.arange(25), y]
    assert got is not None and got.shape == (25,)
    assert np.allclose(got, expected.numpy(), atol=1e-5)
    assert loss.training  # left as it was


def test_losses_without_attention_give_none() -> None:
    x, y = torch.randn(8, 6), torch.arange(8) % 2
    no_caa = OSMCAALoss(num_classes=2, embedding_dim=6, caa=False, ce_weight=0.0)
    assert sample_attention(no_caa, x, y) is None

    class Plain(torch.nn.Module):
        def forward(self, e: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return e.sum()

    assert sample_attention(Plain(), x, y) is None


def _fit(tmp_path: Path, *overrides: str) -> tuple[Path, dict[str, float]]:
    """A 2-epoch digits run in-process, on one CPU thread (much faster on a shared machine)."""
    cfg = compose([*FAST_DIGITS, "trainer.epochs=2", *overrides])
    run = tmp_path / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run, fit_and_report(Trainer(cfg, run))  # with the end-of-run reports
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_noisy_run_records_flips_attention_and_auc(tmp_path: Path) -> None:
    run, metrics = _fit(tmp_path, "dataset.label_noise=0.2", "trainer.plots=true")
    table = pd.read_csv(run / "attention.csv")
    n = len(table)
    assert n == len(Digits(split="train")) and table["flipped"].sum() == round(0.2 * n)
    assert (table["flipped"] == (table["label"] != table["clean_label"])).all()
    auc = _auc_by_pairs(table["attention"].to_numpy(), table["flipped"].to_numpy())
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["attention_auc"] == pytest.approx(auc) == pytest.approx(metrics["attention_auc"])
    # after two epochs the attention already ranks most clean samples above flipped ones
    assert auc > 0.6
    names = {p.name for p in (run / "plots").glob("*.png")}
    assert names == {
        "training_curves.png",
        "recall_at_k.png",
        "retrieval_grid.png",
        "retrieval_grid_worst.png",
        "tsne.png",
        "osm_weights.png",
        "attention.png",
    }


@pytest.mark.slow
def test_clean_run_without_plots_writes_nothing_extra(tmp_path: Path) -> None:
    run, metrics = _fit(tmp_path, "trainer.plots=false")
    assert "attention_auc" not in metrics and not (run / "attention.csv").exists()
    assert not (run / "plots").exists()


@pytest.mark.slow
def test_noisy_run_of_a_loss_without_attention_records_flips_but_no_auc(tmp_path: Path) -> None:
    run, metrics = _fit(
        tmp_path, "loss=contrastive", "dataset.label_noise=0.3", "trainer.plots=false"
    )
    assert "attention_auc" not in metrics
    table = pd.read_csv(run / "attention.csv")  # the flips are recorded all the same
    assert table["flipped"].sum() == round(0.3 * len(table)) and table["attention"].isna().all()


@pytest.mark.slow
def test_a_sweep_job_leaves_its_tsne_map_to_softmine_report(tmp_path: Path) -> None:
    """A sweep job draws the cheap plots and keeps the embeddings of its t-SNE map; the sweep's
    report draws the map (one panel per configuration), --run-plots the run's own."""
    from softmine.reporting.sweep_report import report

    cfg = compose([*FAST_DIGITS, "trainer.max_iters=4", "trainer.plots=true"])
    sweep = tmp_path / "sweep"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fit_and_report(Trainer(cfg, sweep / "0"), sweep_job=True)
    finally:
        torch.set_num_threads(threads)
    run = sweep / "0"
    (run / ".hydra").mkdir()  # the record softmine-train writes, which the report reads
    (run / ".hydra" / "overrides.yaml").write_text("- trainer.max_iters=4\n")
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    names = {p.name for p in (run / "plots").iterdir()}
    assert "tsne.png" not in names and "embedding_map.npz" in names
    assert {"training_curves.png", "recall_at_k.png", "retrieval_grid.png"} <= names
    _, _, written = report([sweep])
    assert sweep / "tsne.png" in written and (sweep / "tsne.png").stat().st_size > 0
    assert "<figcaption>tsne.png</figcaption>" in (sweep / "report.html").read_text()
    assert not (run / "plots" / "tsne.png").exists()
    report([sweep], run_plots=True)
    assert (run / "plots" / "tsne.png").stat().st_size > 0


def test_trainer_plots_is_true_false_or_all() -> None:
    from softmine.engine.validate import validate_config
    from softmine.errors import ConfigError

    for value in ("true", "false", "all"):
        validate_config(compose([f"trainer.plots={value}"]))
    with pytest.raises(ConfigError, match="trainer.plots must be true, false or all"):
        validate_config(compose(["trainer.plots=some"]))
