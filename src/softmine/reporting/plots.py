"""Plots of one run and of a set of runs, written as PNG files.

Each function takes plain arrays or tables, draws one figure with matplotlib's
object API (``matplotlib.figure.Figure``: no pyplot, no display, the caller's
backend is left alone) and writes it to ``path``, which it returns.

One run (end of training, :mod:`softmine.reporting.artifacts`): training curves,
Recall@K against K, a retrieval grid, a t-SNE map of the test embeddings, OSM
weight against pair distance and the CAA attention distribution. Several runs
(:mod:`softmine.reporting.sweep_report`): a metric against a swept value (one line per
configuration, error bars = std over seeds) or one bar per configuration.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from softmine.evaluation.metric_names import is_metric

DPI = 100
LOSS_COLUMNS = ("loss", "l_pos", "l_neg", "ce", "frame_ce", "memory_loss")
WEIGHT_COLUMNS = ("osm_weight_pos", "osm_weight_neg", "attention")
CORRECT, WRONG, QUERY = "#1a9641", "#d7191c", "#2b83ba"


def _figure(
    width: float,
    height: float,
    *,
    left: float = 0.8,
    bottom: float = 0.55,
    right: float = 0.15,
    top: float = 0.35,
    wspace: float = 0.6,
    panels: int = 1,
) -> Figure:
    """A figure of ``width`` x ``height`` inches whose axes leave fixed margins (inches).

    Fixed margins instead of a layout engine: the constrained layout measures every text
    of the figure on an extra draw, half of a run's plotting time (measured on the demo's
    per-run figures: 0.75 s -> 0.42 s). ``top``: room for the title (0.2 in a line);
    ``wspace``: between the ``panels`` of a row.
    """
    axis_width = (width - left - right - (panels - 1) * wspace) / panels
    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(
        left=left / width,
        right=1.0 - right / width,
        bottom=bottom / height,
        top=1.0 - top / height,
        wspace=wspace / axis_width,
    )
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write a figure of this module's ``*_figure`` functions to ``path`` as PNG; returns ``path``."""
    return _save(fig, path)


#: Class names longer than this are shortened (with an ellipsis) under a grid tile.
MAX_NAME = 18


def class_name(label: object, class_names: Sequence[str] | None, limit: int | None = None) -> str:
    """How a label shows on a plot: its class name when the data name their classes, else the label.

    ``class_names[label]`` is the name of label ``label`` (a dataset's ``class_names``);
    names longer than ``limit`` end in an ellipsis.
    """
    name = str(class_names[int(label)]) if class_names is not None else str(label)
    return name if limit is None or len(name) <= limit else name[: limit - 1] + "…"


def _class_colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "turbo"]
    return [cmap(i if n <= 20 else i / max(n - 1, 1)) for i in range(n)]


