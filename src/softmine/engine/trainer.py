"""The training loop: P x K batches -> embedding net -> loss -> optimizer, then evaluation.

The pieces are built from the Hydra config by :func:`softmine.engine.components.build_components`;
the trainer steps them (:class:`~softmine.engine.step.TrainStep`), logs, evaluates,
checkpoints (:class:`~softmine.engine.checkpoint.Checkpoints`) and resumes. What a stopped
run says (what was kept where, what to do next) is :mod:`softmine.engine.failures`. The
end-of-run reports (plots, ``report.html``, fold embeddings) read the
:class:`~softmine.engine.outputs.RunOutputs` that :meth:`Trainer.train` returns; the train
command (:mod:`softmine.commands.train`) writes them, not the engine.

Training length: ``trainer.epochs`` passes over the sampler's batches, or, when
``trainer.max_iters`` is set, exactly that many iterations (epochs then only
mark where the sampler reshuffles and where ``trainer.eval_every`` counts).
Either way one DataLoader iterator serves the whole run
(:class:`~softmine.data.run_batches.RunBatchSampler`); the loop finds the epoch
boundaries by counting each epoch's batches.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from softmine.data.run_batches import RunBatchSampler
from softmine.engine.checkpoint import BEST, CHECKPOINT_DIR, LAST, Checkpoints
from softmine.engine.components import Components, build_components, setup_process
from softmine.engine.distributed import any_rank, barrier, broadcast_buffers
from softmine.engine.embedding import raw_inputs
from softmine.engine.eval_history import selection_summary, write_eval_log
from softmine.engine.evaluator import Evaluator
from softmine.engine.failures import (
    explaining_stops,
    interrupted,
    nonfinite_embeddings,
    report_skipped_images,
    saved_model_hint,
)
from softmine.engine.logger import RunLogger
from softmine.engine.outputs import RunOutputs, run_outputs
from softmine.engine.setup import describe_device, rank_seed
from softmine.engine.state import TrainState
from softmine.engine.step import TrainStep
from softmine.engine.step_stats import EPOCH, INTERVAL, StepStats
from softmine.engine.time_estimate import TimeEstimate, run_plan
from softmine.engine.validate import EVERY, FINAL, validate_config
from softmine.errors import ConfigError, DataError, StorageError, TrainingError
from softmine.evaluation import retrieval_metrics
from softmine.evaluation.knn import NonFiniteEmbeddings
from softmine.runs.atomic import remove_partial
from softmine.runs.layout import RUN_FILES, RunLayout
from softmine.runs.metrics_file import STEP_KEY, format_table, write_metrics
from softmine.runs.signals import GracefulInterrupt

__all__ = ["CHECKPOINT_DIR", "TRAIN_LOG_FILE", "EpochClock", "Trainer"]

log = logging.getLogger(__name__)

TRAIN_LOG_FILE = RUN_FILES.train_log.name


class Trainer:
    """Trains the components :func:`~softmine.engine.components.build_components` makes of ``cfg``,
    in ``run_dir``: the loop, its evaluations, checkpoints and resume.

    The components read as attributes too (``trainer.model``, ``trainer.loader``, ...).
    """

    def __init__(self, cfg: DictConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        validate_config(cfg, self.run_dir)
        dist, device = setup_process(cfg)
        if dist.is_main:
            log.info("training on %s", describe_device(device))
        self.ckpts = Checkpoints(self.run_dir, dist.is_main)
        self.ckpts.check_run_folder(bool(cfg.resume))
        self.parts: Components = build_components(cfg, self.run_dir, dist, device)
        self.state = TrainState()
        self._start_run_batches()
        self.stepper = TrainStep(self.parts, cfg, self.ckpts)
        self.weights, self.guard = self.stepper.weights, self.stepper.guard
        self.stats = self.stepper.stats
        self._restored = False  # resume=true: the checkpoint is loaded (restore())
        self._finished_before: dict[str, float] | None = None  # metrics.json of a finished run
        self.test_embeddings: tuple[int, Any, Any] | None = None  # (step, embeddings, labels)
        self.logger = RunLogger.from_config(self.run_dir, TRAIN_LOG_FILE, cfg, enabled=dist.is_main)

    def __getattr__(self, name: str) -> Any:
        """The components by name (``trainer.model`` is ``trainer.parts.model``)."""
        if name.startswith("__") or "parts" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["parts"], name)

    @property
    def ckpt_dir(self) -> Path:
        return self.ckpts.dir

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self, name: str = LAST) -> Path:
        """Write a checkpoint atomically into ``checkpoints/`` (rank 0 only under torch.distributed).

        Only finite weights are ever saved: the weight check runs first.
        """
        self.check_weights()
        if self.ckpts.is_main:
            self.state.log_rows = len(self.logger)
            self.stepper.stats_into(self.state)
        return self.ckpts.save(self.parts, self.state, self.cfg, name)

    def load_checkpoint(self, path: Path) -> None:
        """Restore everything :meth:`save_checkpoint` wrote, checking it fits this config."""
        self.state = self.ckpts.load(path, self.parts, self.cfg)
        self.stepper.stats_from(self.state)
        self.logger.truncate(self.state.log_rows)

    def restore(self) -> None:
        """With ``resume=true``, load ``checkpoints/last.pt`` (once; :meth:`train` calls it too).
        The command calls it first: a damaged or foreign checkpoint is refused before any write."""
        if self._restored or not self.cfg.resume:
            return
        if self.ckpts.last.exists():
            self.load_checkpoint(self.ckpts.last)
        self._restored = True

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, model: torch.nn.Module | None = None) -> dict[str, float]:
        """Metrics of ``model`` (default: the trained one); the test split joins as
        ``evaluation.test`` says (every evaluation, the final one, never).

        Under torch.distributed every rank first takes rank 0's BatchNorm statistics, so all
        ranks embed with the network rank 0 saves. The trained network's test embeddings are
        kept (``test_embeddings``, with the step) for the plots.
        """
        p = self.parts
        if model is None:
            broadcast_buffers(p.model)
            broadcast_buffers(p.loss_fn)
        test = p.test_mode == EVERY or (p.test_mode == FINAL and self._done())
        try:
            metrics = p.evaluator.evaluate(model or p.model, test=test or model is not None)
        except NonFiniteEmbeddings:
            lr = self.cfg.optimizer.get("lr")
            raise nonfinite_embeddings(self.state.step, self.ckpts, lr) from None
        if model is None and p.evaluator.embeddings is not None:
            self.test_embeddings = (self.state.step, *p.evaluator.embeddings)
        return metrics

    def baselines(self) -> dict[str, dict[str, float]]:
        """Metrics of raw inputs and of the untrained network on the same test split."""
        return baseline_metrics(self.parts.evaluator, self.cfg.evaluation.ks, self.evaluate)

    def _evaluate_now(self) -> dict[str, float]:
        """Evaluate, record the row in ``eval_log.csv`` and track ``best.pt``; returns the metrics."""
        s = self.state
        self.check_weights()
        final = self._done()  # then the trained network is kept, whatever happens next
        if final and self.ckpts.saved_step != s.step:
            try:
                self.save_checkpoint()
            except StorageError as e:  # evaluate all the same: fit() says what was kept
                log.warning("%s; evaluating the trained network all the same", e)
        t0 = time.perf_counter()
        try:
            s.metrics = self.evaluate()
        except (ConfigError, DataError, TrainingError) as e:
            if not final:
                raise
            raise type(e)(f"{e}. {saved_model_hint(self.ckpts, s.step)}") from e
        record_evaluation(s, time.perf_counter() - t0, self.run_dir, self.parts.dist.is_main)
        self._track_best()
        return s.metrics

    def _track_best(self) -> None:
        """``trainer.save_best``: ``best.pt`` follows the best evaluation of the monitored metric."""
        t = self.cfg.trainer
        if t.save_best and new_best(self.state, t, self.parts.monitor):
            self.save_checkpoint(BEST)

    def final_metrics(self) -> dict[str, float]:
        """What ``metrics.json`` holds (:func:`final_metrics`)."""
        return final_metrics(self.state, self.parts)

    # ---------------------------------------------------------------- one step
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Forward, backward and optimizer step on one batch; returns the values to log
        (0-d device tensors; {} for a skipped step). See :meth:`TrainStep.run`."""
        return self.stepper.run(x, y, self.state)

    def check_weights(self) -> None:
        """Stop at the first step whose loss, gradient or update of the weights was not finite."""
        self.stepper.check()

    # ---------------------------------------------------------------- the run
    def fit(self) -> dict[str, float]:
        """:meth:`train`, then :meth:`close`; returns what metrics.json holds. ``softmine-train``
        writes its end-of-run reports between the two (``softmine.reporting.artifacts.fit_and_report``).

        A second Ctrl-C or a file that cannot be written (a full disk) stops the run with one
        error that says what was kept where.
        """
        with self.explaining_stops():
            self.train()
            return self.close()

    def explaining_stops(self) -> AbstractContextManager[None]:
        """A second Ctrl-C or a failed write inside becomes one error saying what was kept where."""
        return explaining_stops(self.ckpts, lambda: self.state)

    def train(self) -> RunOutputs | None:
        """Train (resuming if asked) and evaluate; write metrics.json, then the final checkpoint.

        Returns what the end-of-run reports read; None when ``resume=true`` found the run
        already finished (its metrics unchanged: :meth:`close` returns them).
        """
        if self.parts.dist.is_main:  # temporary files a killed writer left behind
            remove_partial(self.ckpts.dir)
            remove_partial(self.run_dir)
        if self._resume():
            return None
        if self.cfg.trainer.baselines and not self.state.baselines:
            self.state.baselines = self.baselines()
        self._loop()
        self.check_weights()
        if self.state.last_eval_step != self.state.step:
            self._evaluate_now()
        self.state.finished = True
        if self.parts.dist.is_main:  # the result, naming the step of the checkpoint saved before it
            write_metrics(self.run_dir, self.final_metrics())
        self.save_checkpoint()  # again: the finished state and the final evaluation's row
        kept, summary = self.test_embeddings, metrics_summary(self.state, self.parts)
        return run_outputs(self.cfg, self.run_dir, self.parts, self.state, summary, kept)

    def _resume(self) -> bool:
        """``resume=true``: continue from ``last.pt``; True when that run had already finished."""
        last, metrics = self.ckpts.last, RunLayout(self.run_dir).metrics
        if self.cfg.resume and last.exists():
            self.restore()
            s = self.state
            log.info("resumed from %s at step %d (epoch %d)", last, s.step, s.epoch + 1)
            if s.finished and self._done() and metrics.exists():
                log.info("this run had already finished; its metrics are unchanged")
                self._finished_before = json.loads(metrics.read_text())
                return True
            if s.finished:  # extended (resume_override=[trainer.epochs]): train on
                s.finished, s.metrics = False, {}
        elif self.cfg.resume:
            log.info("resume=true but no checkpoint in %s yet: starting from scratch", last.parent)
            self.logger.truncate(0)
        return False

    def close(self) -> dict[str, float]:
        """End the run once every rank is here: say what was skipped, print the baselines
        table, close the loggers; returns what metrics.json holds."""
        if self._finished_before is not None:
            return self._finished_before
        barrier()
        if self.parts.dist.is_main:
            dropped = self.parts.evaluator.dropped
            report_skipped_images(RunLayout(self.run_dir).bad_images, dropped)
            if self.state.baselines:
                trained = {"trained embedding": self.state.metrics}
                print(format_table({**self.state.baselines, **trained}))
        self.logger.close()
        return self.final_metrics()

    # ---------------------------------------------------------------- the loop
    def _loop(self) -> None:
        """The steps to the run's end, epoch by epoch, from one loader iterator."""
        t, p = self.cfg.trainer, self.parts
        every, log_every = int(t.checkpoint_every), int(t.log_every)
        check_every = int(t.get("interrupt_every", 10))
        length = RunLength.of(t)  # the config read once, not per step
        steps_here = 0  # steps of this process (a stop requested before the loop: after the first)
        with (
            GracefulInterrupt() as interrupt,
            progress_bar(t, p.total_steps, self.state.step, p.dist.is_main) as bar,
        ):
            s = self.state
            estimate = TimeEstimate(self.cfg, p.device, lambda step: run_plan(t, p, step), s.step)
            self._start_run_batches()
            seed = rank_seed(int(self.cfg.seed), p.dist.rank)  # workers differ per rank
            p.loader_generator.manual_seed(seed * 1_000_003 + s.epoch)
            batches = iter(p.loader)  # the run's batches: epoch boundaries found by counting
            while not length.done(s):
                bar.set_description(f"epoch {s.epoch + 1}", refresh=False)
                clock = EpochClock()
                left = len(p.sampler.rank_batches(s.epoch)) - s.batch
                for x, y in clock.wrap(batches, left):
                    values = self.train_step(x, y)
                    s.step += 1
                    if p.dist.is_main:  # trainer.time_estimate: one line after the timed step
                        estimate.after_step(s.step)
                    s.batch += 1
                    steps_here += 1
                    clock.images += len(y)
                    bar.update()
                    if values:
                        self.stats.add(values)
                    if log_every > 0 and s.step % log_every == 0 and self.stats.steps(INTERVAL):
                        self._log_interval()
                    if length.eval_due(s.step):
                        self._evaluate_now()
                    if length.done(s):
                        break
                    if every > 0 and s.step % every == 0:
                        self.save_checkpoint()
                    if steps_here == 1 or s.step % check_every == 0:
                        self.check_weights()
                        show_progress(bar, self.stats, clock)
                        if any_rank(interrupt.requested, p.device):
                            self._stop_interrupted(interrupt.signum or signal.SIGINT)
                self._end_epoch(clock)
                if any_rank(interrupt.requested, p.device) and not length.done(s):
                    self._stop_interrupted(interrupt.signum or signal.SIGINT)
            del batches  # its workers stop now, before the final evaluation

    def _start_run_batches(self) -> None:
        """Point the run's batch sampler at the state's epoch and batch, to the run's end."""
        start_run_batches(self.parts.run_batches, self.cfg.trainer, self.state)

    def _done(self) -> bool:
        return run_done(self.cfg.trainer, self.state)

    def _end_epoch(self, clock: EpochClock) -> None:
        """Log the epoch's means and timing, evaluate when due, then move to the next epoch."""
        s, t = self.state, self.cfg.trainer
        self.check_weights()
        lr = self.parts.optimizer.param_groups[0]["lr"]
        row = epoch_row(s, self.stats.means(EPOCH), lr, clock, self.parts.device)
        s.epoch += 1
        s.batch = 0
        self.stats.reset(EPOCH)
        every = int(t.eval_every)
        if self._done() or (every > 0 and s.epoch % every == 0):
            if s.last_eval_step != s.step:
                self._evaluate_now()
            row.update(s.metrics)
        self.logger.log(row)
        shown = "".join(f" {k} {v:.4f}" for k, v in s.metrics.items() if k in row)
        log.info(
            "epoch %d step %d loss %.4f%s", s.epoch, s.step, row.get("loss", float("nan")), shown
        )

    def _eval_due_at_step(self) -> bool:
        """``trainer.eval_every_iters`` > 0: every that many iterations from ``eval_start_iter``."""
        return RunLength.of(self.cfg.trainer).eval_due(self.state.step)

    def _log_interval(self) -> None:
        """A ``trainer.log_every`` row: the means over the applied steps since the previous row."""
        self.check_weights()
        s = self.state
        self.logger.log({"epoch": s.epoch + 1, "step": s.step, **self.stats.means(INTERVAL)})
        self.stats.reset(INTERVAL)

    def _stop_interrupted(self, signum: int) -> None:
        path = self.save_checkpoint()
        self.logger.close()
        raise interrupted(self.state.step, path, self.run_dir, signum)


