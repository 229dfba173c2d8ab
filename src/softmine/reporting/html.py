"""A run's or a sweep's results as one self-contained HTML page, ``report.html``.

The page needs nothing but a browser: styles are inline, every image is a PNG
inlined as a base64 ``data:`` URI, and it holds no script and no link to load,
so it opens offline, can be mailed, and shows the same thing in ten years.

* :func:`write_run_report` (called at the end of every run by
  :mod:`softmine.reporting.artifacts`): the metrics of ``metrics.json`` under the names
  they have there (the final ones, then each group such as ``best_test/*`` or
  ``selected/*``), the comparison with the baselines when the run measured them,
  the plots of ``<run>/plots/`` that exist (training curves, Recall@K or CMC,
  retrieval grids of random and of the worst queries, t-SNE, OSM weights,
  attention), every evaluation of ``eval_log.csv``, the overrides and the config.
* :func:`write_sweep_report` (called by ``softmine-report``): the table of
  :mod:`softmine.reporting.sweep_report`, one row per configuration with mean ± std over the
  seeds, its plots, and a link to each run's own ``report.html``.
"""

from __future__ import annotations

import base64
import html
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

import softmine
from softmine.evaluation import metric_names
from softmine.evaluation.metric_names import (
    BEST_TEST_PREFIX,
    DROPPED_PREFIX,
    RERANK_PREFIX,
    SELECTED_PREFIX,
)
from softmine.runs.layout import RUN_FILES, ReportLayout, RunLayout

MAX_EVAL_ROWS = 500  # eval_log.csv rows shown (the last ones when there are more)

#: The plots of one run, in page order: (file in the run folder, heading, what it shows).
RUN_PLOTS: tuple[tuple[Path, str, str], ...] = (
    (
        RUN_FILES.training_curves_plot,
        "Training curves",
        "Per epoch: the loss and its pieces, the mean OSM pair weights and attention, "
        "the learning rate (when it changes) and the test metrics.",
    ),
    (RUN_FILES.recall_plot, "Recall@K", "Recall@K of the test split against K."),
    (RUN_FILES.cmc_plot, "CMC", "Cumulative matching characteristic: rank-r accuracy against r."),
    (
        RUN_FILES.retrieval_grid_plot,
        "Retrieval: random queries",
        "Test queries drawn at random (blue) and their nearest neighbours, framed green "
        "(same class) or red (another class).",
    ),
    (
        RUN_FILES.retrieval_grid_worst_plot,
        "Retrieval: worst queries",
        "The test queries with the lowest average precision (AP@R, the per-query term "
        "of MAP@R) and their nearest neighbours.",
    ),
    (RUN_FILES.tsne_plot, "t-SNE of the test embeddings", "Coloured by class."),
    (
        RUN_FILES.osm_weights_plot,
        "OSM pair weights",
        "Online soft mining weight against pair distance, for the pairs of a sample of "
        "training embeddings.",
    ),
    (
        RUN_FILES.attention_plot,
        "Class-aware attention",
        "Distribution of the attention the loss gives the training samples (clean and "
        "flipped labels apart under label noise).",
    ),
)

#: What each group of ``metrics.json`` keys (``<group>/<metric>``) is.
GROUP_NOTES = {
    "": "At the end of training.",
    BEST_TEST_PREFIX.rstrip(
        "/"
    ): "The evaluation with the best trainer.monitor value, chosen ON THE TEST "
    "SPLIT (as the authors chose their reported snapshot): comparable with their numbers, "
    "not an unbiased estimate.",
    SELECTED_PREFIX.rstrip(
        "/"
    ): "The evaluation chosen by trainer.monitor on the validation split: its "
    "test metrics are the unbiased estimate.",
    RERANK_PREFIX.rstrip(
        "/"
    ): "The re-ID metrics after k-reciprocal re-ranking (evaluation.rerank, with "
    "evaluation.rerank_k1, rerank_k2, rerank_lambda), beside the plain ones.",
    DROPPED_PREFIX.rstrip("/"): "Evaluation items left out because their image could not be read "
    "(data.on_bad_image=skip), per split: the metrics are over the remaining items. The "
    f"files are listed in {RUN_FILES.bad_images}.",
}

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto;
       max-width: 1100px; padding: 0 1em; color: #1b1b1b; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.8em; }
