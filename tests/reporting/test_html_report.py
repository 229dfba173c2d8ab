"""report.html of a run and of a sweep: self-contained, and right when a real browser opens it.

The browser tests drive headless Chromium (``tests/headless_browser.py``); they are
skipped where none is installed (``.ci/run`` installs Debian's ``chromium``).
"""

from __future__ import annotations

import base64
import io
import json
import re
import statistics
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

from softmine.reporting.html import metric_groups, write_run_report
from softmine.reporting.sweep_report import report
from tests.conftest import run_cli
from tests.headless_browser import Browser, find_browser

BROWSER = find_browser()
needs_browser = pytest.mark.skipif(
    BROWSER is None,
    reason="no Chromium or Chrome on PATH (Debian: apt-get install chromium; or set "
    "SOFTMINE_CHROMIUM=/path/to/chrome); .ci/run installs it",
)


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 10), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png()

# What the metric table must show for each value of metrics.json (worked out here).
ROWS_JS = """[...document.querySelectorAll('table.metrics tr[data-key]')].map(
    r => [r.dataset.key, r.cells[1].innerText.trim(), JSON.parse(r.dataset.value)])"""


def _shown(value: float | int) -> str:
    return str(value) if isinstance(value, int) else f"{value:.4f}"


def _fake_run(folder: Path, metrics: dict) -> Path:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["loss=osm", "seed=1"]))
    config = {"seed": 1, "dataset": {"name": "digits"}, "loss": {"_target_": "X", "margin": 1.2}}
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "plots").mkdir()
    (folder / "plots" / "training_curves.png").write_bytes(PNG)
    pd.DataFrame({"iteration": [10, 20], "epoch": [0, 1], "map@r": [0.25, 0.5]}).to_csv(
        folder / "eval_log.csv", index=False
    )
    return folder


def test_metric_groups_split_by_prefix_and_keep_the_names() -> None:
    metrics = {
        "nmi": 0.3,
        "recall@8": 0.9,
        "recall@1": 0.5,
        "best_test_iteration": 250,
        "best_test/recall@1": 0.6,
        "selected/recall@1": 0.55,
        "selected_iteration": 500,
        "authors/cmc@1": 0.7,
        "map@r": 0.2,
    }
    groups = metric_groups(metrics)
    assert list(groups) == ["", "best_test", "selected", "authors"]
    assert list(groups[""]) == ["recall@1", "recall@8", "map@r", "nmi"]
    assert groups["best_test"] == {"best_test/recall@1": 0.6, "best_test_iteration": 250}
    assert groups["selected"] == {"selected/recall@1": 0.55, "selected_iteration": 500}
    assert groups["authors"] == {"authors/cmc@1": 0.7}


def test_run_page_is_self_contained(tmp_path: Path) -> None:
    run = _fake_run(tmp_path / "run", {"recall@1": 0.5, "map@r": 0.125})
    text = write_run_report(run).read_text()
    assert "<script" not in text and "<link" not in text and "@import" not in text
    sources = re.findall(r'src="([^"]*)"', text)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert base64.b64decode(sources[0].split(",", 1)[1]) == PNG  # the plot itself, inlined
    assert "margin: 1.2" in text and "loss=osm" in text  # the config and the overrides


