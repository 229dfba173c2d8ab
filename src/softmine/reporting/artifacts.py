"""What a finished run leaves besides its metrics: plots, and the attention of noisy labels.

:func:`write_run_artifacts` runs once a run has trained (``softmine-train`` calls it after
:meth:`Trainer.train <softmine.engine.trainer.Trainer.train>`), on the run's
:class:`~softmine.engine.outputs.RunOutputs`:

* under label noise (``dataset.label_noise > 0``) it embeds the whole training set
  (with the test transform, no augmentation), reads the attention the loss gives
  every sample, writes ``attention.csv`` (which samples were flipped, and their
  attention) and adds ``attention_auc`` to ``metrics.json``
  (:mod:`softmine.reporting.attention`); for a loss without attention the CSV's
  attention column is empty and there is no AUC;
* with ``trainer.plots=true`` it writes the PNGs of :mod:`softmine.reporting.plots` into
  ``<run>/plots/``: ``training_curves``, ``recall_at_k`` (or ``cmc`` for re-ID, drawn
  from the final metrics), ``retrieval_grid`` and ``retrieval_grid_worst`` (image test
  sets: random queries, and the queries with the lowest AP@R), ``tsne``,
  ``osm_weights`` and ``attention``. In a sweep job the t-SNE map, the one costly picture,
  is left to ``softmine-report``: the job keeps the embeddings it would map
  (``plots/embedding_map.npz``) and the report draws the maps of the sweep at once
  (``trainer.plots=all`` draws it in every job);
* it always writes ``report.html``, the whole run in one self-contained page
  (:mod:`softmine.reporting.html`).

A plot or page that cannot be drawn (say, a test set whose items are not images) is
skipped with a warning; it never fails a run that has already finished.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Subset

from softmine.engine.embedding import extract_embeddings
from softmine.engine.outputs import RunOutputs
from softmine.evaluation.metric_names import ATTENTION_AUC, CMC, RECALL
from softmine.losses.base import needs_of
from softmine.reporting.attention import (
    attention_auc,
    deterministic_transform,
    loss_details,
    sample_attention,
    write_attention_csv,
)
from softmine.runs.layout import RUN_FILES, RunLayout
from softmine.runs.metrics_file import write_metrics

if TYPE_CHECKING:
    from softmine.engine.trainer import Trainer

log = logging.getLogger(__name__)

MAX_TRAIN_POINTS = 2000  # training samples embedded for the plots when there is no label noise
PAIR_SAMPLES = 256  # samples whose pairs make the OSM-weight plot
MAX_PAIRS = 4000  # pairs drawn per kind (positive / negative)
# test embeddings in the t-SNE map: 300 draw the digits demo's map as 500 did (5-NN label
# agreement in 2-D 0.99 both) in 55 % of the time, which kept the map off the plots' critical path
TSNE_POINTS = 300
GRID_QUERIES, GRID_K = 6, 5  # retrieval grid: queries x results
RECALL_KS = (1, 2, 4, 8, 16, 32)
ALL_PLOTS = "all"  # trainer.plots value: every plot, the t-SNE map in sweep jobs too


def write_run_artifacts(run: RunOutputs, sweep_job: bool = False) -> dict[str, float]:
    """Attention under label noise, end-of-run plots and ``report.html`` of a finished run.

    Adds ``attention_auc`` to ``run.metrics`` (and rewrites ``metrics.json``) when the
    training set has flipped labels and the loss has attention. Returns the metrics.
    ``sweep_job``: a job of ``softmine-train -m``, whose t-SNE map ``softmine-report``
    draws (unless ``trainer.plots=all``). Rank 0 alone writes: other ranks return at once.
    """
    metrics = run.metrics
    if not run.is_main:
        return metrics
    plots = run.cfg.trainer.get("plots", False)
    flipped = getattr(run.train_set, "flipped", None)
    noisy = flipped is not None and bool(np.any(flipped))
    run_dir = Path(run.run_dir)
    if plots or noisy:
        defer_map = sweep_job and str(plots) != ALL_PLOTS
        _noise_and_plots(run, run_dir, bool(plots), noisy, defer_map)
    _attempt(RUN_FILES.report.name, _write_html, run, run_dir)
    return metrics


def fit_and_report(trainer: Trainer, sweep_job: bool = False) -> dict[str, float]:
    """Train, write the end-of-run reports, close the run; returns what metrics.json holds.

    What ``softmine-train`` does with a built :class:`~softmine.engine.trainer.Trainer`:
    the engine trains, evaluates and writes metrics.json and the final checkpoint
    (:meth:`Trainer.train`); the reports then read the run's
    :class:`~softmine.engine.outputs.RunOutputs`: plots, ``attention.csv`` and
    ``report.html`` (rank 0), then the fold embeddings (every rank: it may embed the test
    split again). :meth:`Trainer.close` ends the run (the loggers upload the plots).
    ``sweep_job``: see :func:`write_run_artifacts`.
    """
    from softmine.reporting.crossval import save_fold_embeddings

    with trainer.explaining_stops():  # a failed write says what was kept where
        outputs = trainer.train()
        if outputs is not None:  # None: resume=true found the run finished, nothing to report
            # plots; attention.csv + attention_auc under label noise
            write_run_artifacts(outputs, sweep_job)
            save_fold_embeddings(outputs)  # dataset.folds: test_embeddings.npz for softmine-report
        return trainer.close()


def _noise_and_plots(
    run: RunOutputs, run_dir: Path, plots: bool, noisy: bool, defer_map: bool
) -> None:
    metrics = run.metrics
    t0 = time.perf_counter()
    emb, labels, index = _train_embeddings(run, everything=noisy)
    device = run.device
    attention = sample_attention(
        run.loss_fn, torch.from_numpy(emb).to(device), torch.from_numpy(labels).to(device)
    )
    auc = None
    if noisy:  # the record of the flips, with the attention each sample gets (if any)
        write_attention_csv(
            run_dir,
            np.full(len(labels), np.nan) if attention is None else attention,
            labels,
            np.asarray(run.train_set.clean_labels),
            run.train_set.flipped,
        )
    if attention is not None and noisy:
        auc = attention_auc(attention, run.train_set.flipped)
        metrics[ATTENTION_AUC] = auc
        write_metrics(run_dir, run.final_metrics())  # keeps best_test/* and selected/*
        log.info("attention AUC (clean vs flipped labels): %.4f", auc)
    if plots:
        out = RunLayout(run_dir).plots
        _plot_run(run, out, emb, labels, attention, index, auc, defer_map)
        log.info("plots written to %s (%.1f s)", out, time.perf_counter() - t0)


def _write_html(run: RunOutputs, run_dir: Path) -> None:
    """``report.html``: metrics.json, the plots, eval_log.csv and the config, in one page."""
    from omegaconf import OmegaConf

    from softmine.reporting import html as html_report

    t0 = time.perf_counter()
    try:
        config = OmegaConf.to_yaml(run.cfg, resolve=True)
    except Exception:  # a resolver only Hydra's app knows: show the config as written
        config = OmegaConf.to_yaml(run.cfg)
    path = html_report.write_run_report(run_dir, config, run.baselines or None)
    log.info("report written to %s (%.1f s)", path, time.perf_counter() - t0)


def _embed(run: RunOutputs, data: Any) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and labels of ``data`` by the run's model, at its evaluation batch size."""
    return extract_embeddings(
        run.model,
        data,
        device=run.device,
        batch_size=int(run.cfg.trainer.eval_batch_size),
        num_workers=run.num_workers,
    )