def plot_training_curves(log: pd.DataFrame, path: str | Path) -> Path:
    """Per-epoch curves from a ``train_log.csv`` table: losses, mining weights, lr, test metrics.

    The learning-rate panel is left out when the rate never changes.
    Rows without ``epoch_time_s`` (the per-iteration rows of ``trainer.log_every``)
    are left out when the column exists. One panel per group that has data.
    """
    if "epoch" not in log:
        raise ValueError("the training log has no `epoch` column")
    rows = log[log["epoch_time_s"].notna()] if "epoch_time_s" in log else log
    metric_cols = tuple(c for c in rows.columns if is_metric(str(c)))
    groups = (
        ("loss", LOSS_COLUMNS),
        ("mean mining weight / attention", WEIGHT_COLUMNS),
        ("learning rate", ("lr",)),
        ("test metrics", metric_cols),
    )
    panels = [
        (title, [c for c in cols if c in rows and rows[c].notna().any()]) for title, cols in groups
    ]
    if "lr" in rows and rows["lr"].dropna().nunique() <= 1:  # a constant rate: no panel
        panels = [(t, cols) for t, cols in panels if t != "learning rate"]
    panels = [(t, cols) for t, cols in panels if cols]
    if not panels:
        raise ValueError("the training log has no curve to draw")
    fig = _figure(4.0 * len(panels), 3.3, panels=len(panels))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, cols) in zip(axes, panels, strict=True):
        for c in cols:
            s = rows[["epoch", c]].dropna()
            ax.plot(s["epoch"], s[c], marker="o", markersize=2.5, label=c)
        if title == "learning rate" and (rows["lr"].dropna() > 0).all():
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_recall_at_k(
    curves: Mapping[str, Mapping[int, float]],
    path: str | Path,
    title: str = "Recall@K",
    xlabel: str = "K",
) -> Path:
    """Recall@K against K (log2 axis), one line per named embedding; also CMC against the rank."""
    if not curves:
        raise ValueError("no Recall@K curve given")
    fig = _figure(4.5, 3.5)
    ax = fig.subplots()
    ks: set[int] = set()
    for name, curve in curves.items():
        k = np.array(sorted(curve), dtype=int)
        ks.update(k.tolist())
        ax.plot(k, [curve[i] for i in k], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(ks), [str(k) for k in sorted(ks)])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(title)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _as_rgb(x: np.ndarray) -> np.ndarray:
    """(H, W, 3) float image in [0, 1] from (C, H, W) / (H, W) / (H, W, C), [0, 1] or 0..255.

    Grey images are drawn dark on light (``1 - x``), as ink on paper.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 3 and x.shape[0] in (1, 3) and x.shape[-1] not in (1, 3):
        x = np.moveaxis(x, 0, -1)
    if x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.size and x.max() > 1.0:
        x = x / 255.0
    x = np.clip(x, 0.0, 1.0)
    if x.ndim == 2:
        x = np.repeat((1.0 - x)[..., None], 3, axis=-1)
    if x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"cannot draw an image of shape {x.shape}")
    return x


def plot_retrieval_grid(
    images: Mapping[int, np.ndarray] | Sequence[np.ndarray] | np.ndarray,
    labels: np.ndarray,
    queries: Sequence[int],
    neighbours: np.ndarray,
    path: str | Path,
    tile: int = 64,
    title: str | None = None,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Queries (first column, blue frame) and their nearest results, framed green (same class) or red.

    The grid is one mosaic image (fast to draw): every item is scaled by nearest
    neighbour to about ``tile`` pixels and framed; its class is written above it.

    Args:
        images: item index -> image, (C, H, W) or (H, W) in [0, 1] (or 0..255).
        labels: (n,) labels of all items, indexed like ``images``.
        queries: (q,) item indices of the queries.
        neighbours: (q, k) item indices of each query's results, nearest first.
        title: a line above the grid.
        class_names: name of every label (``class_names[label]``), written instead of the
            label; None: the labels are their own names.
    """
    from matplotlib.colors import to_rgb

    neighbours = np.asarray(neighbours)
    labels = np.asarray(labels)
    q, k = neighbours.shape
    if len(queries) != q:
        raise ValueError(f"{len(queries)} queries but {q} rows of neighbours")
    h, w = _as_rgb(images[int(queries[0])]).shape[:2]
    scale = max(1, round(tile / max(h, w)))
    border, gap = max(2, tile // 16), max(4, tile // 6)
    cell_h, cell_w = h * scale + 2 * border, w * scale + 2 * border
    mosaic = np.ones((q * (cell_h + gap) + gap, (k + 1) * (cell_w + gap) + gap, 3), np.float32)
    notes = []
    for row, query in enumerate(queries):
        cells = [(int(query), QUERY)] + [
            (int(j), CORRECT if labels[j] == labels[query] else WRONG) for j in neighbours[row]
        ]
        for col, (item, color) in enumerate(cells):
            img = _as_rgb(images[item])
            if img.shape[:2] != (h, w):
                raise ValueError(f"all images must have one size, got {img.shape[:2]} and {(h, w)}")
            img = img.repeat(scale, axis=0).repeat(scale, axis=1)
            top, left = gap + row * (cell_h + gap), gap + col * (cell_w + gap)
            mosaic[top : top + cell_h, left : left + cell_w] = to_rgb(color)
            mosaic[top + border : top + cell_h - border, left + border : left + cell_w - border] = (
                img
            )
            name = class_name(labels[item], class_names, MAX_NAME)
            name = f"query {name}" if col == 0 else name
            notes.append((left + cell_w / 2, top - 1, name, color))
    title_in = 0.25 if title else 0.0  # inches above the grid for the title
    height = mosaic.shape[0] / DPI * 1.3 + 0.3 + title_in
    fig = Figure(figsize=(mosaic.shape[1] / DPI * 1.3, height))
    ax = fig.add_axes((0.0, 0.06, 1.0, 0.94 - title_in / height))
    ax.imshow(mosaic, interpolation="nearest")
    for x, y, name, color in notes:
        ax.text(x, y, name, ha="center", va="bottom", fontsize=6, color=color)
    ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=7, y=1.0 - 0.05 / height, va="top")
    fig.legend(
        handles=[Patch(color=CORRECT, label="same class"), Patch(color=WRONG, label="other class")],
        loc="lower center",
        ncol=2,
        fontsize=7,
        frameon=False,
    )
    return _save(fig, path)


