"""softmine-report on a fake sweep built here: grouping, means, sample stds, counts, references."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pandas as pd
import pytest
import yaml

from softmine.commands.report import main
from softmine.reporting import html as html_report
from softmine.reporting.sweep_report import (
    REFERENCE_SOURCE,
    aggregate,
    load_runs,
    report,
    to_markdown,
)

LOSSES = ("contrastive", "osm_caa")
NOISE = ("0.0", "0.2")
SEEDS = (0, 1, 2)


def _value(loss: str, noise: str, seed: int) -> float:
    """An arbitrary, distinct MAP@R per run (the test's own ground truth)."""
    return 0.5 + 0.1 * LOSSES.index(loss) - 0.3 * float(noise) + 0.01 * seed**2


def _write_run(
    folder: Path, overrides: list[str], metrics: dict | None, dataset: str = "digits"
) -> None:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    seed = next((int(o.split("=")[1]) for o in overrides if o.startswith("seed=")), 0)
    (folder / ".hydra" / "config.yaml").write_text(
        yaml.safe_dump({"seed": seed, "dataset": {"name": dataset}})
    )
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics))
    rows = [{"epoch": e, "loss": 1.0 / e, "epoch_time_s": 0.1} for e in (1, 2, 3)]
    pd.DataFrame(rows).to_csv(folder / "train_log.csv", index=False)


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """Jobs numbered like a Hydra sweep (0..12, so '10' sorts after '9'), one of them failed."""
    root = tmp_path / "multirun" / "noise"
    job = 0
    for loss in LOSSES:
        for noise in NOISE:
            for seed in SEEDS:
                overrides = [
                    f"loss={loss}",
                    f"dataset.label_noise={noise}",
                    f"seed={seed}",
                    "experiment=noise",  # the same in every run: not a grouping key
                ]
                metrics = {"map@r": _value(loss, noise, seed), "recall@1": 0.9}
                if loss == "osm_caa" and noise == "0.2":
                    metrics["attention_auc"] = 0.7 + 0.05 * seed
                _write_run(root / str(job), overrides, metrics)
                job += 1
    _write_run(
        root / str(job),
        ["loss=osm_caa", "dataset.label_noise=0.2", "seed=3", "experiment=noise"],
        None,
    )
    return root


def test_aggregate_means_stds_counts(sweep: Path) -> None:
    table = aggregate(load_runs([sweep]))
    assert table.attrs["keys"] == ["loss", "dataset.label_noise"]  # seed and constants left out
    assert list(table["loss"]) == ["contrastive", "contrastive", "osm_caa", "osm_caa"]
    assert list(table["dataset.label_noise"]) == [0.0, 0.2, 0.0, 0.2]
    for _, row in table.iterrows():
        noise = f"{row['dataset.label_noise']:.1f}"
        values = [_value(row["loss"], noise, s) for s in SEEDS]
        assert row["n"] == 3 and row["seeds"] == "0,1,2"
        assert row["map@r_mean"] == pytest.approx(statistics.mean(values), abs=1e-12)
        assert row["map@r_std"] == pytest.approx(statistics.stdev(values), abs=1e-12)
        assert row["recall@1_mean"] == pytest.approx(0.9) and row["recall@1_std"] == pytest.approx(
            0
        )
    failed = table.set_index(["loss", "dataset.label_noise"])["failed"]
    assert failed[("osm_caa", 0.2)] == 1 and failed.sum() == 1
    auc = table.set_index(["loss", "dataset.label_noise"])
    assert auc.loc[("osm_caa", 0.2), "attention_auc_mean"] == pytest.approx(0.75)
    assert auc.loc[("osm_caa", 0.2), "attention_auc_std"] == pytest.approx(0.05)
    assert pd.isna(auc.loc[("contrastive", 0.0), "attention_auc_mean"])


