"""The fair benchmark's table: every loss with its tuned setting over seeds, and what "wins" means.

``make fair`` (:mod:`softmine.commands.fair`) trains the sweep; :func:`table` reads that
sweep's run folders (``metrics.json``, ``eval_log.csv``,
``.hydra/overrides.yaml``), never printed output, and writes ``fair.md``, ``fair.csv`` and
``val_curves.png`` there. Per loss:

* MAP@R, R@1 and R-Precision on the test classes: mean ± sample std over seeds;
* ``mirror_confusion`` (digits_pairs): the share of top-R mistakes that are the mirrored
  class, mean over seeds (0 means the network tells left from right);
* against the loss with the best mean MAP@R: the mean of the per-seed differences in
  MAP@R (paired by seed) with a 95 % bootstrap interval (percentile, 10,000 resamples,
  seeded): an interval that excludes 0 is a difference the seeds support;
* ``still rising``: in how many of its runs the validation curve (``val/map@r`` at each
  evaluation) was still rising at the end of the budget. A curve is *rising* when the
  best value among its last 20 % of evaluations (at least one) exceeds the best value
  before them by more than :data:`RISE_TOLERANCE`. The loss is flagged when that holds
  for at least half its runs: its tuned length may be too short.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from softmine.config import parse_override
from softmine.errors import DataError
from softmine.evaluation.metric_names import MAP_AT_R, R_PRECISION, RECALL, VAL_PREFIX, labels
from softmine.runs.layout import RUN_FILES, SWEEP_FILES, RunLayout, SweepLayout

#: The losses of the fair benchmark (issue 23), in table order.
LOSSES = (
    "contrastive",
    "contrastive_hard",
    "osm",
    "caa",
    "osm_caa",
    "triplet_batchhard",
    "triplet_semihard",
    "multi_similarity",
    "proxy_anchor",
    "normsoftmax",
    "lifted",
)
#: Issue 27's baselines: each has its search space (configs/hparams_search/<loss>.yaml), no
#: tuned setting is committed yet; `make tune LOSS=<name>` writes it, then
#: `make fair ARGS="--losses <names>"` trains them. The table lists them after LOSSES.
BASELINES = ("cosface", "arcface", "subcenter_arcface", "softtriple", "circle")
TAIL = 0.2  # the last fraction of a curve's evaluations that "still rising" looks at
RISE_TOLERANCE = 0.005  # MAP@R: how much the tail's best must beat the best before it
BOOTSTRAP_RESAMPLES = 10_000
METRICS = labels((MAP_AT_R, RECALL + "1", R_PRECISION))  # the table's metrics and titles
CURVE = VAL_PREFIX + MAP_AT_R


def still_rising(values: Sequence[float], tail: float = TAIL, tol: float = RISE_TOLERANCE) -> bool:
    """Whether a validation curve was still rising at its end (see the module docstring).

    ``values``: the metric at each evaluation, in order. A curve of fewer than two
    evaluations is not judged (False).
    """
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if len(v) < 2:
        return False
    n_tail = max(1, math.ceil(tail * len(v)))
    n_tail = min(n_tail, len(v) - 1)
    return bool(v[-n_tail:].max() > v[:-n_tail].max() + tol)


def paired_interval(
    diffs: Sequence[float], seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES
) -> tuple[float, float, float]:
    """(mean, low, high): the mean of paired differences and its 95 % percentile bootstrap interval.

    Resamples the differences with replacement (numpy, seeded). With one difference, or
    all equal, the interval is that value.
    """
    d = np.asarray(diffs, dtype=float)
    if len(d) == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(d.mean()), float(low), float(high)


def read_runs(sweep: Path) -> pd.DataFrame:
    """One row per run folder under ``sweep``: loss, seed, status, the final test metrics,
    ``mirror_confusion`` and whether its validation curve was still rising."""
    rows = []
    for overrides_file in sorted(Path(sweep).rglob(RUN_FILES.overrides.as_posix())):
        run = overrides_file.parent.parent
        overrides = dict(parse_override(o) for o in yaml.safe_load(overrides_file.read_text()))
        row: dict = {"run": str(run), "loss": overrides.get("loss"), "seed": overrides.get("seed")}
        files = RunLayout(run)
        metrics_file, log_file = files.metrics, files.eval_log
        row["status"] = "ok" if metrics_file.exists() else "failed"
        if metrics_file.exists():
            metrics = files.read_metrics()
            row.update({k: metrics.get(k, math.nan) for k in [*METRICS, "mirror_confusion"]})
        if log_file.exists():
            log = pd.read_csv(log_file)
            curve = log[CURVE].tolist() if CURVE in log else []
            row["evaluations"] = len(curve)
            row["rising"] = still_rising(curve)
        rows.append(row)
    if not rows:
        raise DataError(f"no run folder under {sweep} (a run folder holds {RUN_FILES.overrides})")
    frame = pd.DataFrame(rows)
    frame["seed"] = pd.to_numeric(frame["seed"], errors="coerce")
    return frame


def _fmt(values: pd.Series) -> str:
    v = values.dropna()
    if v.empty:
        return "–"
    return f"{v.mean():.4f}" if len(v) == 1 else f"{v.mean():.4f} ± {v.std(ddof=1):.4f}"


def summarize(runs: pd.DataFrame, order: Sequence[str] = LOSSES + BASELINES) -> pd.DataFrame:
    """The table's rows: one per loss (``order`` first), the best loss's MAP@R as the reference."""
    ok = runs[runs["status"] == "ok"]
    if ok.empty:
        raise DataError(
            f"no finished run to tabulate (every run failed; see the sweep's {SWEEP_FILES.summary})"
        )
    losses = [x for x in order if x in set(ok["loss"])] + sorted(set(ok["loss"]) - set(order))
    means = ok.groupby("loss")[MAP_AT_R].mean()
    best = str(means.idxmax())
    by_seed = ok.pivot_table(index="seed", columns="loss", values=MAP_AT_R, aggfunc="first")
    out = []
    for loss in losses:
        part = ok[ok["loss"] == loss]
        row: dict = {
            "loss": loss,
            "n": len(part),
            "failed": int((runs["loss"] == loss).sum()) - len(part),
        }
        for m, name in METRICS.items():
            row[name] = _fmt(part[m])
            row[f"{m}_mean"] = float(part[m].mean())
        mirror = part.get("mirror_confusion", pd.Series(dtype=float)).dropna()
        row["mirror confusion"] = f"{mirror.mean():.3f}" if len(mirror) else "–"
        if loss == best:
            row["ΔMAP@R vs best [95% CI]"] = "best"
        else:
            both = by_seed[[loss, best]].dropna()
            mean, low, high = paired_interval((both[loss] - both[best]).to_numpy())
            row["ΔMAP@R vs best [95% CI]"] = (
                f"{mean:+.4f} [{low:+.4f}, {high:+.4f}] (n={len(both)})" if len(both) else "–"
            )
        rising = part["rising"].fillna(False).astype(bool) if "rising" in part else pd.Series()
        k = int(rising.sum())
        row["still rising"] = f"{'yes' if k and 2 * k >= len(part) else 'no'} ({k}/{len(part)})"
        out.append(row)
    return pd.DataFrame(out)


SHOWN = [
    "loss",
    "n",
    "MAP@R",
    "R@1",
    "R-Precision",
    "mirror confusion",
    "ΔMAP@R vs best [95% CI]",
    "still rising",
]


def to_markdown(table: pd.DataFrame) -> str:
    """The table as Markdown (mean ± sample std over seeds); bold: the best mean MAP@R."""
    best = table[f"{MAP_AT_R}_mean"].max()
    lines = ["| " + " | ".join(SHOWN) + " |", "|" + "---|" * len(SHOWN)]
    for _, r in table.iterrows():
        cells = [str(r[c]) for c in SHOWN]
        if r[f"{MAP_AT_R}_mean"] == best:
            cells[2] = f"**{cells[2]}**"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(runs: pd.DataFrame, out: Path) -> Path | None:
    """Mean validation curve (``val/map@r`` per evaluation, std over seeds) of each loss."""
    from softmine.reporting import plots

    frames = []
    for _, r in runs[runs["status"] == "ok"].iterrows():
        log = RunLayout(r["run"]).eval_log
        if log.exists():
            curve = pd.read_csv(log)
            if CURVE in curve:
                frames.append(
                    pd.DataFrame(
                        {"epoch": curve["epoch"], "value": curve[CURVE], "loss": r["loss"]}
                    )
                )
    if not frames:
        return None
    curves = (
        pd.concat(frames)
        .groupby(["loss", "epoch"], sort=False)["value"]
        .agg(mean="mean", std="std")
        .reset_index()
    )
    return plots.plot_metric_lines(
        curves, "epoch", "mean", out, line="loss", err="std",
        ylabel=f"{CURVE} (mean ± std over seeds)", title="validation curves of the tuned runs",
    )  # fmt: skip


def table(sweep: Path) -> tuple[str, pd.DataFrame]:
    """Read the sweep, write ``fair.md``, ``fair.csv`` and ``val_curves.png`` into it; the Markdown."""
    sweep = Path(sweep)
    runs = read_runs(sweep)
    summary = summarize(runs)
    text = to_markdown(summary)
    note = (
        f"{run_counts(runs)} from {sweep}. Mean ± sample std over seeds; ΔMAP@R: the mean "
        f"per-seed difference from the best loss with a 95 % bootstrap interval; still rising: "
        f"runs whose {CURVE} "
        f"was still rising at the end (best of the last {TAIL:.0%} of evaluations above the best "
        f"before by > {RISE_TOLERANCE}); yes when at least half are."
    )
    files = SweepLayout(sweep)
    files.fair_markdown.write_text(f"{text}\n\n{note}\n")
    summary.to_csv(files.fair_table, index=False)
    plot_curves(runs, files.val_curves)
    return f"{text}\n\n{note}", summary


def run_counts(runs: pd.DataFrame) -> str:
    """``N runs`` and, when some failed, ``, K failed (not in the table)``: the runs behind a table."""
    failed = int((runs["status"] != "ok").sum())
    return f"{len(runs) - failed} runs" + (
        f", {failed} failed (not in the table)" if failed else ""
    )