@dataclass(frozen=True)
class RunLength:
    """When a run ends and when it evaluates between epochs, read once from ``cfg.trainer``."""

    max_iters: int | None  # trainer.max_iters, else the run is epochs long
    epochs: int
    eval_every_iters: int  # 0: no evaluation between epochs
    eval_start_iter: int

    @classmethod
    def of(cls, t: DictConfig) -> RunLength:
        """The rule of ``t`` (``cfg.trainer``)."""
        return cls(
            max_iters=None if t.max_iters is None else int(t.max_iters),
            epochs=int(t.epochs),
            eval_every_iters=int(t.get("eval_every_iters", 0) or 0),
            eval_start_iter=int(t.get("eval_start_iter", 0) or 0),
        )

    def done(self, state: TrainState) -> bool:
        """Whether the run has trained ``max_iters`` steps, or else ``epochs`` epochs."""
        if self.max_iters is not None:
            return state.step >= self.max_iters
        return state.epoch >= self.epochs

    def eval_due(self, step: int) -> bool:
        """Every ``eval_every_iters`` iterations (> 0) from ``eval_start_iter``."""
        every = self.eval_every_iters
        return every > 0 and step >= self.eval_start_iter and step % every == 0


def run_done(t: DictConfig, state: TrainState) -> bool:
    """Whether the run has trained ``trainer.max_iters`` steps, or else ``trainer.epochs`` epochs."""
    return RunLength.of(t).done(state)