def map_sample(n: int, max_points: int, seed: int) -> np.ndarray:
    """The sorted indices of the at most ``max_points`` of ``n`` rows an embedding map draws (seeded)."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=min(max_points, n), replace=False))


def tsne_map(
    embeddings: np.ndarray,
    max_points: int = 300,
    seed: int = 0,
    max_iter: int = 350,
    threads: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """2-D t-SNE of at most ``max_points`` rows (seeded subsample): (points (m, 2), row indices (m,)).

    scikit-learn's Barnes-Hut t-SNE, PCA-initialised, on ``threads`` CPU threads: one by
    default, since its OpenMP pool spin-waits against torch's on a busy machine (500 points
    took 5-21 s on 2 threads, 1.2-1.7 s on one, on a loaded 2-core machine). 350 iterations
    (250 of them exaggerated) draw the digits demo's map as 500 did (the same 5-NN label
    agreement in 2-D, 0.99) in 70 % of the time.
    """
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    x = np.asarray(embeddings, dtype=np.float32)
    index = map_sample(len(x), max_points, seed)
    perplexity = float(min(30.0, max(2.0, (len(index) - 1) / 3)))
    tsne = TSNE(
        n_components=2, perplexity=perplexity, init="pca", random_state=seed, max_iter=max_iter
    )
    with threadpool_limits(limits=threads):
        return tsne.fit_transform(x[index]), index


def _scatter_classes(
    ax: Any, points: np.ndarray, labels: np.ndarray, class_names: Sequence[str] | None
) -> None:
    """Points coloured by class on ``ax``; a legend when there are at most 20 classes."""
    classes = np.unique(labels)
    for c, color in zip(classes, _class_colors(len(classes)), strict=True):
        sel = labels == c
        name = class_name(c, class_names, MAX_NAME)
        ax.scatter(points[sel, 0], points[sel, 1], s=6, color=color, label=name)
    if len(classes) <= 20:
        ax.legend(fontsize=6, markerscale=2, loc="best", ncol=2)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_embedding_map(
    points: np.ndarray,
    labels: np.ndarray,
    path: str | Path,
    title: str = "t-SNE of embeddings",
    class_names: Sequence[str] | None = None,
) -> Path:
    """Scatter of 2-D points (n, 2) coloured by class; a legend when there are at most 20 classes.

    The legend names a class ``class_names[label]`` when given, else by its label.
    """
    points, labels = _map_arrays(points, labels)
    fig = _figure(5.0, 4.5, left=0.15, bottom=0.15)
    ax = fig.subplots()
    _scatter_classes(ax, points, labels, class_names)
    ax.set_title(title)
    return _save(fig, path)


def _map_arrays(points: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    points, labels = np.asarray(points), np.asarray(labels)
    if points.ndim != 2 or points.shape[1] != 2 or len(points) != len(labels):
        raise ValueError(
            f"points must be (n, 2) with n labels, got {points.shape} and {labels.shape}"
        )
    return points, labels


def plot_tsne(
    embeddings: np.ndarray,
    labels: np.ndarray,
    path: str | Path,
    max_points: int = 300,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
) -> Path:
    """The t-SNE map (:func:`tsne_map`) of at most ``max_points`` test embeddings, coloured by class."""
    points, index = tsne_map(embeddings, max_points, seed=seed)
    return plot_tsne_points(points, index, labels, path, class_names)


def plot_tsne_points(
    points: np.ndarray,
    index: np.ndarray,
    labels: np.ndarray,
    path: str | Path,
    class_names: Sequence[str] | None = None,
) -> Path:
    """The map of :func:`tsne_map`'s ``(points, index)``; ``labels`` of all the embeddings."""
    title = f"t-SNE of {len(index)} test embeddings"
    return plot_embedding_map(
        points, np.asarray(labels)[index], path, title=title, class_names=class_names
    )


