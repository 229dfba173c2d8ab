"""Run logging: a CSV of training rows always, and TensorBoard, MLflow and W&B when asked for.

``trainer.loggers`` lists where the rows go:

* ``csv``: ``<run>/train_log.csv`` (required: resuming and the plots read it);
* ``tensorboard``: scalars under ``<run>/tensorboard/`` (``trainer.tensorboard``:
  ``auto`` uses it when installed, ``true`` requires it, ``false`` turns it off);
* ``mlflow``: an MLflow run (``trainer.mlflow``) with the resolved config as params
  (dotted keys) and as the artifact ``config.yaml``, every row's numbers as metrics
  at their step, the final metrics as ``final/<name>``, and at the end the
  artifacts ``metrics.json``, ``train_log.csv`` and ``plots/``. MLflow metric names
  cannot hold ``@``: ``recall@1`` is logged as ``recall_at_1``;
* ``wandb``: a Weights & Biases run (``trainer.wandb``) with the resolved config
  (dotted keys, as MLflow's params but with their types), every row's numbers as
  history at their step (two rows of one step, as the last iteration's row and the
  epoch's mean, merge: the later value stays) and the final metrics in the run's
  summary as ``final/<name>``. ``trainer.wandb.mode=offline`` writes the run under
  ``<run>/wandb/`` with no network (``wandb sync`` uploads it later).

MLflow and W&B are the experiment trackers (:data:`TRACKERS`): each is a class built
from its ``trainer.<name>`` settings that takes the rows' numbers and, at the end,
the run's final state; a new one is a class and a row of that table.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from omegaconf import DictConfig, OmegaConf

from softmine.config import flatten
from softmine.errors import ConfigError
from softmine.evaluation.metric_names import FINAL_PREFIX
from softmine.runs.layout import RUN_FILES, RunLayout

log = logging.getLogger(__name__)

MLFLOW_PARAM_BATCH = 100  # params per request (MLflow's limit)
MLFLOW_PARAM_MAX = 6000  # characters of one param value (MLflow's limit)
NOT_METRICS = ("step", "epoch")


def check_loggers(loggers: Iterable[str]) -> list[str]:
    """The names in ``trainer.loggers``, checked: known ones, ``csv`` among them."""
    names = [str(n) for n in loggers]
    unknown = [n for n in names if n not in LOGGERS]
    if unknown:
        raise ConfigError(
            f"trainer.loggers: unknown logger {unknown[0]!r}; choose among {list(LOGGERS)}, "
            "e.g. trainer.loggers=[csv,tensorboard,mlflow]"
        )
    if "csv" not in names:
        raise ConfigError(
            f"trainer.loggers must include csv: {RUN_FILES.train_log} is what resuming and the plots read "
            f"(got {names}); e.g. trainer.loggers=[csv,mlflow]"
        )
    return names


def metric_name(key: str) -> str:
    """An MLflow-safe metric name: ``@`` becomes ``_at_`` (``recall@1`` -> ``recall_at_1``)."""
    return key.replace("@", "_at_")


class Tracker(Protocol):
    """An experiment tracker a run's rows also go to (see :data:`TRACKERS`).

    Built as ``Tracker(run_dir, settings, config, resume=...)`` from ``trainer.<name>``;
    a failure to start is a :class:`ConfigError`, a failure later a warning.
    """

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        """The numbers of one row, at training step ``step``."""

    def finish(self, run_dir: Path, step: int) -> None:
        """The final metrics (``metrics.json`` when the run finished) and the run's end."""


