"""The sweep report: one table of finished runs, mean ± std over seeds, and its plots.

What ``softmine-report`` (:mod:`softmine.commands.report`) writes, as library functions.

Examples (the command)::

    softmine-report multirun/noise/2026-11-28_13-00-00        # a sweep folder
    softmine-report outputs/2026-11-28 multirun/ablation -o report/
    softmine-report multirun/noise/... --x dataset.label_noise --metrics map@r attention_auc

PATH is a run folder (it holds ``.hydra/``) or any folder above run folders (a
sweep, ``outputs/``); every run below it is read: its overrides
(``.hydra/overrides.yaml``), its dataset name and seed (``.hydra/config.yaml``)
and its ``metrics.json`` (a run without one is counted as failed).

Runs are grouped by the dataset and by the overrides whose values differ between
runs, except ``seed``, ``dataset.fold``, ``hydra.*`` and the bookkeeping keys that never
change a result (``resume``, ``resume_override``, ``trainer.device``,
``trainer.progress_bar``, ...: :data:`softmine.runs.folder.BOOKKEEPING_KEYS`): one
row per configuration with the number of runs ``n`` (seeds, times folds in a
cross-validation), and per metric the mean and the sample standard deviation (ddof = 1;
none for a single run). For a dataset the paper reports on (CUB, Cars196, MARS) a row
with the paper's numbers is added beside the measured ones.

Cross-validation (``dataset.folds=K``, a sweep over ``dataset.fold``): the K runs of one
configuration and seed are also scored together, their test embeddings concatenated
(:mod:`softmine.reporting.crossval`), as ``concat/<metric>`` (mean ± std over seeds), and a
second table lists every fold's model: its validation, final test and
validation-selected test metric.

Written to OUT (default: PATH when one folder is given, ``PATH/summary`` when that
folder is a run folder, else ``./report``): ``report.md`` (also printed),
``report.csv``, ``report.html`` (the table, the plots and a link to each run's own
report, in one self-contained page: :mod:`softmine.reporting.html`), and PNG plots.
OUT is never a run folder: the ``report.html`` there is the run's own page, written
by the run, and stays as it is (``-o RUN`` is refused). The plots: the main metric
against a numeric swept key with error bars, one line per configuration of the
other keys (or one bar per configuration when no numeric key varies: bars from zero,
error bars = std where a configuration has several runs), the same for
``attention_auc`` when runs have it, the mean training loss per epoch (losses with a
classification term and losses without one on separate axes: their values are on
different scales; the loss class declares it, :func:`softmine.losses.base.has_classification_term`), and the t-SNE
maps of the test embeddings that sweep jobs left to the report (``tsne.png``: one panel per
configuration, from the first run of it that kept ``plots/embedding_map.npz``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import yaml

from softmine.config import parse_override
from softmine.errors import ConfigError, DataError
from softmine.evaluation import metric_names
from softmine.evaluation.metric_names import BEST_TEST_PREFIX, CONCAT_PREFIX
from softmine.losses.base import has_classification_term
from softmine.reporting import html as html_report
from softmine.runs.folder import BOOKKEEPING_KEYS
from softmine.runs.layout import RUN_FILES, ReportLayout, RunLayout

#: Numbers reported by Wang et al. (AAAI 2019, Tables 2-4), as fractions.
REFERENCES: dict[str, dict[str, float]] = {
    "cub": {"recall@1": 0.553, "recall@2": 0.673, "recall@4": 0.775, "recall@8": 0.858},
    "cars196": {"recall@1": 0.742, "recall@2": 0.838, "recall@4": 0.902, "recall@8": 0.946},
    "mars": {"cmc@1": 0.847, "cmc@5": 0.941, "cmc@10": 0.957, "cmc@20": 0.970, "mAP": 0.724},
    "lpw": {"cmc@1": 0.717},
}
REFERENCE_SOURCE = "paper (Wang et al. 2019)"
MEASURED = "measured"
FOLD_KEY = "dataset.fold"
IGNORED = (
    "seed",
    FOLD_KEY,
    *BOOKKEEPING_KEYS,
)  # overrides never used for grouping (besides hydra.*)
#: Never metrics (``iteration``: the training step of a run's final metrics).
RUN_COLUMNS = {"run", "dataset", "seed", "status", "fold", "folds", "iteration", "loss_kind"}
#: The panels of the training-loss plot: a run's loss with a classification (cross-entropy)
#: term, without one, or of a class that does not say (``loss_kind`` of :func:`read_run`).
LOSS_KINDS = {
    True: "losses with a classification (CE) term",
    False: "losses without a classification term",
    None: "losses of unknown kind",
}
STATUS_OK, STATUS_FAILED = "ok", "failed"

if TYPE_CHECKING:
    from matplotlib.figure import Figure


# ----------------------------------------------------------------------------- reading runs


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Run folders (holding ``.hydra/overrides.yaml``) at or below each path, in path order."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise DataError(f"{path} does not exist; give a run folder or a sweep folder")
        if is_run_folder(path):
            runs = [path]
        else:
            pattern = RUN_FILES.overrides.as_posix()
            runs = sorted((p.parent.parent for p in path.rglob(pattern)), key=_natural_key)
        if not runs:
            raise DataError(
                f"no run folder under {path} (a run folder holds {RUN_FILES.overrides}, "
                "written by softmine-train)"
            )
        found.extend(r for r in runs if r not in found)
    return found


def is_run_folder(path: str | Path) -> bool:
    """Whether ``path`` is a run folder (it holds ``.hydra/overrides.yaml``)."""
    return RunLayout(path).overrides.is_file()


def output_folder(paths: Sequence[str | Path], out: str | Path | None) -> Path:
    """Where :func:`report` writes: ``out``, else the one folder given (``RUN/summary`` for a
    run folder), else ``./report``. A run folder is refused: its ``report.html`` is the run's own.
    """
    if out is None:
        if len(paths) == 1 and Path(paths[0]).is_dir():
            one = Path(paths[0])
            return RunLayout(one).summary if is_run_folder(one) else one
        return Path("report")
    if is_run_folder(out):
        raise ConfigError(
            f"-o {out} is a run folder, and its {RUN_FILES.report} is that run's own page; write "
            f"the report to another folder, e.g. -o {RunLayout(out).summary}"
        )
    return Path(out)


def _natural_key(path: Path) -> list[Any]:
    """Sort key that orders sweep job folders 0, 1, 2, ..., 10 (not 0, 1, 10, 2)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def _parse_overrides(items: Sequence[str]) -> dict[str, str]:
    return dict(parse_override(item) for item in items or [])