def start_run_batches(run_batches: RunBatchSampler, t: DictConfig, state: TrainState) -> None:
    """Point ``run_batches`` at the state's epoch and batch, to the run's end."""
    s = state
    if t.max_iters is not None:
        run_batches.start_at(s.epoch, s.batch, max_batches=int(t.max_iters) - s.step)
    else:
        run_batches.start_at(s.epoch, s.batch, end_epoch=int(t.epochs))


def new_best(state: TrainState, t: DictConfig, monitor: str) -> bool:
    """Whether the latest evaluation beats ``state.best`` on ``monitor`` (then it becomes the best)."""
    value = state.metrics.get(monitor)
    if value is None:
        raise ConfigError(
            f"trainer.monitor={t.monitor!r} is not among the metrics {sorted(state.metrics)}"
        )
    if state.best is None or value > state.best:
        state.best = value
        return True
    return False


def baseline_metrics(
    evaluator: Evaluator, ks: Any, untrained: Callable[[], dict[str, float]]
) -> dict[str, dict[str, float]]:
    """``trainer.baselines``: metrics of the raw inputs on the test split, and of the untrained
    network (``untrained()``)."""
    if evaluator.protocol != "retrieval":
        raise ConfigError("trainer.baselines needs a retrieval test split (a `test` node)")
    x, y = raw_inputs(evaluator.test_set)
    return {"raw pixels": retrieval_metrics(x, y, ks), "untrained network": untrained()}