class RunLogger:
    """Writes dict rows to ``<run_dir>/<csv_name>`` (header grows with new keys), TensorBoard
    and the experiment trackers.

    Args:
        run_dir: the run folder.
        csv_name: file name of the CSV log.
        tensorboard: ``auto`` (use it when installed), ``true`` (require it) or ``false``.
        enabled: False keeps rows in memory only (ranks other than 0 under torch.distributed).
        trackers: the experiment trackers (:data:`TRACKERS`) to send the rows to as well.
    """

    def __init__(
        self,
        run_dir: Path,
        csv_name: str,
        tensorboard: str | bool = "auto",
        enabled: bool = True,
        trackers: Iterable[Tracker] = (),
    ) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / csv_name
        self.enabled = enabled
        self.rows: list[dict[str, Any]] = []
        if self.path.exists():
            with self.path.open(newline="") as f:
                self.rows = list(csv.DictReader(f))
        self.writer = self._tensorboard(self.run_dir, str(tensorboard).lower())
        self.trackers = list(trackers)

    @classmethod
    def from_config(
        cls, run_dir: Path, csv_name: str, cfg: DictConfig, enabled: bool = True
    ) -> RunLogger:
        """The loggers ``cfg.trainer`` asks for (``loggers``, ``tensorboard``, and the settings
        ``trainer.<name>`` of each tracker listed)."""
        t = cfg.trainer
        names = check_loggers(t.get("loggers", ["csv", "tensorboard"]))
        mode = str(t.get("tensorboard", "auto")).lower()
        if "tensorboard" not in names and mode not in ("true", "1", "yes"):
            mode = "false"
        if not enabled:
            mode = "false"
        resume = bool(cfg.get("resume"))
        trackers = [
            TRACKERS[n](run_dir, t.get(n) or {}, cfg, resume=resume)
            for n in names
            if n in TRACKERS and enabled
        ]
        return cls(run_dir, csv_name, tensorboard=mode, enabled=enabled, trackers=trackers)

    @staticmethod
    def _tensorboard(run_dir: Path, mode: str) -> Any:
        if mode in ("false", "0", "no", "none"):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            if mode in ("true", "1", "yes"):
                raise ConfigError(
                    "trainer.tensorboard=true but tensorboard is not installed; "
                    "pip install 'softmine[tensorboard]' or set trainer.tensorboard=auto"
                ) from None
            return None
        return SummaryWriter(log_dir=str(RunLayout(run_dir).tensorboard))

    def __len__(self) -> int:
        return len(self.rows)

    def truncate(self, n_rows: int) -> None:
        """Keep only the first ``n_rows`` rows (rows written after a checkpoint are replayed on resume)."""
        if n_rows < len(self.rows):
            self.rows = self.rows[:n_rows]
            self._write()

    def log(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self._write()
        if "step" not in row:
            return
        numbers = {
            k: v for k, v in row.items() if isinstance(v, int | float) and k not in NOT_METRICS
        }
        if self.writer is not None:
            for k, v in numbers.items():
                self.writer.add_scalar(k, v, int(row["step"]))
        for tracker in self.trackers:
            tracker.log_metrics(numbers, int(row["step"]))

    def _write(self) -> None:
        if not self.enabled:
            return
        fields: list[str] = []
        for r in self.rows:
            fields.extend(k for k in r if k not in fields)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.rows)
        tmp.replace(self.path)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None
        if self.trackers:
            step = int(self.rows[-1].get("step", 0) or 0) if self.rows else 0
            for tracker in self.trackers:
                tracker.finish(self.run_dir, step)
            self.trackers = []


def _params(node: Any) -> dict[str, str]:
    """Dotted keys of a nested config: ``{"trainer.epochs": "30", ...}`` (lists as their text)."""
    return {k: str(v)[:MLFLOW_PARAM_MAX] for k, v in flatten(node).items() if v != {}}


def _is_file_store(uri: str) -> bool:
    return uri.startswith("file:") or "://" not in uri and ":" not in uri.split("/")[0]


