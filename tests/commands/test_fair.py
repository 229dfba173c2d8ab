"""make fair: every loss with its tuned setting, one table read from the run folders (issue 23)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from softmine.commands import fair
from softmine.errors import ConfigError
from softmine.reporting import fair_benchmark
from tests.conftest import compose


def test_still_rising_compares_the_last_fifth_with_everything_before() -> None:
    flat = [0.5, 0.8, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.903]
    assert not fair_benchmark.still_rising(flat)  # the tail's 0.903 beats 0.9 by less than 0.005
    assert fair_benchmark.still_rising([0.5, 0.6, 0.7, 0.8, 0.9])  # last 1 of 5: 0.9 > 0.8 + 0.005
    # 10 evaluations: the last 2 are the tail; a dip then a recovery to the old best is flat
    assert not fair_benchmark.still_rising([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.9, 0.85, 0.9])
    assert fair_benchmark.still_rising([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.91])
    assert not fair_benchmark.still_rising([0.7])  # one evaluation: nothing to judge


def test_paired_interval_is_the_mean_and_a_seeded_bootstrap() -> None:
    mean, low, high = fair_benchmark.paired_interval([-0.02, -0.03, -0.01, -0.02, -0.02])
    assert mean == pytest.approx(-0.02)
    assert -0.03 <= low <= mean <= high <= -0.01  # inside the range of the differences
    assert fair_benchmark.paired_interval([-0.02, -0.03, -0.01, -0.02, -0.02]) == (mean, low, high)
    assert fair_benchmark.paired_interval([0.05]) == (0.05, 0.05, 0.05)
    # by hand: two differences {0, 1}; a resample's mean is 0, 0.5 or 1 (probability 1/4, 1/2, 1/4)
    _, low, high = fair_benchmark.paired_interval([0.0, 1.0])
    assert (low, high) == (0.0, 1.0)


def _run(folder: Path, loss: str, seed: int, map_r: float, curve: list[float], **extra) -> None:
    (folder / ".hydra").mkdir(parents=True)
    overrides = ["experiment=fair", "dataset=digits_pairs", f"loss={loss}", f"seed={seed}"]
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    metrics = {"map@r": map_r, "recall@1": 0.9, "r_precision": map_r + 0.01, **extra}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    rows = "".join(f"{i + 1},{i + 1},{v}\n" for i, v in enumerate(curve))
    (folder / "eval_log.csv").write_text("iteration,epoch,val/map@r\n" + rows)


def test_the_table_is_read_from_the_run_folders(tmp_path: Path) -> None:
    rising, flat = [0.1, 0.2, 0.3, 0.4, 0.5], [0.5, 0.6, 0.6, 0.6, 0.6]
    best = {0: 0.90, 1: 0.92, 2: 0.91}
    other = {0: 0.80, 1: 0.83, 2: 0.81}  # 0.10, 0.09, 0.10 below the best, seed by seed
    job = 0
    for seed in (0, 1, 2):
        _run(tmp_path / str(job), "osm_caa", seed, best[seed], flat, mirror_confusion=0.0)
        _run(tmp_path / str(job + 1), "contrastive", seed, other[seed], rising,
             mirror_confusion=0.1 * seed)  # fmt: skip
        job += 2
    (tmp_path / str(job) / ".hydra").mkdir(parents=True)  # a failed run: no metrics.json
    (tmp_path / str(job) / ".hydra" / "overrides.yaml").write_text("- loss=contrastive\n- seed=3\n")
    text, table = fair_benchmark.table(tmp_path)
    rows = {r["loss"]: r for _, r in table.iterrows()}
    assert list(rows) == ["contrastive", "osm_caa"]  # the issue's order
    assert rows["osm_caa"]["MAP@R"] == "0.9100 ± 0.0100"
    assert rows["osm_caa"]["ΔMAP@R vs best [95% CI]"] == "best"
    delta = rows["contrastive"]["ΔMAP@R vs best [95% CI]"]
    mean, low, high = fair_benchmark.paired_interval(np.array([-0.10, -0.09, -0.10]))
    assert delta == f"{mean:+.4f} [{low:+.4f}, {high:+.4f}] (n=3)" and mean == pytest.approx(
        -0.29 / 3
    )
    assert rows["contrastive"]["mirror confusion"] == "0.100"
    assert rows["contrastive"]["still rising"] == "yes (3/3)"
    assert rows["osm_caa"]["still rising"] == "no (0/3)"
    assert rows["contrastive"]["n"] == 3 and rows["contrastive"]["failed"] == 1
    assert "**0.9100 ± 0.0100**" in text and "1 failed" in text
    assert (tmp_path / "fair.md").read_text().startswith("| loss |")
    assert (tmp_path / "val_curves.png").exists()


def test_the_sweep_trains_every_loss_of_the_issue_over_five_seeds(tmp_path: Path) -> None:
    args = fair.sweep_args("digits_pairs", fair_benchmark.LOSSES, fair.SEEDS, tmp_path)
    assert "experiment=fair" in args and "seed=0,1,2,3,4" in args
    losses = next(a for a in args if a.startswith("loss=")).split("=", 1)[1].split(",")
    assert losses == [
        "contrastive", "contrastive_hard", "osm", "caa", "osm_caa", "triplet_batchhard",
        "triplet_semihard", "multi_similarity", "proxy_anchor", "normsoftmax", "lifted",
    ]  # fmt: skip


def test_a_loss_without_a_tuned_setting_is_one_line_naming_make_tune() -> None:
    from softmine.engine.validate import validate_config

    cfg = compose(["experiment=fair", "dataset=cub", "loss=lifted"])  # no CUB study has run
    with pytest.raises(ConfigError, match=r"make tune DATASET=cub LOSS="):
        validate_config(cfg)


@pytest.mark.parametrize("dataset", ["cub", "cars196"])
def test_the_real_sets_have_the_protocol(dataset: str) -> None:
    cfg = compose(["experiment=fair", f"dataset={dataset}", "loss=contrastive"])
    assert cfg.backbone.name == "bninception" and cfg.backbone.embedding_dim == 512
    assert cfg.backbone.frozen_bn is True and cfg.dataset.folds == 4
    assert cfg.evaluation.test == "final"
