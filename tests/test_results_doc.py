"""The results pages and the README say what the code gives.

* the demo table in docs/results.md is what the demo command prints today (within a stated
  tolerance);
* README.md's generated blocks are what ``scripts/results.py --readme`` writes from the docs'
  generated sections, so the README cannot drift from the docs.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

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
            "softmine.train",
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


def _results_script() -> ModuleType:
    path = REPO / "scripts" / "results.py"
    spec = importlib.util.spec_from_file_location("results_script", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["demo", "summary"])
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
    assert set(results.read_all()) == set(results.TABLES)


def test_summary_takes_map_at_r_and_n_per_loss_and_data_set() -> None:
    results = _results_script()
    digits = (
        "| loss | n | R@1 | MAP@R | NMI |\n|---|---|---|---|---|\n"
        "| a | 3 | 0.9000 ± 0.0100 | 0.8000 ± 0.0200 | 0.7000 ± 0.0300 |\n"
        "| b | 2 | **0.9500 ± 0.0100** | **0.8500 ± 0.0010** | 0.6000 ± 0.0300 |\n"
        "\nFrom x; commit `abc1234`, torch 2."
    )
    digits_demo = (
        "| | R@1 | MAP@R | NMI |\n|---|---|---|---|\n| untrained network | 0.1 | 0.2 | 0.3 |\n"
        "| raw pixels | 0.4 | 0.5437 | 0.6 |\n"
    )
    pairs = (
        "| loss | n | R@1 | MAP@R | R-Precision | NMI |\n|---|---|---|---|---|---|\n"
        "| a | 4 | 0.5 | **0.4000** | 0.3 | 0.2 |\n"
        "\nFrom y; commit `def5678` (with uncommitted changes), torch 2."
    )
    pairs_demo = "| | MAP@R | R@1 |\n|---|---|---|\n| raw pixels | 0.3494 | 0.9 |\n"
    got = results.summary_block(
        {"digits": (digits, digits_demo, "d.md"), "digits_pairs": (pairs, pairs_demo, "p.md")}
    )
    lines = got.splitlines()
    assert lines[0] == "| loss | digits MAP@R | n | digits_pairs MAP@R | n |"
    assert lines[2] == "| raw pixels (no training) | 0.5437 | – | 0.3494 | – |"
    assert lines[3] == "| a | 0.8000 ± 0.0200 | 3 | **0.4000** | 4 |"
    assert lines[4] == "| b | **0.8500 ± 0.0010** | 2 | – | – |"
    assert "digits: [d.md](d.md), commit `abc1234`" in got
    assert "digits_pairs: [p.md](p.md), commit `def5678`" in got


@pytest.mark.parametrize("page", ["results.md", "benchmarks-digits-pairs.md"])
def test_prose_quotes_only_numbers_of_the_generated_tables(page: str) -> None:
    results = _results_script()
    tables = "\n".join(results.read_all().values())
    text = (REPO / "docs" / page).read_text()
    prose = text.split(results.BEGIN, 1)[0] + text.split(results.END, 1)[1]
    stale = [n for n in re.findall(r"\b\d\.\d{4}\b", prose) if n not in tables]
    assert not stale, f"docs/{page} quotes {stale}, found in no generated table: update the prose"