def final_metrics(state: TrainState, parts: Components) -> dict[str, float]:
    """What ``metrics.json`` holds: the final metrics, then :func:`metrics_summary`."""
    return {**state.metrics, **metrics_summary(state, parts)}


def metrics_summary(state: TrainState, parts: Components) -> dict[str, float]:
    """The keys of ``metrics.json`` after the final metrics: the test-chosen snapshot's
    (``best_test/*``), with a validation split the validation-chosen one's (``selected/*``),
    the step the final metrics belong to (``iteration``, the step of ``last.pt``) and the
    items evaluation left out (``dropped_items/*``: unreadable)."""
    return {
        **selection_summary(state.evals, parts.monitor),
        STEP_KEY: state.last_eval_step,
        **parts.evaluator.dropped_counts(),
    }


def record_evaluation(state: TrainState, seconds: float, run_dir: Path, write: bool) -> None:
    """Add the latest evaluation's row to ``state.evals`` (and ``eval_log.csv`` when ``write``)."""
    s = state
    s.last_eval_step = s.step
    s.evals.append({"iteration": s.step, "epoch": s.epoch, **s.metrics, "eval_s": seconds})
    if write:
        write_eval_log(RunLayout(run_dir).eval_log, s.evals)
    shown = " ".join(f"{k} {v:.4f}" for k, v in s.metrics.items())
    log.info("evaluation at iteration %d (%.1f s): %s", s.step, seconds, shown)