def _check_page(browser: Browser, page: Path, shot: Path) -> None:
    """The page loaded with no error, asked for nothing outside itself, drew every image."""
    browser.open(page.as_uri())
    assert browser.errors() == []
    outside = [u for u in browser.requests() if u != page.as_uri() and not u.startswith("data:")]
    assert outside == []
    widths = browser.evaluate("[...document.images].map(i => i.complete && i.naturalWidth)")
    assert widths and all(w > 0 for w in widths)
    assert browser.screenshot(shot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_browser
def test_the_browser_check_sees_errors_and_outside_requests(tmp_path: Path) -> None:
    # A control: the same checks on a broken page must fail, or they prove nothing.
    page = tmp_path / "broken.html"
    page.write_text(
        '<!DOCTYPE html><html><body><img src="missing.png">'
        '<script>console.error("broken on purpose")</script></body></html>'
    )
    with Browser(BROWSER) as browser:
        browser.open(page.as_uri())
        assert any("broken on purpose" in e for e in browser.errors())
        assert (tmp_path / "missing.png").as_uri() in browser.requests()
        assert browser.evaluate("document.images[0].naturalWidth") == 0


@pytest.mark.slow
@needs_browser
def test_a_finished_run_writes_report_html_with_its_numbers(tmp_path: Path) -> None:
    # `make demo` shortened to 2 epochs: the same experiment, plots and baselines.
    run = tmp_path / "run"
    args = [
        "softmine.commands.train",
        "experiment=demo",
        "trainer.epochs=2",
        "trainer.progress_bar=false",
    ]
    proc = run_cli([*args, f"hydra.run.dir={run}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((run / "metrics.json").read_text())
    with Browser(BROWSER) as browser:
        _check_page(browser, run / "report.html", tmp_path / "report.png")
        rows = browser.evaluate(ROWS_JS)
        assert {key: (text, value) for key, text, value in rows} == {
            key: (_shown(value), value) for key, value in metrics.items()
        }
        baselines = browser.evaluate(
            "[...document.querySelectorAll('#baselines tbody tr')].map(r => r.cells[0].innerText)"
        )
        assert baselines == ["raw pixels", "untrained network", "trained embedding"]
        trained = browser.evaluate(
            "[...document.querySelectorAll('#baselines tbody tr')][2].innerText"
        )
        assert f"{metrics['recall@1']:.4f}" in trained and f"{metrics['nmi']:.4f}" in trained
        headings = browser.evaluate("[...document.querySelectorAll('h3')].map(h => h.innerText)")
    for plot in (
        "Training curves",
        "Recall@K",
        "Retrieval: random queries",
        "Retrieval: worst queries",
        "t-SNE of the test embeddings",
        "OSM pair weights",
        "Class-aware attention",
    ):
        assert plot in headings
    assert (tmp_path / "report.png").stat().st_size > 10_000


def _sweep(root: Path) -> Path:
    for job, (loss, seed, value) in enumerate(
        [("osm", 0, 0.4), ("osm", 1, 0.6), ("contrastive", 0, 0.3), ("contrastive", 1, 0.3)]
    ):
        folder = root / str(job)
        _fake_run(folder, {"map@r": value})
        (folder / ".hydra" / "overrides.yaml").write_text(
            yaml.safe_dump([f"loss={loss}", f"seed={seed}"])
        )
    return root


def test_sweep_page_has_the_table_and_links_to_the_runs(tmp_path: Path) -> None:
    sweep = _sweep(tmp_path / "sweep")
    _, _, written = report([sweep], run_plots=True)
    page = sweep / "report.html"
    assert page in written
    text = page.read_text()
    expected = f"{statistics.mean([0.4, 0.6]):.4f} ± {statistics.stdev([0.4, 0.6]):.4f}"
    assert expected == "0.5000 ± 0.1414" and expected in text
    assert text.count('href="0/report.html"') == 1  # each run's own page, written by --run-plots
    assert (sweep / "0" / "report.html").is_file()


@needs_browser
def test_sweep_page_in_the_browser(tmp_path: Path) -> None:
    sweep = _sweep(tmp_path / "sweep")
    report([sweep])
    with Browser(BROWSER) as browser:
        _check_page(browser, sweep / "report.html", tmp_path / "sweep.png")
        table = browser.evaluate(
            "[...document.querySelectorAll('#results tr')].map("
            "r => [...r.cells].map(c => c.innerText.trim()))"
        )
    assert table[0] == ["dataset", "loss", "n", "map@r"]
    assert table[1:] == [
        ["digits", "osm", "2", "0.5000 ± 0.1414"],
        ["digits", "contrastive", "2", "0.3000 ± 0.0000"],
    ]