def read_run(run_dir: Path) -> dict[str, Any]:
    """One run as a flat dict: ``run``, ``status``, ``dataset``, ``seed``, ``loss_kind`` (a
    :data:`LOSS_KINDS` value, from its loss config), its overrides and metrics."""
    run_dir = Path(run_dir)
    files = RunLayout(run_dir)
    overrides = _parse_overrides(yaml.safe_load(files.overrides.read_text()))
    config_file = files.config
    config = yaml.safe_load(config_file.read_text()) if config_file.exists() else {}
    config = config or {}
    dataset_cfg = config.get("dataset") or {}
    dataset = dataset_cfg.get("name") or overrides.get("dataset", "")
    folds = int(dataset_cfg.get("folds") or 0)
    row: dict[str, Any] = {
        "run": str(run_dir),
        "dataset": str(dataset),
        "seed": overrides.get("seed", config.get("seed")),
        "folds": folds if folds else np.nan,
        "fold": int(dataset_cfg.get("fold") or 0) if folds else np.nan,
        "loss_kind": LOSS_KINDS[has_classification_term(config.get("loss") or {})],
    }
    row.update({f"override:{k}": v for k, v in overrides.items() if k != "seed"})
    if files.metrics.exists():
        row.update(files.read_metrics())
        row["status"] = STATUS_OK
    else:
        row["status"] = STATUS_FAILED
    return row


def load_runs(paths: Iterable[str | Path]) -> pd.DataFrame:
    """All runs at or below ``paths``, one row each (override columns are named ``override:KEY``)."""
    return pd.DataFrame([read_run(d) for d in find_run_dirs(paths)])


# ----------------------------------------------------------------------------- aggregation