def save_map_sample(
    path: str | Path,
    embeddings: np.ndarray,
    labels: np.ndarray,
    max_points: int = 300,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
) -> Path:
    """What :func:`plot_tsne` would draw, kept for later (``.npz``: the sampled rows, their
    labels, the seed and the class names); :func:`plot_saved_tsne` draws the same map from it."""
    index = map_sample(len(embeddings), max_points, seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        "embeddings": np.asarray(embeddings, dtype=np.float32)[index],
        "labels": np.asarray(labels)[index],
        "seed": np.int64(seed),
    }
    if class_names is not None:
        arrays["class_names"] = np.asarray([str(n) for n in class_names])
    with path.open("wb") as f:
        np.savez(f, **arrays)
    return path


def _read_map_sample(source: str | Path) -> tuple[np.ndarray, np.ndarray, int, list[str] | None]:
    with np.load(source, allow_pickle=False) as z:
        names = z["class_names"].tolist() if "class_names" in z else None
        return z["embeddings"], z["labels"], int(z["seed"]), names


def plot_saved_tsne(source: str | Path, path: str | Path) -> Path:
    """The t-SNE map of a :func:`save_map_sample` file: the picture the run would have drawn."""
    emb, labels, seed, names = _read_map_sample(source)
    return plot_tsne(emb, labels, path, max_points=len(emb), seed=seed, class_names=names)