def test_markdown_and_files(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    table, markdown, written = report([sweep], out=out, metrics=["map@r", "attention_auc"])
    values = [_value("contrastive", "0.0", s) for s in SEEDS]
    expected = f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"
    line = next(r for r in markdown.splitlines() if r.startswith("| digits | contrastive | 0 |"))
    assert line.split(" | ")[3:5] == ["3", "0"] and expected in line  # n, failed, value
    assert (
        "| dataset | loss | dataset.label_noise | n | failed | map@r | attention_auc |" in markdown
    )
    assert (out / "report.md").read_text() == markdown
    csv = pd.read_csv(out / "report.csv")
    assert len(csv) == 4 and csv["map@r_mean"].tolist() == pytest.approx(table["map@r_mean"])
    names = {p.name for p in written}
    assert {"map_r_vs_dataset_label_noise.png", "attention_auc_vs_dataset_label_noise.png"} <= names
    assert "training_loss.png" in names
    assert all(p.stat().st_size > 0 for p in written)


def test_single_seed_has_no_std_and_reference_rows_for_paper_datasets(tmp_path: Path) -> None:
    _write_run(tmp_path / "a", ["loss=osm_caa"], {"recall@1": 0.5, "map@r": 0.2}, dataset="cub")
    _write_run(tmp_path / "b", ["loss=contrastive"], {"recall@1": 0.4, "map@r": 0.1}, dataset="cub")
    table, markdown, _ = report([tmp_path / "a", tmp_path / "b"], out=tmp_path / "out")
    ref = table[table["source"] == REFERENCE_SOURCE]
    assert len(ref) == 1 and ref["recall@1_mean"].item() == pytest.approx(0.553)
    assert pd.isna(ref["map@r_mean"].item())  # the paper reports no MAP@R
    measured = table[table["source"] != REFERENCE_SOURCE]
    assert measured["n"].tolist() == [1, 1] and measured["map@r_std"].isna().all()
    assert "| cub | osm_caa | measured | 1 | 0.5000 | 0.2000 |" in to_markdown(table)
    assert f"| cub |  | {REFERENCE_SOURCE} |  | 0.5530 | – |" in markdown


def test_cli_exit_codes(sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(sweep), "-o", str(tmp_path / "r"), "--metrics", "map@r"]) == 0
    assert "| digits | osm_caa | 0.2 | 3 | 1 |" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "nowhere")])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main([str(sweep), "-o", str(tmp_path / "r"), "--metrics", "nope"])
    assert e.value.code == 2