def metric_columns(runs: pd.DataFrame) -> list[str]:
    """The numeric metric columns of ``runs``, known metrics first in a fixed order."""
    cols = [
        c
        for c in runs.columns
        if c not in RUN_COLUMNS
        and not str(c).startswith("override:")
        and pd.api.types.is_numeric_dtype(runs[c])
    ]
    known = metric_names.in_order(c for c in cols if metric_names.is_known(c))
    return known + [c for c in cols if c not in known]


def varying_keys(runs: pd.DataFrame, ignore: Iterable[str] = IGNORED) -> list[str]:
    """Override keys whose value differs between runs (a missing override counts as a value)."""
    ignore = set(ignore) | {"dataset"}  # the dataset name is its own column
    keys = []
    for col in runs.columns:
        if not str(col).startswith("override:"):
            continue
        key = col.split(":", 1)[1]
        if key in ignore or key.startswith("hydra."):
            continue
        if runs[col].fillna("\0").nunique() > 1:
            keys.append(key)
    return keys


def _as_number(values: pd.Series) -> pd.Series | None:
    """The series as floats if every non-missing value is a number, else None."""
    num = pd.to_numeric(values, errors="coerce")
    return num if num.notna().sum() == values.notna().sum() and values.notna().any() else None


def aggregate(
    runs: pd.DataFrame,
    metrics: Sequence[str] | None = None,
    ignore: Iterable[str] = IGNORED,
) -> pd.DataFrame:
    """One row per configuration: ``dataset``, the varying override keys, ``n``, ``seeds``,
    ``failed`` and ``<metric>_mean`` / ``<metric>_std`` (ddof = 1, NaN for one seed).

    Configurations keep the order of their first run; numeric keys sort ascending.
    """
    if runs.empty:
        raise DataError("no runs to report")
    metrics = list(metrics) if metrics is not None else metric_columns(runs)
    missing = [m for m in metrics if m not in runs]
    if missing:
        raise ConfigError(f"metric(s) {missing} are in no run; available: {metric_columns(runs)}")
    keys = varying_keys(runs, ignore)
    frame = runs.copy()
    cols = ["dataset"] + [f"override:{k}" for k in keys]
    for c in cols:
        frame[c] = frame[c].fillna("") if c in frame else ""
    rows = []
    for values, part in frame.groupby(cols, sort=False, dropna=False):
        values = values if isinstance(values, tuple) else (values,)
        ok = part[part["status"] == STATUS_OK]
        row: dict[str, Any] = dict(zip(["dataset", *keys], values, strict=True))
        row["source"] = MEASURED
        row["n"] = len(ok)
        row["seeds"] = ",".join(str(s) for s in dict.fromkeys(_sorted_seeds(ok["seed"])))
        if "fold" in ok and ok["fold"].notna().any():
            row["folds"] = ",".join(str(int(f)) for f in sorted(set(ok["fold"].dropna())))
        row["failed"] = int((part["status"] != STATUS_OK).sum())
        for m in metrics:
            vals = pd.to_numeric(ok[m], errors="coerce").dropna() if m in ok else pd.Series()
            row[f"{m}_mean"] = float(vals.mean()) if len(vals) else np.nan
            row[f"{m}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else np.nan
        rows.append(row)
    table = pd.DataFrame(rows)
    order = []
    for k in keys:
        num = _as_number(table[k].replace("", np.nan))
        if num is not None:
            table[k] = num
            order.append(k)
        else:
            first = {v: i for i, v in enumerate(dict.fromkeys(table[k]))}
            table[f"_order:{k}"] = table[k].map(first)
            order.append(f"_order:{k}")
    dataset_order = {v: i for i, v in enumerate(dict.fromkeys(table["dataset"]))}
    table["_order:dataset"] = table["dataset"].map(dataset_order)
    table = table.sort_values(["_order:dataset", *order], kind="stable")
    table = table.drop(columns=[c for c in table.columns if c.startswith("_order:")])
    table.attrs["keys"] = keys
    table.attrs["metrics"] = metrics
    return table.reset_index(drop=True)


def add_fold_ensembles(runs: pd.DataFrame) -> list[str]:
    """Score every complete cross-validation together: ``concat/<metric>`` on its fold-0 run.

    A cross-validation is the finished runs with ``dataset.folds=K`` that share the
    dataset, the seed and every override but ``dataset.fold``; it is complete when they
    are folds 0..K-1, once each. The test embeddings they saved are concatenated and
    scored with the first run's protocol (:func:`softmine.reporting.crossval.concatenated_metrics`).
    The values go on the fold-0 run only, so the mean and std over a configuration's
    rows are over seeds. Modifies ``runs`` in place; returns notes on incomplete sets.
    """
    from omegaconf import OmegaConf

    from softmine.reporting.crossval import concatenated_metrics

    if "fold" not in runs or runs["fold"].isna().all():
        return []
    ok = runs[(runs["status"] == STATUS_OK) & runs["fold"].notna()]
    keys = ["dataset", "seed"] + [
        c
        for c in runs.columns
        if str(c).startswith("override:")
        and c != f"override:{FOLD_KEY}"
        and not str(c).startswith("override:hydra.")
    ]
    frame = ok[keys].astype(str).fillna("")
    notes = []
    for _, group in ok.groupby([frame[k] for k in keys], sort=False):
        group = group.sort_values("fold")
        k = int(group["folds"].iloc[0])
        folds = [int(f) for f in group["fold"]]
        where = f"{group['run'].iloc[0]} and {len(group) - 1} more"
        if folds != list(range(k)) or group["folds"].nunique() > 1:
            notes.append(f"{where}: folds {folds} of K={k}, not 0..{k - 1} once each; no concat/*")
            continue
        cfg = OmegaConf.load(RunLayout(group["run"].iloc[0]).config)
        try:
            metrics = concatenated_metrics(list(group["run"]), cfg)
        except DataError as e:
            notes.append(f"{where}: {e}; no concat/*")
            continue
        for m, v in metrics.items():
            runs.loc[group.index[0], CONCAT_PREFIX + m] = v
    return notes


def fold_table(runs: pd.DataFrame, ignore: Iterable[str] = IGNORED) -> str:
    """Markdown: one row per fold model, with its validation, final test and selected test metric."""
    if "fold" not in runs or runs["fold"].isna().all():
        return ""
    ok = runs[(runs["status"] == STATUS_OK) & runs["fold"].notna()]
    keys = varying_keys(runs, ignore)
    main = metric_names.main_metric(ok.columns)
    snapshots = (metric_names.VAL_PREFIX, "", metric_names.SELECTED_PREFIX, BEST_TEST_PREFIX)
    cols = [c for c in (f"{p}{main}" for p in snapshots) if c in ok]
    head = ["dataset", *keys, "seed", "fold", *cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for _, r in ok.iterrows():
        cells = [str(r["dataset"])] + [_fmt_key(r.get(f"override:{k}", "")) for k in keys]
        cells += [str(r["seed"]), str(int(r["fold"]))]
        cells += [_fmt(float(r[c]), np.nan) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _sorted_seeds(seeds: pd.Series) -> list[Any]:
    num = _as_number(seeds)
    if num is not None:
        return sorted(int(s) if float(s).is_integer() else s for s in num.dropna())
    return sorted(str(s) for s in seeds.dropna())


def with_references(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` plus, after the rows of each dataset in :data:`REFERENCES`, a row of the paper's numbers."""
    keys, metrics = table.attrs.get("keys", []), table.attrs.get("metrics", [])
    parts = []
    for name, part in table.groupby("dataset", sort=False):
        parts.append(part)
        ref = REFERENCES.get(str(name))
        shared = [m for m in metrics if ref and m in ref]
        if shared:
            row: dict[str, Any] = {"dataset": name, "source": REFERENCE_SOURCE}
            row.update({k: "" for k in keys})
            row.update({f"{m}_mean": ref[m] for m in shared})
            parts.append(pd.DataFrame([row]))
    out = pd.concat(parts, ignore_index=True)
    out.attrs.update(table.attrs)
    return out


# ----------------------------------------------------------------------------- formatting


def _fmt(mean: float, std: float) -> str:
    if not np.isfinite(mean):
        return "–"
    return f"{mean:.4f}" if not np.isfinite(std) else f"{mean:.4f} ± {std:.4f}"


def _fmt_key(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}" if np.isfinite(value) else ""
    return str(value)


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """The table as shown: configuration columns, ``n``, then ``mean ± std`` per metric (strings)."""
    keys, metrics = table.attrs.get("keys", []), table.attrs.get("metrics", [])
    show_source = "source" in table and (table["source"] != MEASURED).any()
    show_failed = "failed" in table and table["failed"].fillna(0).astype(int).gt(0).any()
    head = ["dataset", *keys] + (["source"] if show_source else []) + ["n"]
    head += ["failed"] if show_failed else []
    head += list(metrics)
    rows = []
    for _, r in table.iterrows():
        cells = [_fmt_key(r["dataset"])] + [_fmt_key(r[k]) for k in keys]
        if show_source:
            cells.append(str(r["source"]))
        cells.append("" if pd.isna(r.get("n")) else str(int(r["n"])))
        if show_failed:
            cells.append("" if pd.isna(r.get("failed")) else str(int(r["failed"])))
        cells += [_fmt(r.get(f"{m}_mean", np.nan), r.get(f"{m}_std", np.nan)) for m in metrics]
        rows.append(cells)
    return pd.DataFrame(rows, columns=head)


def to_markdown(table: pd.DataFrame) -> str:
    """The table in Markdown: configuration columns, ``n``, then ``mean ± std`` per metric."""
    shown = display_table(table)
    head = list(shown.columns)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in shown.itertuples(index=False)]
    return "\n".join(lines)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def _config_label(table: pd.DataFrame, keys: Sequence[str]) -> pd.Series:
    """A readable name per row from the given key columns (and the dataset when it varies)."""
    cols = list(keys)
    if table["dataset"].nunique() > 1:
        cols = ["dataset", *cols]
    if not cols:
        return pd.Series(["all runs"] * len(table), index=table.index)
    return table[cols].apply(
        lambda r: ", ".join(
            _fmt_key(r[c]) if len(cols) == 1 else f"{c}={_fmt_key(r[c])}" for c in cols
        ),
        axis=1,
    )


# ----------------------------------------------------------------------------- plots


def numeric_key(table: pd.DataFrame) -> str | None:
    """The first varying override key whose values are all numbers (the natural x axis)."""
    for k in table.attrs.get("keys", []):
        if pd.api.types.is_numeric_dtype(table[k]) and table[k].nunique() > 1:
            return k
    return None


def plot_table(table: pd.DataFrame, out: Path, metric: str, x: str | None = None) -> Path | None:
    """``metric`` against the numeric key ``x`` (one line per other configuration, error bars = std),
    or one bar per configuration when there is no numeric key. None if the metric has no value."""
    from softmine.reporting import plots

    measured = table[table["source"] == MEASURED]
    mean, std = f"{metric}_mean", f"{metric}_std"
    if mean not in measured or measured[mean].notna().sum() == 0:
        return None
    measured = measured[measured[mean].notna()]
    keys = table.attrs.get("keys", [])
    x = x or numeric_key(table)
    if x is not None:
        if x not in keys:
            raise ConfigError(f"--x {x} is not an override that varies; choose one of {keys}")
        others = [k for k in keys if k != x]
        data = measured.assign(_line=_config_label(measured, others))
        return plots.plot_metric_lines(
            data,
            x,
            mean,
            ReportLayout(out).plot(f"{_slug(metric)}_vs_{_slug(x)}"),
            line="_line",
            err=std,
            ylabel=f"{metric} (mean ± std over seeds)",
            title=f"{metric} against {x}",
        )
    names = _config_label(measured, keys)
    return plots.plot_metric_bars(
        list(names),
        measured[mean].to_numpy(),
        measured[std].to_numpy(),
        ReportLayout(out).plot(_slug(metric)),
        ylabel=f"{metric} (mean ± std over seeds)",
        title=f"{metric} per configuration",
    )


def _run_configs(runs: pd.DataFrame, table: pd.DataFrame) -> tuple[pd.DataFrame, pd.Series]:
    """The finished runs and the name of each one's configuration (as the table's rows)."""
    keys = table.attrs.get("keys", [])
    ok = runs[runs["status"] == STATUS_OK]
    keyed = pd.DataFrame({"dataset": ok["dataset"]}, index=ok.index)
    for k in keys:
        col = ok.get(f"override:{k}", pd.Series("", index=ok.index)).fillna("")
        num = _as_number(col.replace("", np.nan))
        keyed[k] = col if num is None else num
    return ok, _config_label(keyed, keys)


def plot_embedding_maps(runs: pd.DataFrame, table: pd.DataFrame, out: Path) -> Path | None:
    """The t-SNE maps sweep jobs left to the report: one panel per configuration, drawn from the
    first of its runs that kept ``plots/embedding_map.npz``. None when no run kept one."""
    from softmine.reporting import plots

    ok, names = _run_configs(runs, table)
    panels: dict[str, Path] = {}
    for i, run in ok.iterrows():
        sample = RunLayout(run["run"]).map_sample
        if names[i] not in panels and sample.exists():
            panels[names[i]] = sample
    if not panels:
        return None
    return plots.plot_saved_tsne_panels(list(panels.items()), ReportLayout(out).tsne_plot)


def training_loss_figure(runs: pd.DataFrame, table: pd.DataFrame) -> Figure | None:
    """Mean training loss per epoch of each configuration (std over seeds as error bars), one
    axes per kind of loss (:data:`LOSS_KINDS`) among the runs. None without training logs."""
    from softmine.reporting import plots

    ok, names = _run_configs(runs, table)
    if ok.empty:
        return None
    frames = []
    for i, run in ok.iterrows():
        log_file = RunLayout(run["run"]).train_log
        if not log_file.exists():
            continue
        log = pd.read_csv(log_file)
        if "loss" not in log or "epoch" not in log:
            continue
        if "epoch_time_s" in log:
            log = log[log["epoch_time_s"].notna()]
        kind = run.get("loss_kind", LOSS_KINDS[None])
        frames.append(
            pd.DataFrame(
                {"epoch": log["epoch"], "value": log["loss"], "line": names[i], "kind": kind}
            )
        )
    if not frames:
        return None
    curves = (
        pd.concat(frames, ignore_index=True)
        .groupby(["kind", "line", "epoch"], sort=False)["value"]
        .agg(loss_mean="mean", loss_std="std")
        .reset_index()
    )
    return plots.metric_lines_figure(
        curves,
        "epoch",
        "loss_mean",
        line="line",
        err="loss_std",
        panel="kind",
        ylabel="training loss (mean ± std over seeds)",
        title="training loss per epoch",
    )


def plot_training_loss(runs: pd.DataFrame, table: pd.DataFrame, out: Path) -> Path | None:
    """:func:`training_loss_figure` written to the report folder ``out``."""
    from softmine.reporting import plots

    fig = training_loss_figure(runs, table)
    return None if fig is None else plots.save_figure(fig, ReportLayout(out).training_loss_plot)


def plot_runs(runs: pd.DataFrame) -> int:
    """Per-run plots from the files a run leaves (train_log.csv, attention.csv, the embeddings of
    the t-SNE map a sweep job left to the report) where missing.

    A run whose plots were redrawn, or which has no ``report.html``, gets its page
    (re)written. Returns the number of files written.
    """
    from softmine.reporting import plots

    drawn = 0
    for run_dir in runs["run"]:
        files = RunLayout(run_dir)
        before = drawn
        if files.train_log.exists() and not files.training_curves_plot.exists():
            plots.plot_training_curves(pd.read_csv(files.train_log), files.training_curves_plot)
            drawn += 1
        if files.attention.exists() and not files.attention_plot.exists():
            a = pd.read_csv(files.attention)
            plots.plot_attention(a["attention"], files.attention_plot, a["flipped"])
            drawn += 1
        if files.map_sample.exists() and not files.tsne_plot.exists():
            plots.plot_saved_tsne(files.map_sample, files.tsne_plot)
            drawn += 1
        if drawn > before or not files.report.exists():
            html_report.write_run_report(run_dir)
            drawn += 1
    return drawn


# ----------------------------------------------------------------------------- the report


def plot_metric(metrics: Sequence[str]) -> str | None:
    """The metric the plots show: the main one (:func:`metric_names.main_metric`), else the first."""
    return metric_names.main_metric(metrics) or (metrics[0] if metrics else None)


@dataclass
class SweepReport:
    """What :func:`write_report` read and wrote."""

    runs: pd.DataFrame  # one row per run (:func:`load_runs`), ``concat/*`` on fold-0 runs
    table: pd.DataFrame  # one row per configuration and the paper's rows (with_references)
    markdown: str  # the text of report.md
    written: list[Path]  # report.md, report.csv, report.html, then the plots


def report(
    paths: Sequence[str | Path],
    out: str | Path | None = None,
    metrics: Sequence[str] | None = None,
    x: str | None = None,
    ignore: Iterable[str] = IGNORED,
    run_plots: bool = False,
) -> tuple[pd.DataFrame, str, list[Path]]:
    """Read, aggregate, write ``report.md`` / ``report.csv`` and the plots into ``out``.

    Returns ``(table with reference rows, markdown, written files)``; :func:`write_report`
    returns the runs too.
    """
    done = write_report(paths, out, metrics, x, ignore, run_plots)
    return done.table, done.markdown, done.written


def write_report(
    paths: Sequence[str | Path],
    out: str | Path | None = None,
    metrics: Sequence[str] | None = None,
    x: str | None = None,
    ignore: Iterable[str] = IGNORED,
    run_plots: bool = False,
) -> SweepReport:
    """:func:`report`, returning every part of it: the runs, the table, report.md's text, the files."""
    out = output_folder(paths, out)
    runs = load_runs(paths)
    notes = add_fold_ensembles(runs)
    table = with_references(aggregate(runs, metrics, ignore))
    out.mkdir(parents=True, exist_ok=True)
    used = table.attrs["metrics"]
    n_ok = int((runs["status"] == STATUS_OK).sum())
    lines = [
        "# softmine report",
        "",
        f"{n_ok} finished run(s)"
        + (f", {len(runs) - n_ok} failed" if n_ok < len(runs) else "")
        + f" from {', '.join(str(p) for p in paths)}.",
        "Each row: one configuration; n = number of runs (seeds, times folds in a "
        "cross-validation); values are mean ± sample standard deviation over them (no ± for "
        "one run).",
    ]
    if (table["source"] != MEASURED).any():
        lines.append(
            f"Rows marked `{REFERENCE_SOURCE}` are the numbers the paper reports, not runs."
        )
    if any(c.startswith(CONCAT_PREFIX) for c in used):
        lines.append(
            f"`{CONCAT_PREFIX}*`: test metrics of the K fold models together (their L2-normalised "
            "test embeddings concatenated), mean ± std over seeds."
        )
    if any(c.startswith(metric_names.SELECTED_PREFIX) for c in used):
        lines.append(
            f"`{metric_names.VAL_PREFIX}*`: held-out training classes; "
            f"`{metric_names.SELECTED_PREFIX}*`: test metrics of the snapshot chosen on them; "
            f"`{BEST_TEST_PREFIX}*`: of the snapshot chosen on the test split (optimistic)."
        )
    folds_md = fold_table(runs, ignore)
    extra = ["## Cross-validation folds", "", folds_md, ""] if folds_md else []
    extra += [f"Note: {n}" for n in notes]
    markdown = "\n".join([*lines, "", to_markdown(table), "", *extra])
    written = [ReportLayout(out).markdown, ReportLayout(out).table]
    written[0].write_text(markdown)
    table.to_csv(written[1], index=False)
    plot_metrics = [m for m in (plot_metric(used), metric_names.ATTENTION_AUC) if m in used]
    for m in dict.fromkeys(plot_metrics):
        path = plot_table(table, out, m, x)
        if path is not None:
            written.append(path)
    loss_plot = plot_training_loss(runs, table, out)
    if loss_plot is not None:
        written.append(loss_plot)
    maps = plot_embedding_maps(runs, table, out)
    if maps is not None:
        written.append(maps)
    if run_plots:
        plot_runs(runs)
    intro = [ln for ln in lines[2:] if ln]
    html_file = html_report.write_sweep_report(
        out, display_table(table), runs, written[2:], intro, right=used
    )
    written.insert(2, html_file)
    return SweepReport(runs, table, markdown, written)