def plot_saved_tsne_panels(sources: Sequence[tuple[str, str | Path]], path: str | Path) -> Path:
    """One t-SNE panel per ``(title, save_map_sample file)``, side by side (4 per row)."""
    if not sources:
        raise ValueError("no embedding sample given")
    cols = min(4, len(sources))
    rows = -(-len(sources) // cols)
    fig = Figure(figsize=(4.0 * cols, 3.8 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (title, source) in zip(axes, sources, strict=False):
        emb, labels, seed, names = _read_map_sample(source)
        points, index = tsne_map(emb, len(emb), seed=seed)
        _scatter_classes(ax, *_map_arrays(points, labels[index]), names)
        ax.set_title(f"{title}\n({len(index)} test embeddings)", fontsize=8)
    for ax in axes[len(sources) :]:
        ax.set_axis_off()
    fig.suptitle("t-SNE of the test embeddings, one run per configuration")
    return _save(fig, path)


def plot_pair_weights(
    distance: np.ndarray,
    weight: np.ndarray,
    positive: np.ndarray,
    path: str | Path,
    title: str = "OSM weight against pair distance",
) -> Path:
    """Mining weight of each pair against its distance, positives and negatives apart.

    Args:
        distance: (m,) pair distances d_ij.
        weight: (m,) pair weights.
        positive: (m,) bool, True for same-class pairs.
    """
    distance, weight = np.asarray(distance), np.asarray(weight)
    positive = np.asarray(positive, dtype=bool)
    fig = _figure(5.0, 3.6, top=0.2 + 0.2 * (title.count("\n") + 1))
    ax = fig.subplots()
    for sel, name, color in ((positive, "positive", CORRECT), (~positive, "negative", WRONG)):
        if sel.any():
            ax.scatter(distance[sel], weight[sel], s=3, alpha=0.4, color=color, label=name)
    ax.set_xlabel("pair distance d")
    ax.set_ylabel("weight")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, markerscale=3)
    return _save(fig, path)


def plot_attention(
    attention: np.ndarray,
    path: str | Path,
    flipped: np.ndarray | None = None,
    auc: float | None = None,
) -> Path:
    """Histogram of per-sample attention; clean and flipped samples apart when ``flipped`` is given."""
    attention = np.asarray(attention, dtype=np.float64)
    bins = np.linspace(0.0, max(float(attention.max()), 1e-6), 41)
    fig = _figure(5.0, 3.6, top=0.55 if auc is not None and np.isfinite(auc) else 0.35)
    ax = fig.subplots()
    if flipped is None or not np.any(flipped):
        ax.hist(attention, bins=bins, color=QUERY, label="all samples")
    else:
        flipped = np.asarray(flipped, dtype=bool)
        ax.hist(attention[~flipped], bins=bins, color=CORRECT, alpha=0.6, label="clean label")
        ax.hist(attention[flipped], bins=bins, color=WRONG, alpha=0.6, label="flipped label")
    title = "class-aware attention of the training samples"
    if auc is not None and np.isfinite(auc):
        title += f"\nAUC clean vs flipped = {auc:.3f}"
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("attention a_i")
    ax.set_ylabel("samples")
    ax.legend(fontsize=8)
    return _save(fig, path)


def metric_lines_figure(
    table: pd.DataFrame,
    x: str,
    y: str,
    *,
    line: str | None = None,
    err: str | None = None,
    panel: str | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
    title: str | None = None,
) -> Figure:
    """``y`` against ``x`` with error bars ``err``, one line per value of the column ``line``;
    one axes per value of the column ``panel`` (its own y scale, titled by the value), side by
    side, for values that are not comparable (losses of different kinds)."""
    for col in (x, y, line, err, panel):
        if col is not None and col not in table:
            raise ValueError(f"column {col!r} is not in the table ({list(table.columns)})")
    panels = list(table.groupby(panel, sort=False)) if panel else [(None, table)]
    groups = list(table.groupby(line, sort=False)) if line else [(y, table)]
    colors = dict(zip([name for name, _ in groups], _class_colors(len(groups)), strict=True))
    many = len(groups) > 6  # then the legend goes to the right of the axes
    width = (8.5 if many else 5.5) + 4.0 * (len(panels) - 1)
    fig = Figure(figsize=(width, 4.0), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (panel_name, part_table) in zip(axes, panels, strict=True):
        parts = part_table.groupby(line, sort=False) if line else [(y, part_table)]
        for name, part in parts:
            part = part.sort_values(x)
            yerr = part[err].fillna(0.0).to_numpy() if err else None
            ax.errorbar(
                part[x],
                part[y],
                yerr=yerr,
                marker="o",
                capsize=3,
                label=str(name),
                markersize=4 if len(part) <= 12 else 2,
                color=colors[name],
            )
        ax.set_xlabel(xlabel or x)
        ax.set_ylabel(ylabel or y)
        if len(panels) > 1:
            ax.set_title(str(panel_name), fontsize=9)
        elif title:
            ax.set_title(title)
        ax.grid(alpha=0.3)
        if many:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        else:
            ax.legend(fontsize=8)
    if title and len(panels) > 1:
        fig.suptitle(title)
    return fig


def plot_metric_lines(table: pd.DataFrame, x: str, y: str, path: str | Path, **kwargs: Any) -> Path:
    """:func:`metric_lines_figure` written to ``path``."""
    return _save(metric_lines_figure(table, x, y, **kwargs), path)


def metric_bars_figure(
    names: Sequence[str],
    means: Sequence[float],
    stds: Sequence[float] | None = None,
    *,
    ylabel: str = "",
    title: str | None = None,
) -> Figure:
    """One bar per configuration (its mean), drawn from zero so that bar lengths compare, with
    the std over seeds as an error bar where there is one (several runs) and each mean
    written on its bar, so that gaps too small to see still read."""
    means = np.asarray(means, dtype=np.float64)
    spread = np.full_like(means, np.nan) if stds is None else np.asarray(stds, dtype=np.float64)
    fig = Figure(figsize=(max(4.0, 0.9 * len(names) + 1.5), 3.8), layout="constrained")
    ax = fig.subplots()
    pos = np.arange(len(names))
    ax.bar(pos, means, color=QUERY)
    has_err = np.isfinite(spread) & np.isfinite(means)
    if has_err.any():
        ax.errorbar(
            pos[has_err], means[has_err], yerr=spread[has_err], fmt="none", capsize=4, ecolor="k"
        )
    ax.set_xticks(pos, list(names), rotation=30, ha="right", fontsize=8)
    ok = np.isfinite(means)
    if ok.any():  # from zero (below it only for negative values), a margin above the bars
        tops = means + np.where(has_err, spread, 0.0)
        lows = means - np.where(has_err, spread, 0.0)
        hi, lo = max(0.0, float(tops[ok].max())), min(0.0, float(lows[ok].min()))
        pad = 0.08 * (hi - lo) or 1.0
        ax.set_ylim(lo - pad if lo < 0 else 0.0, hi + pad)
        for p, m, t in zip(pos[ok], means[ok], tops[ok], strict=True):
            ax.annotate(
                f"{m:.3g}",
                (p, max(t, 0.0)),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=7,
            )
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    return fig


def plot_metric_bars(
    names: Sequence[str],
    means: Sequence[float],
    stds: Sequence[float] | None,
    path: str | Path,
    **kwargs: Any,
) -> Path:
    """:func:`metric_bars_figure` written to ``path``."""
    return _save(metric_bars_figure(names, means, stds, **kwargs), path)
