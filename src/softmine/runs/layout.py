"""The folders softmine writes, file by file: the one module that spells their names.

A run folder (one ``softmine-train`` run) holds its record (``.hydra/``), its logs,
checkpoints, metrics, plots and page; a sweep folder holds one run folder per job
beside the sweep's own files; ``softmine-report`` writes a report folder. Each is a
small frozen object over its root with one property per file, so code says
``RunLayout(run_dir).metrics`` and never spells ``metrics.json``. Rooted at
``Path()`` (:data:`RUN_FILES`, :data:`SWEEP_FILES`, :data:`REPORT_FILES`) the same
properties are the paths relative to the folder, for messages and glob patterns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RunLayout:
    """The files and folders of one run folder ``root``."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # --- the record (written by softmine.runs.folder, not by Hydra) and the lock
    @property
    def lock(self) -> Path:
        """The lock of the process writing the folder (also used on sweep folders)."""
        return self.root / ".softmine.lock"

    @property
    def record_dir(self) -> Path:
        """The run's record: config, overrides, Hydra's settings, resumes."""
        return self.root / ".hydra"

    @property
    def config(self) -> Path:
        return self.record_dir / "config.yaml"

    @property
    def overrides(self) -> Path:
        return self.record_dir / "overrides.yaml"

    @property
    def hydra(self) -> Path:
        return self.record_dir / "hydra.yaml"

    @property
    def resumes(self) -> Path:
        """What each ``resume=true`` changed, and the metrics it superseded."""
        return self.record_dir / "resumes.yaml"

    # --- logs and results
    @property
    def log(self) -> Path:
        """The run's text log (the console's messages, timestamped)."""
        return self.root / "train.log"

    @property
    def train_log(self) -> Path:
        """One row per logged step and per epoch (the csv logger)."""
        return self.root / "train_log.csv"

    @property
    def eval_log(self) -> Path:
        """One row per evaluation."""
        return self.root / "eval_log.csv"

    @property
    def metrics(self) -> Path:
        """The final metrics (written when the run finishes)."""
        return self.root / "metrics.json"

    @property
    def bad_images(self) -> Path:
        """The unreadable training files left out (``path<TAB>reason``)."""
        return self.root / "bad_images.txt"

    @property
    def attention(self) -> Path:
        """Per training sample: its label, whether it was flipped, its attention (label noise)."""
        return self.root / "attention.csv"

    @property
    def test_embeddings(self) -> Path:
        """The final test embeddings of a cross-validation fold run."""
        return self.root / "test_embeddings.npz"

    @property
    def report(self) -> Path:
        """The run's own page."""
        return self.root / "report.html"

    @property
    def summary(self) -> Path:
        """Where ``softmine-report RUN`` writes its report by default (the run's own page is taken)."""
        return self.root / "summary"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def mlflow_run_id(self) -> Path:
        """The MLflow run this run logs to, so that resuming continues it."""
        return self.root / "mlflow_run_id"

    @property
    def wandb_run_id(self) -> Path:
        """The W&B run this run logs to, so that resuming continues it."""
        return self.root / "wandb_run_id"

    # --- checkpoints
    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        """The network at the last step trained (what resuming and ``softmine-eval RUN`` load)."""
        return self.checkpoints / "last.pt"

    @property
    def best_checkpoint(self) -> Path:
        """The network at the evaluation ``trainer.monitor`` liked best."""
        return self.checkpoints / "best.pt"

    # --- plots
    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def training_curves_plot(self) -> Path:
        return self.plots / "training_curves.png"

    @property
    def recall_plot(self) -> Path:
        return self.plots / "recall_at_k.png"

    @property
    def cmc_plot(self) -> Path:
        return self.plots / "cmc.png"

    @property
    def retrieval_grid_plot(self) -> Path:
        return self.plots / "retrieval_grid.png"

    @property
    def retrieval_grid_worst_plot(self) -> Path:
        return self.plots / "retrieval_grid_worst.png"

    @property
    def tsne_plot(self) -> Path:
        return self.plots / "tsne.png"

    @property
    def map_sample(self) -> Path:
        """The test embeddings the t-SNE map draws, kept when a sweep job leaves the map to
        ``softmine-report`` (:func:`softmine.reporting.plots.save_map_sample`)."""
        return self.plots / "embedding_map.npz"

    @property
    def osm_weights_plot(self) -> Path:
        return self.plots / "osm_weights.png"

    @property
    def attention_plot(self) -> Path:
        return self.plots / "attention.png"

    def read_metrics(self) -> dict[str, Any]:
        """The dict of the run's ``metrics.json``."""
        return read_metrics(self.metrics)


