"""The results pages and the README say what the code gives.

* the demo table in docs/results.md is what the demo command prints today (within a stated
  tolerance);
* every page's generated sections hold the tables ``scripts/results.py`` writes there, and
  the prose around them quotes no 4-decimal number that is not in a generated table;
* README.md's generated blocks are what ``scripts/results.py --readme`` writes from the docs'
  generated sections, so the README cannot drift from the docs.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pandas as pd
import pytest

from tests.conftest import REPO, run_cli

#: Largest accepted difference per number. On the machine and commit of the page's stamp the
#: rerun is exact; another CPU or BLAS rounds differently and 30 epochs amplify it.
TOLERANCE = 0.005


def _stated_demo_table() -> dict[str, list[float]]:
    text = (REPO / "docs" / "results.md").read_text()
    section = text.split("<!-- table: demo -->", 1)[1].split("<!--", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and re.fullmatch(r"\d\.\d{4}", cells[1]):
            rows[cells[0]] = [float(c) for c in cells[1:]]
    return rows


def _printed_table(stdout: str) -> dict[str, list[float]]:
    rows = {}
    for line in stdout.splitlines():
        m = re.match(r"^(\S.*?)\s+((?:\d\.\d{4}\s*){7})$", line)
        if m:
            rows[m.group(1).strip()] = [float(v) for v in m.group(2).split()]
    return rows


def test_the_page_states_a_full_demo_table() -> None:
    rows = _stated_demo_table()
    assert set(rows) == {"raw pixels", "untrained network", "trained (OSM+CAA)"}
    assert all(0.0 <= v <= 1.0 for r in rows.values() for v in r)


@pytest.mark.slow
def test_demo_table_matches_a_fresh_run(tmp_path: Path) -> None:
    stated = _stated_demo_table()
    res = run_cli(
        [
            "softmine.commands.train",
            "experiment=demo",
            "trainer.device=cpu",
            "trainer.progress_bar=false",
            "trainer.plots=false",  # plots change no number
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        tmp_path,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    got = _printed_table(res.stdout)
    got["trained (OSM+CAA)"] = got.pop("trained embedding")
    assert set(got) == set(stated)
    for name, values in stated.items():
        assert got[name] == pytest.approx(values, abs=TOLERANCE), name


@pytest.mark.slow
def test_the_demo_rows_read_from_the_run_folder_are_the_printed_table(tmp_path: Path) -> None:
    """scripts/results.py builds the demo table from the run's files, not from its printout:
    the same numbers as the table the run prints (baselines, then the trained embedding)."""
    run = tmp_path / "run"
    res = run_cli(
        [
            "softmine.commands.train",
            "experiment=demo",
            "trainer.epochs=1",
            "trainer.device=cpu",
            "trainer.progress_bar=false",
            "trainer.plots=false",
            f"hydra.run.dir={run}",
        ],
        tmp_path,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    printed = _printed_table(res.stdout)
    printed["trained (OSM+CAA)"] = printed.pop("trained embedding")
    results = _results_script()
    rows = results.demo_text(results.demo_rows(run)).splitlines()[2:]
    read = {
        cells[0]: [float(c) for c in cells[1:]]
        for cells in ([c.strip() for c in row.strip("|").split("|")] for row in rows)
    }
    assert list(read) == ["raw pixels", "untrained network", "trained (OSM+CAA)"]
    assert read == printed


def _results_script() -> ModuleType:
    path = REPO / "scripts" / "results.py"
    spec = importlib.util.spec_from_file_location("results_script", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["demo", "fair"])
def test_readme_block_is_what_readme_mode_writes(name: str) -> None:
    results = _results_script()
    begin, end = results.readme_markers(name)
    text = (REPO / "README.md").read_text()
    assert begin in text and end in text, f"README.md lacks the {name} markers {begin} / {end}"
    block = text.split(begin, 1)[1].split(end, 1)[0]
    expected = results.readme_blocks(results.read_all())[name]
    assert block == f"\n{expected}\n", "README.md is stale: run python scripts/results.py --readme"


def test_every_generated_table_is_on_its_page() -> None:
    results = _results_script()
    assert (
        set(results.TABLES) - set(results.PENDING) <= set(results.read_all()) <= set(results.TABLES)
    )
    for doc, parts in results.DOCS.items():
        sections = results.generated_sections(doc)
        for names, section in zip(parts, sections, strict=True):
            have = list(results.read_sections(section))
            assert have == [n for n in names if n in have], doc.name
            assert set(names) - set(have) <= set(results.PENDING), doc.name


def test_write_doc_fills_each_section_and_keeps_the_prose_between(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = _results_script()
    page = tmp_path / "page.md"
    b, e = results.BEGIN, results.END
    page.write_text(f"intro 0.1234\n{b}\nold\n{e}\nmiddle\n{b}\n{e}\nend\n")
    monkeypatch.setattr(results, "DOCS", {page: (("a", "b"), ("c",))})
    results.write_doc(page, {"a": "A", "c": "C", "x": "X"})
    assert page.read_text() == (
        f"intro 0.1234\n{b}\n<!-- table: a -->\nA\n\n{e}\nmiddle\n"
        f"{b}\n<!-- table: c -->\nC\n\n{e}\nend\n"
    )
    assert results.read_all() == {"a": "A", "c": "C"}
    page.write_text(f"{b}\n{e}\n")
    with pytest.raises(SystemExit, match="1 generated section"):
        results.generated_sections(page)


def test_selection_tables_and_verdict_follow_the_run() -> None:
    results = _results_script()
    log = pd.DataFrame(
        {
            "iteration": [10, 20],
            "recall@1": [0.5, 0.6],
            "map@r": [0.3, 0.4],
            "val/recall@1": [0.9, 0.8],
            "val/map@r": [0.7, 0.6],
        }
    )
    metrics = {
        "map@r": 0.4,
        "val/map@r": 0.6,
        "selected/map@r": 0.3,
        "selected/val/map@r": 0.7,
        "selected_iteration": 10,
        "best_test/map@r": 0.4,
        "best_test/val/map@r": 0.6,
        "best_test_iteration": 20,
    }
    lines = results.selection_text(log, metrics).splitlines()
    assert lines[2] == "| 10 | 0.5000 | 0.3000 | 0.9000 | 0.7000 |"
    assert lines[3] == "| 20 | 0.6000 | 0.4000 | 0.8000 | 0.6000 |"
    assert lines[7] == "| final (last snapshot) | 20 | 0.4000 | 0.6000 |"
    assert lines[8] == "| selected (best `val/map@r`) | 10 | 0.3000 | 0.7000 |"
    assert lines[9] == "| best_test (best `map@r`, optimistic) | 20 | 0.4000 | 0.6000 |"
    assert "scores lower on the test classes than the last one" in lines[-1]
    metrics.update({"selected/map@r": 0.4, "selected/val/map@r": 0.6, "selected_iteration": 20})
    assert "chose the last snapshot" in results.selection_text(log, metrics)


def test_crossval_sentences_are_read_off_the_report_tables() -> None:
    from softmine.reporting.sweep_report import SweepReport, aggregate

    results = _results_script()
    folds = {  # fold -> val/map@r, map@r, selected/map@r, best_test/map@r
        0: (0.9, 0.6, 0.6, 0.6),
        1: (0.3, 0.4, 0.35, 0.4),
    }
    runs = pd.DataFrame(
        [
            {"run": f"r{f}", "dataset": "d", "seed": 0, "folds": 2, "fold": f, "status": "ok"}
            | dict(zip(("val/map@r", "map@r", "selected/map@r", "best_test/map@r"), v, strict=True))
            for f, v in folds.items()
        ]
    )
    runs.loc[0, "concat/map@r"] = 0.65  # the fold models together, on the fold-0 run
    table = aggregate(runs, ["map@r", "concat/map@r"])
    got = results.crossval_text(SweepReport(runs, table, "", []))
    assert got.startswith(
        "| dataset | n | map@r | concat/map@r |\n|---|---|---|---|\n"
        "| d | 2 | 0.5000 ± 0.1414 | 0.6500 |\n\n"
    )
    assert "| d | 0 | 1 | 0.3000 | 0.4000 | 0.3500 | 0.4000 |\n\n" in got
    assert "In some fold a chosen snapshot is not the last one." in got
    assert "score higher than the best of them alone" in got  # 0.65 > 0.60
    assert "not always higher on its validation classes" in got  # fold 1: 0.30 < 0.40


def test_the_demo_table_is_built_from_the_rows_of_the_run() -> None:
    results = _results_script()
    rows = {
        "raw pixels": {c: 0.5 for c in results.DEMO_COLUMNS},
        "trained (OSM+CAA)": {**{c: 0.25 for c in results.DEMO_COLUMNS}, "map@r": 0.123456},
    }
    lines = results.demo_text(rows).splitlines()
    assert lines[0] == "| | R@1 | R@2 | R@4 | R@8 | MAP@R | R-Precision | NMI |"
    assert lines[2] == "| raw pixels | " + " | ".join(["0.5000"] * 7) + " |"
    assert (
        lines[3]
        == "| trained (OSM+CAA) | "
        + " | ".join(["0.2500"] * 4 + ["0.1235"] + ["0.2500"] * 2)
        + " |"
    )


def test_the_readme_fair_block_is_the_table_with_its_source() -> None:
    results = _results_script()
    section = (
        "| loss | MAP@R |\n|---|---|\n| a | **0.9000 ± 0.0100** |\n"
        "\nFrom `make fair` (100 s); commit `abc1234`, torch 2."
    )
    got = results.fair_block(section, "docs/fair-benchmark.md")
    table, note = got.split("\n\n", 1)
    assert table == "| loss | MAP@R |\n|---|---|\n| a | **0.9000 ± 0.0100** |"
    assert "[docs/fair-benchmark.md](docs/fair-benchmark.md) (commit `abc1234`)" in note


@pytest.mark.parametrize(
    "page",
    [
        "results.md",
        "benchmarks-digits-pairs.md",
        "evaluation-protocols.md",
        "distributed.md",
        "fair-benchmark.md",
    ],
)
def test_prose_quotes_only_numbers_of_the_generated_tables(page: str) -> None:
    results = _results_script()
    tables = "\n".join(results.read_all().values())
    text = (REPO / "docs" / page).read_text()
    outside, inside = results.split_page(text)
    assert inside, f"docs/{page} has no generated section"
    prose = "".join(outside)
    stale = [n for n in re.findall(r"\b\d\.\d{4}\b", prose) if n not in tables]
    assert not stale, f"docs/{page} quotes {stale}, found in no generated table: update the prose"


def test_distributed_table_shows_what_the_page_says_of_it() -> None:
    """docs/distributed.md: the split run is the one-process run's experiment (same batch and
    steps, epoch-1 losses equal to float32 rounding); the defaults double the batch."""
    results = _results_script()
    table = results.read_all()["distributed"]
    rows = [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in table.splitlines()
        if line.startswith("| ") and not line.startswith("| run ")
    ]
    assert [r[0] for r in rows] == [name for name, _, _ in results.DISTRIBUTED_RUNS]
    assert [(int(r[1]), int(r[2])) for r in rows] == [(16, 112), (16, 112), (32, 56)]
    one, split, default = (float(r[3]) for r in rows)
    assert abs(one - split) < 1e-6 < abs(one - default)
    assert "torchrun --nproc_per_node=2 -m softmine.commands.train" in table


@pytest.mark.slow
def test_the_demo_gives_the_same_numbers_at_any_thread_count(tmp_path: Path) -> None:
    """`make demo` printed R@1 0.9922 / MAP@R 0.9808 on two cores where the README (one thread
    per run) says 0.9933 / 0.9797: the thread count changes the order of float sums. The demo
    pins its own count (trainer.num_threads), so the process's default no longer matters."""
    import torch

    from softmine.engine import Trainer
    from tests.conftest import compose

    short = ["trainer.max_iters=10", "trainer.baselines=false", "trainer.plots=false"]
    overrides = ["experiment=demo", "trainer.device=cpu", "trainer.progress_bar=false", *short]
    assert compose(overrides).trainer.num_threads == 1
    before = torch.get_num_threads()
    weights = []
    try:
        for threads in (2, 1):  # the default of a 2-core machine, and OMP_NUM_THREADS=1
            torch.set_num_threads(threads)
            Trainer(compose(overrides), tmp_path / str(threads)).fit()
            last = tmp_path / str(threads) / "checkpoints" / "last.pt"
            weights.append(torch.load(last, weights_only=True)["model"])
    finally:
        torch.set_num_threads(before)
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # bit for bit