h3 { font-size: 1.05em; margin-bottom: 0.3em; }
.meta, .note { color: #555; font-size: 0.92em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.92em; }
th, td { border: 1px solid #d0d0d0; padding: 0.25em 0.6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
thead th { background: #f2f4f7; }
tbody tr:nth-child(even) { background: #fafafa; }
figure { margin: 0.5em 0 1.5em; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
code { font-family: ui-monospace, Menlo, Consolas, monospace; }
nav a { margin-right: 1em; }
"""


# ----------------------------------------------------------------------------- pieces


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def format_value(value: Any) -> str:
    """How a metric shows on the page: floats with 4 decimals, integers as they are."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value.is_integer() and abs(value) >= 1000:
            return str(int(value))
        return f"{value:.4f}"
    return str(value)


def image_tag(path: str | Path, alt: str) -> str:
    """An ``<img>`` holding the PNG file inline as a base64 data URI."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{data}">'


def _figure(path: Path, heading: str, caption: str) -> str:
    return (
        f"<section><h3>{_esc(heading)}</h3><figure>{image_tag(path, heading)}"
        f"<figcaption>{_esc(caption)}</figcaption></figure></section>"
    )


def table_html(frame: pd.DataFrame, table_id: str | None = None, right: Sequence[str] = ()) -> str:
    """A plain HTML table of a DataFrame (no index).

    Numbers get 4 decimals (:func:`format_value`); they and the columns named in
    ``right`` are right-aligned.
    """
    ident = f' id="{_esc(table_id)}"' if table_id else ""
    head = "".join(f"<th>{_esc(c)}</th>" for c in frame.columns)
    rows = []
    for _, row in frame.iterrows():
        cells = []
        for column, value in row.items():
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if number and isinstance(value, float) and math.isnan(value):
                cells.append('<td class="num"></td>')
            elif number:
                cells.append(f'<td class="num">{_esc(format_value(value))}</td>')
            else:
                align = ' class="num"' if column in right else ""
                cells.append(f"<td{align}>{_esc(value)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _metric_order(key: str) -> tuple[int, int, str]:
    """Order of the metrics in a group: the families of :mod:`metric_names` first, by K."""
    return metric_names.rank(key.split("/", 1)[-1])


def metric_groups(metrics: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``metrics.json`` split by the part before ``/`` (``""`` for the final metrics).

    A key without ``/`` that starts with a group's name and ``_`` (``best_test_iteration``)
    goes to that group. Keys keep their full names; within a group Recall@K / CMC come
    first, by K, then MAP@R, R-Precision, mAP, NMI and the rest.
    """
    groups: dict[str, dict[str, Any]] = {"": {}}
    prefixes = {k.split("/", 1)[0] for k in metrics if "/" in k}
    for key, value in metrics.items():
        group = key.split("/", 1)[0] if "/" in key else ""
        if not group:
            group = next((p for p in sorted(prefixes) if key.startswith(p + "_")), "")
        groups.setdefault(group, {})[key] = value
    return {
        g: dict(sorted(m.items(), key=lambda kv: _metric_order(kv[0])))
        for g, m in groups.items()
        if m
    }


def metrics_html(metrics: Mapping[str, Any]) -> str:
    """One table per group of ``metrics.json``: the key exactly as in the file, and its value.

    Each row carries ``data-key`` (the key) and ``data-value`` (the full-precision value).
    """
    parts = []
    for group, values in metric_groups(metrics).items():
        title = "final" if not group else group
        note = GROUP_NOTES.get(group, f"The metrics named {group}/… in {RUN_FILES.metrics}.")
        rows = "".join(
            f'<tr data-key="{_esc(k)}" data-value="{_esc(json.dumps(v))}"><th><code>{_esc(k)}'
            f'</code></th><td class="num">{_esc(format_value(v))}</td></tr>'
            for k, v in values.items()
        )
        parts.append(
            f'<h3>{_esc(title)}</h3><p class="note">{_esc(note)}</p>'
            f'<table class="metrics" data-group="{_esc(group)}"><thead><tr><th>metric</th>'
            f"<th>value</th></tr></thead><tbody>{rows}</tbody></table>"
        )
    return "".join(parts)


def page(title: str, body: str) -> str:
    """A complete HTML document: inline styles, no script, nothing to load."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{STYLE}</style></head>\n"
        f"<body>\n{body}\n</body></html>\n"
    )


def _stamp() -> str:
    return f"softmine {softmine.__version__}, {time.strftime('%Y-%m-%d %H:%M:%S')}"


def _read_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text()) if path.is_file() else None


# ----------------------------------------------------------------------------- one run


def run_report_html(
    run_dir: str | Path,
    config: str | None = None,
    baselines: Mapping[str, Mapping[str, float]] | None = None,
) -> str:
    """The HTML page of a run folder, from the files in it.

    Args:
        run_dir: the run folder (``metrics.json``, ``plots/``, ``eval_log.csv``, ``.hydra/``).
        config: the run's config as YAML text; default: ``.hydra/config.yaml`` when present.
        baselines: name -> metrics of other embeddings measured in the same run (raw pixels,
            the untrained network), shown beside the trained one.
    """
    run = Path(run_dir)
    files = RunLayout(run)
    metrics = files.read_metrics() if files.metrics.is_file() else {}
    if config is None and files.config.is_file():
        config = files.config.read_text()
    cfg = yaml.safe_load(config) if config else {}
    cfg = cfg if isinstance(cfg, dict) else {}
    overrides = _read_yaml(files.overrides) or []

    def name_of(group: str) -> str:
        node = cfg.get(group) or {}
        return str(node.get("name") or node.get("_target_", "?")) if isinstance(node, dict) else "?"

    body = [f"<h1>softmine run: {_esc(run.name)}</h1>"]
    body.append(
        f'<p class="meta">Run folder <code>{_esc(run.resolve())}</code> · dataset '
        f"<code>{_esc(name_of('dataset'))}</code> · loss <code>{_esc(name_of('loss'))}</code>"
        f" · backbone <code>{_esc(name_of('backbone'))}</code> · seed "
        f"<code>{_esc(cfg.get('seed', '?'))}</code> · written by {_esc(_stamp())}</p>"
    )
    if overrides:
        items = " ".join(f"<code>{_esc(o)}</code>" for o in overrides)
        body.append(f'<p class="meta">Overrides: {items}</p>')
    plots = [(f, h, c) for f, h, c in RUN_PLOTS if (run / f).is_file()]
    nav = ['<a href="#metrics">Metrics</a>']
    nav += ['<a href="#plots">Plots</a>'] if plots else []
    nav += ['<a href="#evaluations">Evaluations</a>'] if files.eval_log.is_file() else []
    nav += ['<a href="#config">Config</a>']
    body.append(f"<nav>{''.join(nav)}</nav>")

    body.append('<h2 id="metrics">Metrics</h2>')
    if metrics:
        body.append(
            f'<p class="note">Every value of <code>{RUN_FILES.metrics}</code>, named as there.</p>'
        )
        body.append(metrics_html(metrics))
    else:
        body.append(f'<p class="note">No {RUN_FILES.metrics}: the run has not finished.</p>')
    if baselines:
        final = {k: v for k, v in metrics.items() if k in metric_groups(metrics)[""]}
        rows = {**baselines, "trained embedding": final}
        cols = list(dict.fromkeys(c for m in rows.values() for c in m))
        frame = pd.DataFrame(
            [{"embedding": n, **{c: m.get(c, math.nan) for c in cols}} for n, m in rows.items()]
        )
        body.append("<h3>Against baselines measured in the same run</h3>")
        body.append(table_html(frame, "baselines"))

    if plots:
        body.append('<h2 id="plots">Plots</h2>')
        body.extend(_figure(run / f, h, c) for f, h, c in plots)

    if files.eval_log.is_file():
        evals = pd.read_csv(files.eval_log)
        note = f"{len(evals)} evaluation(s), from {RUN_FILES.eval_log}"
        if len(evals) > MAX_EVAL_ROWS:
            evals = evals.tail(MAX_EVAL_ROWS)
            note += f" (the last {MAX_EVAL_ROWS} shown)"
        body.append('<h2 id="evaluations">Evaluations during training</h2>')
        body.append(f'<p class="note">{_esc(note)}.</p>{table_html(evals, "eval-log")}')

    body.append('<h2 id="config">Config</h2>')
    if config:
        body.append(f"<pre><code>{_esc(config)}</code></pre>")
    else:
        body.append(f'<p class="note">The config was not recorded (no {RUN_FILES.config}).</p>')
    return page(f"softmine run {run.name}", "\n".join(body))


def write_run_report(
    run_dir: str | Path,
    config: str | None = None,
    baselines: Mapping[str, Mapping[str, float]] | None = None,
) -> Path:
    """Write ``<run_dir>/report.html`` (see :func:`run_report_html`) atomically; returns its path."""
    path = RunLayout(run_dir).report
    _write(path, run_report_html(run_dir, config, baselines))
    return path


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# ----------------------------------------------------------------------------- a sweep


def sweep_report_html(
    table: pd.DataFrame,
    runs: pd.DataFrame,
    images: Sequence[str | Path],
    intro: Sequence[str],
    out: str | Path,
    right: Sequence[str] = (),
) -> str:
    """The HTML page of ``softmine-report``: its table, its plots and links to the runs.

    Args:
        table: the display table of :func:`softmine.reporting.sweep_report.display_table` (one row per
            configuration, metrics as ``mean ± std``).
        runs: one row per run (``run``, ``status``), as :func:`softmine.reporting.sweep_report.load_runs`.
        images: PNG files to inline, in order.
        intro: sentences shown above the table.
        out: the folder the page is written to (links to the runs are relative to it; a
            run's page that would be this page itself gets no link).
        right: columns to right-align (the metrics).
    """
    out = Path(out)
    body = ["<h1>softmine report</h1>", f'<p class="meta">Written by {_esc(_stamp())}</p>']
    body.extend(f"<p>{_esc(line)}</p>" for line in intro)
    body.append('<h2 id="table">Results</h2>')
    body.append(table_html(table, "results", right))
    pngs = [Path(p) for p in images if Path(p).suffix == ".png" and Path(p).is_file()]
    if pngs:
        body.append('<h2 id="plots">Plots</h2>')
        body.extend(_figure(p, p.stem.replace("_", " "), p.name) for p in pngs)
    body.append('<h2 id="runs">Runs</h2><ul>')
    itself = ReportLayout(out).html.resolve()
    for _, r in runs.iterrows():
        run = Path(r["run"])
        label = f"<code>{_esc(run)}</code> ({_esc(r['status'])})"
        page_file = RunLayout(run).report
        if page_file.is_file() and page_file.resolve() != itself:
            href = Path(_relative(page_file, out)).as_posix()
            label = f'<a href="{_esc(href)}">{label}</a>'
        body.append(f"<li>{label}</li>")
    body.append("</ul>")
    return page("softmine report", "\n".join(body))


def _relative(target: Path, start: Path) -> str:
    import os

    try:
        return os.path.relpath(target.resolve(), start.resolve())
    except ValueError:  # another drive (Windows)
        return target.resolve().as_uri()


def write_sweep_report(
    out: str | Path,
    table: pd.DataFrame,
    runs: pd.DataFrame,
    images: Sequence[str | Path],
    intro: Sequence[str],
    right: Sequence[str] = (),
) -> Path:
    """Write ``<out>/report.html`` (see :func:`sweep_report_html`); returns its path."""
    path = ReportLayout(out).html
    _write(path, sweep_report_html(table, runs, images, intro, out, right))
    return path