def test_run_plots_are_drawn_from_the_files_a_run_leaves(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _write_run(run, ["loss=osm_caa"], {"map@r": 0.5})
    pd.DataFrame({"attention": [0.9, 0.8, 0.1], "flipped": [False, False, True]}).to_csv(
        run / "attention.csv", index=False
    )
    report([run], out=tmp_path / "out", run_plots=True)
    assert (run / "plots" / "training_curves.png").stat().st_size > 0
    assert (run / "plots" / "attention.png").stat().st_size > 0


def _links(page: str) -> list[str]:
    return re.findall(r'<a href="([^"#][^"]*)"', page)


def test_a_run_folders_own_page_is_never_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "outputs" / "run"
    _write_run(run, ["loss=osm_caa"], {"map@r": 0.5, "recall@1": 0.75})
    own = html_report.write_run_report(run).read_bytes()  # what the run wrote at its end
    assert main([str(run)]) == 0
    assert "| digits | 1 | 0.7500 | 0.5000 |" in capsys.readouterr().out
    assert (run / "report.html").read_bytes() == own
    summary = (run / "summary" / "report.html").read_text()
    assert _links(summary) == ["../report.html"]  # the run's page, not itself
    assert (run / "summary" / "report.md").is_file()
    with pytest.raises(SystemExit) as e:  # nothing is written into a run folder
        main([str(tmp_path / "outputs"), "-o", str(run)])
    assert e.value.code == 2 and "is a run folder" in capsys.readouterr().err
    assert (run / "report.html").read_bytes() == own and not (run / "report.md").exists()


def test_a_sweep_page_never_links_to_itself(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _write_run(run, ["loss=osm_caa"], {"map@r": 0.5})
    html_report.write_run_report(run)
    runs = load_runs([run])
    page = html_report.sweep_report_html(pd.DataFrame({"n": [1]}), runs, [], [], out=run)
    assert _links(page) == []
    assert _links(html_report.sweep_report_html(pd.DataFrame(), runs, [], [], out=tmp_path)) == [
        "run/report.html"
    ]


def _write_loss_run(folder: Path, loss: str, seed: int, scale: float) -> None:
    """A run whose config holds its loss node as a real run's .hydra/config.yaml does."""
    from omegaconf import OmegaConf

    from tests.conftest import compose

    _write_run(folder, [f"loss={loss}", f"seed={seed}"], {"recall@1": 0.8 + 0.01 * seed})
    config = yaml.safe_load((folder / ".hydra" / "config.yaml").read_text())
    config["loss"] = OmegaConf.to_container(compose([f"loss={loss}"]).loss, resolve=False)
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    rows = [{"epoch": e, "loss": scale / e + 0.01 * seed, "epoch_time_s": 0.1} for e in (1, 2, 3)]
    pd.DataFrame(rows).to_csv(folder / "train_log.csv", index=False)


def test_losses_with_and_without_a_classification_term_get_their_own_axes(
    tmp_path: Path,
) -> None:
    from softmine.reporting.sweep_report import LOSS_KINDS, training_loss_figure

    for i, (loss, scale) in enumerate(
        [("contrastive", 0.2), ("contrastive", 0.2), ("osm_caa", 6.0), ("normsoftmax", 4.0)]
    ):
        _write_loss_run(tmp_path / "sweep" / str(i), loss, seed=i, scale=scale)
    runs = load_runs([tmp_path / "sweep"])
    kinds = dict(zip(runs["override:loss"], runs["loss_kind"], strict=True))
    assert kinds == {
        "contrastive": LOSS_KINDS[False],  # osm_caa with ce_weight=0: no classifier
        "osm_caa": LOSS_KINDS[True],  # + ce_weight * CE
        "normsoftmax": LOSS_KINDS[True],
    }
    assert "loss_kind" not in aggregate(runs).attrs["metrics"]  # not a metric
    fig = training_loss_figure(runs, aggregate(runs))
    axes = {ax.get_title(): ax for ax in fig.axes}
    assert set(axes) == {LOSS_KINDS[True], LOSS_KINDS[False]}
    ce, pair = axes[LOSS_KINDS[True]], axes[LOSS_KINDS[False]]
    assert {t.get_text() for t in ce.get_legend().get_texts()} == {"osm_caa", "normsoftmax"}
    assert {t.get_text() for t in pair.get_legend().get_texts()} == {"contrastive"}
    assert pair.get_ylim()[1] < 0.5 < 4.0 < ce.get_ylim()[1]  # each on its own scale
    one_kind = runs[runs["override:loss"] == "contrastive"]
    single = training_loss_figure(one_kind, aggregate(one_kind))
    assert len(single.axes) == 1 and single.axes[0].get_title() == "training loss per epoch"
    _, _, written = report([tmp_path / "sweep"], out=tmp_path / "out")
    assert "training_loss.png" in {p.name for p in written}


@pytest.mark.parametrize(
    "loss, has_ce",
    [
        ("contrastive", False),
        ("contrastive_hard", False),
        ("osm", False),
        ("lifted", False),
        ("multi_similarity", False),
        ("triplet_batchhard", False),
        ("triplet_semihard", False),
        ("proxy_anchor", False),  # log-sum-exp over proxies, no softmax cross-entropy
        ("circle", False),
        ("caa", True),
        ("osm_caa", True),
        ("osm_caa_authors", True),
        ("normsoftmax", True),
        ("cosface", True),
        ("arcface", True),
        ("subcenter_arcface", True),
        ("softtriple", True),
    ],
)
def test_every_bundled_loss_declares_whether_it_has_a_classification_term(
    loss: str, has_ce: bool
) -> None:
    from softmine.losses.base import has_classification_term
    from tests.conftest import compose

    assert has_classification_term(compose([f"loss={loss}"]).loss) is has_ce