class _Guarded:
    """What a tracker does when its service fails during training: one warning, then nothing."""

    label = ""  # the tracker's name in the warning
    failed = False  # set after the first failure: later calls do nothing

    def _safely(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        if self.failed:
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:  # tracking must never stop training
            self.failed = True
            log.warning(
                "%s %s failed (%s: %s); %s logging stops, training goes on",
                self.label,
                what,
                type(e).__name__,
                e,
                self.label,
            )


def _not_installed(key: str, product: str) -> ConfigError:
    """The one-line error of a tracker in ``trainer.loggers`` whose package is missing
    (``key``: its name there and its pip extra)."""
    return ConfigError(
        f"trainer.loggers has {key} but {product} is not installed; "
        f"pip install 'softmine[{key}]' or remove {key} from trainer.loggers"
    )


class MlflowLogger(_Guarded):
    """One MLflow run for one softmine run; see the module docstring for what it records.

    Args:
        run_dir: the run folder (the MLflow run id is kept in ``<run_dir>/mlflow_run_id``,
            so ``resume=true`` continues the same MLflow run).
        settings: ``trainer.mlflow``: ``tracking_uri`` (None: the file store ``mlruns/`` in
            the current directory), ``experiment``, ``run_name`` (None: the run folder).
        config: the run's config, logged as params and as ``config.yaml``.
        resume: continue the MLflow run recorded in the run folder, if any.

    A tracking server that fails during training costs a warning, never the run.
    """

    label = "MLflow"

    def __init__(
        self, run_dir: Path, settings: Any, config: DictConfig, resume: bool = False
    ) -> None:
        try:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise _not_installed("mlflow", "MLflow") from None
        run_dir = Path(run_dir)
        uri = settings.get("tracking_uri") or (Path.cwd() / "mlruns").as_uri()
        if _is_file_store(str(uri)):  # MLflow 3 keeps the file store only on request
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.uri = str(uri)
        try:
            self.client = MlflowClient(tracking_uri=self.uri)
            name = str(settings.get("experiment") or "softmine")
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = (
                experiment.experiment_id if experiment else self.client.create_experiment(name)
            )
            id_file = RunLayout(run_dir).mlflow_run_id
            if resume and id_file.exists():  # the same MLflow run goes on
                self.run_id = id_file.read_text().strip()
                self.client.get_run(self.run_id)
                return
            run = self.client.create_run(
                experiment_id,
                run_name=str(settings.get("run_name") or _run_name(run_dir)),
                tags={"softmine.run_dir": str(run_dir.resolve())},
            )
            self.run_id = run.info.run_id
            run_dir.mkdir(parents=True, exist_ok=True)
            id_file.write_text(self.run_id + "\n")
            resolved = OmegaConf.to_container(config, resolve=True)
            params = [Param(k, v) for k, v in sorted(_params(resolved).items())]
            for i in range(0, len(params), MLFLOW_PARAM_BATCH):
                self.client.log_batch(self.run_id, params=params[i : i + MLFLOW_PARAM_BATCH])
            self.client.log_text(
                self.run_id, OmegaConf.to_yaml(config, resolve=True), RUN_FILES.config.name
            )
        except ConfigError:
            raise
        except Exception as e:  # MLflow raises many types (connection, permissions, ...)
            raise ConfigError(
                f"MLflow at {self.uri} failed to start the run ({type(e).__name__}: "
                f"{str(e).strip().splitlines()[0] if str(e).strip() else e!r}); check "
                "trainer.mlflow.tracking_uri, or remove mlflow from trainer.loggers"
            ) from e

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = _now_ms()
        metrics = [
            Metric(metric_name(k), float(v), now, step)
            for k, v in values.items()
            if not math.isnan(float(v))
        ]
        if metrics:
            self._safely("metric logging", self.client.log_batch, self.run_id, metrics=metrics)

    def finish(self, run_dir: Path, step: int) -> None:
        """Final metrics, the run's files as artifacts, and the run's end status."""
        files = RunLayout(run_dir)
        metrics_file = files.metrics
        finished = metrics_file.exists()
        if finished:
            final = files.read_metrics()
            self.log_metrics({FINAL_PREFIX + k: v for k, v in final.items()}, step)
            self._safely(
                "artifact upload", self.client.log_artifact, self.run_id, str(metrics_file)
            )
        log_file = files.train_log
        if log_file.exists():
            self._safely("artifact upload", self.client.log_artifact, self.run_id, str(log_file))
        plots = files.plots
        if plots.is_dir():
            self._safely(
                "artifact upload", self.client.log_artifacts, self.run_id, str(plots), plots.name
            )
        status = "FINISHED" if finished else "KILLED"
        self._safely("closing the run", self.client.set_terminated, self.run_id, status)


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def _run_name(run_dir: Path) -> str:
    """The run folder, relative to the current directory when below it."""
    try:
        return str(run_dir.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(run_dir)


class WandbLogger(_Guarded):
    """One Weights & Biases run for one softmine run; see the module docstring for what it records.

    Args:
        run_dir: the run folder (the W&B run id is kept in ``<run_dir>/wandb_run_id``,
            so ``resume=true`` continues the same W&B run).
        settings: ``trainer.wandb``: ``project``, ``entity`` (None: your default),
            ``mode`` (None: W&B's default, i.e. ``WANDB_MODE`` else online; ``online`` |
            ``offline`` | ``disabled``), ``run_name`` (None: the run folder), ``dir``
            (None: the run folder; W&B writes ``<dir>/wandb/``), ``tags``.
        config: the run's config, recorded resolved with dotted keys.
        resume: continue the W&B run recorded in the run folder, if any.

    A W&B service that fails during training costs a warning, never the run.
    """

    label = "W&B"

    def __init__(
        self, run_dir: Path, settings: Any, config: DictConfig, resume: bool = False
    ) -> None:
        try:
            import wandb
        except ImportError:
            raise _not_installed("wandb", "Weights & Biases") from None
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file = RunLayout(run_dir).wandb_run_id
        run_id = id_file.read_text().strip() if resume and id_file.exists() else None
        resolved = OmegaConf.to_container(config, resolve=True)
        mode = settings.get("mode")
        try:
            self.run = wandb.init(
                project=str(settings.get("project") or "softmine"),
                entity=settings.get("entity") or None,
                mode=str(mode) if mode else None,
                name=str(settings.get("run_name") or _run_name(run_dir)),
                dir=str(settings.get("dir") or run_dir),
                tags=[str(t) for t in settings.get("tags") or []],
                config={k: v for k, v in flatten(resolved).items() if v != {}},
                id=run_id,
                resume="allow" if run_id else None,
                settings=wandb.Settings(console="off", silent=True),
            )
        except Exception as e:  # W&B raises many types (no login, network, bad entity, ...)
            raise ConfigError(
                f"W&B failed to start the run ({type(e).__name__}: "
                f"{str(e).strip().splitlines()[0] if str(e).strip() else e!r}); log in "
                "(wandb login), set trainer.wandb.mode=offline, or remove wandb from trainer.loggers"
            ) from e
        id_file.write_text(self.run.id + "\n")

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        finite = {k: float(v) for k, v in values.items() if not math.isnan(float(v))}
        if finite:
            self._safely("metric logging", self.run.log, finite, step=step)

    def finish(self, run_dir: Path, step: int) -> None:
        """The final metrics into the run's summary, and the run's end (exit code 1 unfinished)."""
        files = RunLayout(run_dir)
        finished = files.metrics.exists()
        if finished:
            final = {FINAL_PREFIX + k: v for k, v in files.read_metrics().items()}
            self._safely("summary update", self.run.summary.update, final)
        self._safely("closing the run", self.run.finish, exit_code=0 if finished else 1)


#: The experiment trackers ``trainer.loggers`` may list besides csv and tensorboard, each
#: built from its settings ``trainer.<name>``.
TRACKERS: dict[str, Callable[..., Tracker]] = {
    "mlflow": MlflowLogger,
    "wandb": WandbLogger,
}
LOGGERS = ("csv", "tensorboard", *TRACKERS)