def _train_embeddings(
    run: RunOutputs, everything: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Embeddings and (training) labels of the training set, or of a seeded subset of it."""
    train_set = run.train_set
    n = len(train_set)
    index = np.arange(n)
    if not everything and n > MAX_TRAIN_POINTS:
        rng = np.random.default_rng(int(run.cfg.seed))
        index = np.sort(rng.choice(n, size=MAX_TRAIN_POINTS, replace=False))
    data = train_set if len(index) == n else Subset(train_set, index.tolist())
    with deterministic_transform(train_set, run.test_set):
        emb, labels = _embed(run, data)
    return emb, labels, index


def _attempt(name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, or None with a warning when it raises."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # a plot must never fail a finished run
        log.warning("plot %s skipped: %s: %s", name, type(e).__name__, e)
        return None


def _plot_run(
    run: RunOutputs,
    out: Path,
    train_emb: np.ndarray,
    train_labels: np.ndarray,
    attention: np.ndarray | None,
    train_index: np.ndarray,
    auc: float | None,
    defer_map: bool = False,
) -> None:
    from softmine.reporting import plots

    test = _attempt("test embeddings", _test_embeddings, run) if run.test_set is not None else None
    pool = ThreadPoolExecutor(max_workers=1)
    mapped = None  # the t-SNE of the test embeddings, computed beside the figures drawn below
    if test is not None and not defer_map:
        mapped = pool.submit(plots.tsne_map, test[0], TSNE_POINTS, int(run.cfg.seed))
    try:
        _plot_train_set(run, out, train_emb, train_labels, attention, train_index, auc)
        if test is not None:
            _attempt(
                "test-set plots", _plot_test_set, run, out, run.test_set, test, mapped, defer_map
            )
        elif run.test_set is None:
            _attempt("metric curves", _plot_metric_curves, run.metrics, out)
    finally:
        pool.shutdown(wait=True)


def _plot_train_set(
    run: RunOutputs,
    out: Path,
    train_emb: np.ndarray,
    train_labels: np.ndarray,
    attention: np.ndarray | None,
    train_index: np.ndarray,
    auc: float | None,
) -> None:
    """Training curves, OSM weights and the attention of the training samples."""
    from softmine.reporting import plots

    log_file = RunLayout(run.run_dir).train_log
    if log_file.exists():
        _attempt(
            "training_curves",
            lambda: plots.plot_training_curves(
                pd.read_csv(log_file), out / RUN_FILES.training_curves_plot.name
            ),
        )
    _attempt("osm_weights", _plot_pair_weights, run, out, train_emb, train_labels)
    if attention is not None:
        flipped = getattr(run.train_set, "flipped", None)
        flipped = None if flipped is None else np.asarray(flipped)[train_index]
        _attempt(
            "attention",
            plots.plot_attention,
            attention,
            out / RUN_FILES.attention_plot.name,
            flipped,
            auc,
        )


def _plot_metric_curves(metrics: dict[str, float], out: Path) -> None:
    """Recall@K or CMC from the final metrics, for protocols without a leave-one-out test set."""
    from softmine.reporting import plots

    for prefix, file, label in (
        (RECALL, RUN_FILES.recall_plot, "Recall@K"),
        (CMC, RUN_FILES.cmc_plot, "CMC"),
    ):
        curve = {int(k[len(prefix) :]): v for k, v in metrics.items() if k.startswith(prefix)}
        if curve:
            xlabel = "K" if prefix == RECALL else "rank r"
            path = out / file.name
            plots.plot_recall_at_k({"trained": curve}, path, title=label, xlabel=xlabel)


def _plot_pair_weights(run: RunOutputs, out: Path, emb: np.ndarray, labels: np.ndarray) -> None:
    """OSM weight against distance for the pairs of a seeded sample of training embeddings."""
    from softmine.reporting import plots

    if needs_of(run.loss_fn).requires:
        log.info(
            "plot osm_weights skipped: the loss's heads read backbone features, which the "
            "saved embeddings do not include"
        )
        return
    rng = np.random.default_rng(int(run.cfg.seed))
    pick = np.sort(rng.choice(len(emb), size=min(PAIR_SAMPLES, len(emb)), replace=False))
    x = torch.from_numpy(emb[pick]).to(run.device)
    y = torch.from_numpy(labels[pick]).to(run.device)
    was_training = run.loss_fn.training
    run.loss_fn.eval()
    with torch.no_grad():
        details = loss_details(run.loss_fn, x, y)
    run.loss_fn.train(was_training)
    if "weights" not in details:
        log.info("plot osm_weights skipped: the loss %s has no pair weights", type(run.loss_fn))
        return
    w = details["weights"].float().cpu().numpy()
    name = "OSM weight"
    if "attention" in details:  # w_ij = s_ij * min(a_i, a_j): divide the attention out
        a = details["attention"].float().cpu().numpy()
        pair_a = np.minimum(a[:, None], a[None, :])
        w = np.divide(w, pair_a, out=np.zeros_like(w), where=pair_a > 0)
    unit = emb[pick] / np.maximum(np.linalg.norm(emb[pick], axis=1, keepdims=True), 1e-12)
    d = np.sqrt(np.clip(2.0 - 2.0 * unit @ unit.T, 0.0, None))
    same = labels[pick][:, None] == labels[pick][None, :]
    upper = np.triu(np.ones_like(same), k=1)
    chosen = []
    for mask in (same & upper, ~same & upper):
        rows, cols = np.nonzero(mask)
        keep = rng.choice(len(rows), size=min(MAX_PAIRS, len(rows)), replace=False)
        chosen.append((rows[keep], cols[keep]))
    r = np.concatenate([c[0] for c in chosen])
    c = np.concatenate([c[1] for c in chosen])
    hp = {k: getattr(run.loss_fn, k) for k in ("margin", "sigma") if hasattr(run.loss_fn, k)}
    title = f"{name} against pair distance"
    if hp:
        title += "\n" + ", ".join(f"{k}={v:g}" for k, v in hp.items())
    plots.plot_pair_weights(
        d[r, c], w[r, c], same[r, c], out / RUN_FILES.osm_weights_plot.name, title=title
    )


def _test_embeddings(run: RunOutputs) -> tuple[np.ndarray, np.ndarray]:
    """The test split's embeddings and labels: the final evaluation's, else embedded now."""
    if run.test_embeddings is not None:
        return run.test_embeddings
    return _embed(run, run.test_set)


def _plot_test_set(
    run: RunOutputs,
    out: Path,
    test_set: Any,
    test: tuple[np.ndarray, np.ndarray] | None = None,
    mapped: Future | None = None,
    defer_map: bool = False,
) -> None:
    """Recall@K curve, (for image items) the retrieval grids and the t-SNE map of the test split.

    ``test``: its embeddings and labels (None: :func:`_test_embeddings`). ``mapped``: the
    running :func:`~softmine.reporting.plots.tsne_map` of the embeddings (None: computed
    here), whose map is drawn last. ``defer_map``: keep the embeddings of the map
    (``embedding_map.npz``) for ``softmine-report`` instead (a sweep job).
    """
    from softmine.evaluation import recall_at_k
    from softmine.reporting import plots

    emb, labels = _test_embeddings(run) if test is None else test
    names = class_names(test_set)
    ks = [k for k in RECALL_KS if k < len(labels)]
    _attempt(
        "recall_at_k",
        plots.plot_recall_at_k,
        {"trained": recall_at_k(emb, labels, ks)},
        out / RUN_FILES.recall_plot.name,
    )
    seed = int(run.cfg.seed)
    first = test_set[0][0]
    if isinstance(first, torch.Tensor) and first.dim() == 3 and first.shape[0] in (1, 3):
        rng = np.random.default_rng(seed)
        queries = np.sort(rng.choice(len(emb), size=min(GRID_QUERIES, len(emb)), replace=False))
        _attempt(
            "retrieval_grid", _retrieval_grid, test_set, emb, labels, queries, out, "", None, names
        )
        _attempt("retrieval_grid_worst", _worst_queries_grid, test_set, emb, labels, out, names)
    else:
        log.info("plot retrieval_grid skipped: test items are not (C, H, W) images")
    if defer_map:  # a sweep job: softmine-report draws the maps of the sweep
        path = out / RUN_FILES.map_sample.name
        _attempt("tsne", plots.save_map_sample, path, emb, labels, TSNE_POINTS, seed, names)
        return

    def tsne() -> None:
        points, index = (
            plots.tsne_map(emb, TSNE_POINTS, seed) if mapped is None else mapped.result()
        )
        plots.plot_tsne_points(points, index, labels, out / RUN_FILES.tsne_plot.name, names)

    _attempt("tsne", tsne)


def class_names(dataset: Any) -> list[str] | None:
    """The names of a dataset's labels (its ``class_names``, e.g. the folder names), or None.

    None where the labels are their own names (digits) or the dataset does not say them.
    A ``torch.utils.data.Subset`` shows its dataset's names (it keeps the labels).
    """
    names = getattr(dataset, "class_names", None)
    if names is None and isinstance(dataset, Subset):
        return class_names(dataset.dataset)
    return None if names is None else [str(n) for n in names]


def _worst_queries_grid(
    test_set: Any,
    emb: np.ndarray,
    labels: np.ndarray,
    out: Path,
    names: list[str] | None = None,
) -> None:
    """The retrieval grid of the queries with the lowest AP@R (the per-query term of MAP@R)."""
    from softmine.evaluation import average_precision_at_r

    ap = average_precision_at_r(emb, labels)
    order = np.argsort(np.where(np.isnan(ap), np.inf, ap), kind="stable")
    queries = order[: min(GRID_QUERIES, int(np.isfinite(ap).sum()))]
    if len(queries) == 0:
        log.info("plot retrieval_grid_worst skipped: no query has another item of its class")
        return
    title = "lowest AP@R: " + ", ".join(f"{ap[q]:.2f}" for q in queries)
    _retrieval_grid(test_set, emb, labels, queries, out, "_worst", title, names)


def _retrieval_grid(
    test_set: Any,
    emb: np.ndarray,
    labels: np.ndarray,
    queries: np.ndarray,
    out: Path,
    suffix: str,
    title: str | None = None,
    names: list[str] | None = None,
) -> None:
    """The retrieval grid (``suffix`` ``_worst``: of the worst queries): queries and their nearest neighbours."""
    from softmine.reporting import plots

    unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    sims = unit[queries] @ unit.T
    sims[np.arange(len(queries)), queries] = -np.inf  # a query never retrieves itself
    k = min(GRID_K, len(emb) - 1)
    neighbours = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    items = {int(i): test_set[int(i)][0].numpy() for i in {*queries, *neighbours.ravel()}}
    grid = RUN_FILES.retrieval_grid_worst_plot if suffix else RUN_FILES.retrieval_grid_plot
    path = out / grid.name
    plots.plot_retrieval_grid(
        items, labels, queries, neighbours, path, title=title, class_names=names
    )