@dataclass(frozen=True)
class SweepLayout:
    """The sweep's own files at the root of a multirun folder (beside one run folder per job)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def lock(self) -> Path:
        return RunLayout(self.root).lock

    @property
    def summary(self) -> Path:
        """One row per job, with its status and metrics."""
        return self.root / "summary.csv"

    @property
    def hydra_record(self) -> Path:
        """Written by Hydra's sweeper at the sweep root."""
        return self.root / "multirun.yaml"

    @property
    def jobs(self) -> Path:
        """The jobs' bookkeeping (one ``<num>.json`` per job)."""
        return self.root / ".jobs"

    @property
    def stop(self) -> Path:
        """Present when the sweep was asked to stop (holds the signal number)."""
        return self.jobs / "STOP"

    def job(self, num: int) -> Path:
        """The bookkeeping file of job ``num``."""
        return self.jobs / f"{int(num)}.json"

    @property
    def fair_table(self) -> Path:
        """``fair table``: one row per loss (CSV)."""
        return self.root / "fair.csv"

    @property
    def fair_markdown(self) -> Path:
        return self.root / "fair.md"

    @property
    def val_curves(self) -> Path:
        """``fair table``: every run's validation curve."""
        return self.root / "val_curves.png"


@dataclass(frozen=True)
class StudyLayout:
    """The folder of one ``softmine-tune`` study (above the sweep folders of its sessions)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def db(self) -> Path:
        """Every trial of the Optuna study (sqlite)."""
        return self.root / "study.db"

    @property
    def record(self) -> Path:
        """The settings the study was started with."""
        return self.root / "study.yaml"


@dataclass(frozen=True)
class ReportLayout:
    """What ``softmine-report`` writes into its output folder."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def markdown(self) -> Path:
        return self.root / "report.md"

    @property
    def table(self) -> Path:
        return self.root / "report.csv"

    @property
    def html(self) -> Path:
        """The sweep's page (named like a run's own page, which it links to)."""
        return RunLayout(self.root).report

    @property
    def training_loss_plot(self) -> Path:
        return self.root / "training_loss.png"

    @property
    def tsne_plot(self) -> Path:
        """One t-SNE panel per configuration, from the runs' ``plots/embedding_map.npz``."""
        return self.root / "tsne.png"

    def plot(self, stem: str) -> Path:
        """A plot named ``stem`` (e.g. a metric's slug)."""
        return self.root / f"{stem}.png"


#: The layouts rooted at ``Path()``: each property is the path relative to its folder.
RUN_FILES = RunLayout(Path())
SWEEP_FILES = SweepLayout(Path())
REPORT_FILES = ReportLayout(Path())
STUDY_FILES = StudyLayout(Path())


def read_metrics(path: Path) -> dict[str, Any]:
    """The dict of a ``metrics.json`` file (``path``: the file, or the run folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = RunLayout(path).metrics
    return json.loads(path.read_text())


def bad_images_beside(path: Path) -> Path:
    """The listing of unreadable files next to an output file: ``emb.npz`` -> ``emb.bad_images.txt``."""
    return path.with_name(f"{path.stem}.{RUN_FILES.bad_images.name}")