def epoch_row(
    state: TrainState,
    means: dict[str, float],
    lr: float,
    clock: EpochClock,
    device: torch.device,
) -> dict[str, Any]:
    """The ``train_log.csv`` row of the epoch ending: means, learning rate, timing, peak memory."""
    row: dict[str, Any] = {"epoch": state.epoch + 1, "step": state.step, **means, "lr": lr}
    row.update(clock.row())
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def progress_bar(t: DictConfig, total: int, initial: int, is_main: bool) -> tqdm:
    """One bar for the run (``t``: ``cfg.trainer``); off a terminal it writes at most every
    ``trainer.progress_interval`` s."""
    every = 0.1 if sys.stderr.isatty() else float(t.get("progress_interval", 30))
    return tqdm(
        total=total,
        initial=initial,
        leave=False,
        disable=not t.progress_bar or not is_main,
        mininterval=every,
        maxinterval=max(every, 10.0),  # tqdm's monitor forces a refresh after maxinterval
    )


def show_progress(bar: tqdm, stats: StepStats, clock: EpochClock) -> None:
    """The epoch's mean loss and images/s on the bar (reads the loss sum: one sync)."""
    if bar.disable or not stats.steps(EPOCH):
        return
    loss = stats.means(EPOCH).get("loss", float("nan"))
    bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{clock.rate():.0f}", refresh=False)


class EpochClock:
    """Wall time of an epoch split into waiting for the loader (``data_s``) and the rest (``step_s``)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.data_s = 0.0
        self.images = 0

    def wrap(self, batches: Iterator[Any], n: int) -> Iterator[Any]:
        """Yield the next ``n`` of ``batches`` (fewer if it ends), adding the time spent
        waiting for each to :attr:`data_s`."""
        for _ in range(n):
            t0 = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            self.data_s += time.perf_counter() - t0
            yield batch

    def rate(self) -> float:
        return self.images / max(time.perf_counter() - self.start, 1e-9)

    def row(self) -> dict[str, float]:
        """``epoch_time_s``, ``data_s``, ``step_s`` and ``images_per_s`` of the epoch so far."""
        total = time.perf_counter() - self.start
        return {
            "epoch_time_s": total,
            "data_s": self.data_s,
            "step_s": total - self.data_s,
            "images_per_s": self.images / max(total, 1e-9),
        }
