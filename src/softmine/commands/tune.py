"""``make tune``: one loss's tuning study on a data set, resumable, and the tuned config it writes.

The study itself is Hydra's Optuna sweeper (``softmine-train -m experiment=tune
dataset=D loss=L``, configs/experiment/tune.yaml): the budget, the sampler and the
shared ranges of ``study/<dataset>.yaml``, the loss's own ranges of
``hparams_search/<loss>.yaml``, every trial scored by its final ``val/map@r`` on the
held-out training classes, the test split never read. This module adds what a
benchmark needs around it:

* the study lives in ``multirun/tune/<dataset>/<loss>/`` (``study.db``, Optuna's
  sqlite storage, and ``study.yaml``, the settings it was started with), each run of
  the command a ``session-N`` sweep folder in it;
* the budget is *completed* trials, the same number for every loss: a trial that
  fails (a diverged learning rate) or is interrupted does not count, and the command
  runs sessions until the budget is reached. Run it again after an interrupt and it
  resumes: completed trials are kept (a trial left running by a killed process is
  marked failed), the remaining ones are sampled; the sampler restarts from its seed,
  so a resumed study is not trial-for-trial the uninterrupted one;
* at the end it prints the best trial and writes its setting to
  ``configs/tuned/<dataset>/<loss>.yaml`` (what ``experiment=fair`` trains with), a
  file whose header and ``tuned`` node name the study: trials, seed, objective,
  search space, date and commit.

Usage::

    python -m softmine.commands.tune --dataset digits_pairs --loss contrastive
    python -m softmine.commands.tune --dataset digits_pairs --loss all      # every loss of LOSSES, in turn
"""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from softmine.commands.common import ArgumentParser, user_errors_exit
from softmine.config import CONFIG_DIR, upgrade_overrides
from softmine.errors import ConfigError, Interrupted
from softmine.evaluation.metric_names import MAP_AT_R, VAL_PREFIX
from softmine.reporting.fair_benchmark import LOSSES
from softmine.runs.layout import RUN_FILES, STUDY_FILES, StudyLayout, SweepLayout

ROOT = Path("multirun") / "tune"
OBJECTIVE = VAL_PREFIX + MAP_AT_R  # what the sweeper maximises (see softmine.commands.train)
TUNED_GROUP = "tuned"


@dataclass
class StudyResult:
    """A finished study: where it is, its best trial and the tuned config written from it."""

    folder: Path
    complete: int
    failed: int
    best_number: int
    best_value: float
    best_params: dict[str, Any]
    written: Path


def study_config(dataset: str, loss: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The composed config of the study (Hydra's settings included), as ``-m`` would build it."""
    from hydra import compose, initialize_config_dir

    given, _ = upgrade_overrides(overrides)  # the trials' softmine-train logs the old names
    args = ["experiment=tune", f"dataset={dataset}", f"loss={loss}", *given]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=args, return_hydra_config=True)


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ConfigError(
            "tuning needs Hydra's Optuna sweeper: pip install 'softmine[tune]'"
        ) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def settings(cfg: DictConfig, overrides: Sequence[str]) -> dict[str, Any]:
    """What a study is: resuming it with other settings would mix two studies."""
    sweeper = cfg.hydra.sweeper
    return {
        "dataset": str(cfg.dataset.name),
        "loss": str(cfg.hydra.runtime.choices.loss),
        "trials": int(sweeper.n_trials),
        "sampler": OmegaConf.to_container(sweeper.sampler, resolve=True),
        "search_space": {str(k): str(v) for k, v in sweeper.params.items()},
        "overrides": list(overrides),
    }


def _check_record(folder: Path, wanted: dict[str, Any]) -> None:
    record = StudyLayout(folder).record
    if not record.exists():
        return
    had = yaml.safe_load(record.read_text())
    differ = sorted(k for k in set(had) | set(wanted) if had.get(k) != wanted.get(k))
    if differ:
        raise ConfigError(
            f"{folder} holds a study with other settings ({', '.join(differ)} differ); resuming "
            f"it would mix two studies: move that folder away, or give another --root"
        )


def count_trials(storage: str, name: str) -> tuple[int, int]:
    """(complete, failed) trials of the study; trials left running are marked failed first."""
    optuna = _optuna()
    from optuna.trial import TrialState

    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:  # no study of that name yet
        return 0, 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_state(t._trial_id, TrialState.FAIL)  # its process is gone
    states = [t.state for t in study.get_trials(deepcopy=False)]
    return states.count(TrialState.COMPLETE), states.count(TrialState.FAIL)


def _session_dirs(folder: Path) -> list[Path]:
    return sorted(folder.glob("session-*"), key=lambda p: int(p.name.split("-")[1]))


def run_study(
    dataset: str,
    loss: str,
    *,
    root: Path = ROOT,
    configs: Path = Path(CONFIG_DIR),
    overrides: Sequence[str] = (),
) -> StudyResult:
    """Run (or resume) the study of ``loss`` on ``dataset`` until its budget of completed
    trials is reached; write the best setting to ``configs/tuned/<dataset>/<loss>.yaml``."""
    optuna = _optuna()
    cfg = study_config(dataset, loss, overrides)
    wanted = settings(cfg, overrides)
    budget = wanted["trials"]
    folder = (Path(root) / dataset / loss).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    _check_record(folder, wanted)
    StudyLayout(folder).record.write_text(yaml.safe_dump(wanted, sort_keys=True))
    storage, name = f"sqlite:///{StudyLayout(folder).db}", f"{dataset}-{loss}"
    complete, failed = count_trials(storage, name)
    while complete < budget:
        session = folder / f"session-{len(_session_dirs(folder))}"
        print(
            f"study {name}: {complete} of {budget} trials complete; running "
            f"{budget - complete} more in {session}",
            file=sys.stderr,
        )
        args = [
            "experiment=tune",
            f"dataset={dataset}",
            f"loss={loss}",
            *overrides,
            f"hydra.sweep.dir={session}",
            f"hydra.sweeper.storage={storage}",
            f"hydra.sweeper.study_name={name}",
            f"hydra.sweeper.n_trials={budget - complete}",
        ]
        code = _run_sweep(args)
        before = complete
        complete, failed = count_trials(storage, name)
        if code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
            raise Interrupted(
                f"study {name} interrupted with {complete} of {budget} trials complete; run the "
                f"same command again to resume it ({folder})",
                code - 128,
            )
        if complete == before:
            raise ConfigError(
                f"no trial of {session} completed (exit status {code}); see "
                f"{SweepLayout(session).summary} and the trials' {RUN_FILES.log}"
            )
    study = optuna.load_study(study_name=name, storage=storage)
    best = study.best_trial
    written = write_tuned(
        configs, cfg, overrides, best.params, _provenance(study, folder, wanted, best)
    )
    return StudyResult(folder, complete, failed, best.number, best.value, best.params, written)


def _run_sweep(args: list[str]) -> int:
    """``softmine-train -m ARGS`` in a child process, one thread per trial; its exit status.

    Ctrl-C reaches the child too (same process group); the child stops its trials and
    exits, and this waits for it.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, "-m", "softmine.commands.train", "-m", *args], env=env
    )
    while True:
        try:
            return child.wait()
        except KeyboardInterrupt:
            continue  # the child got the signal too and is stopping its trials


def _commit() -> str:
    res = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=CONFIG_DIR
    )
    return res.stdout.strip() or "unknown"


def _shown_path(folder: Path) -> str:
    """``folder`` relative to the working directory when it is below it (the repository)."""
    try:
        return str(folder.relative_to(Path.cwd()))
    except ValueError:
        return str(folder)


def _provenance(study: Any, folder: Path, wanted: dict[str, Any], best: Any) -> dict[str, Any]:
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    seconds = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in done)
    return {
        "dataset": wanted["dataset"],
        "loss": wanted["loss"],
        "study": _shown_path(folder),
        "trials": len(done),
        "best_trial": int(best.number),
        "val_map_at_r": float(best.value),
        "sampler_seed": (wanted["sampler"] or {}).get("seed"),
        "trial_seconds": round(seconds),
        "commit": _commit(),
        "date": dt.date.today().isoformat(),
    }


PROVENANCE_COMMENTS = {
    "dataset": "the data set it was tuned on",
    "loss": "the loss it was tuned for",
    "study": f"the study's folder ({STUDY_FILES.db}: every trial, {STUDY_FILES.record}: its settings)",
    "trials": "completed trials: the budget, the same for every loss",
    "best_trial": "the Optuna trial this setting is",
    "val_map_at_r": "that trial's final val/map@r on the held-out training classes (not a test number)",
    "sampler_seed": "the TPE sampler's seed",
    "trial_seconds": "wall seconds of the completed trials together (two ran at a time)",
    "commit": "the commit the study ran at",
    "date": "the day this file was written",
}


def tuned_values(cfg: DictConfig, params: dict[str, Any]) -> dict[str, Any]:
    """The best trial's values at their keys; a key into a list (``optimizer.param_groups.0.lr_mult``)
    gives the whole list as the trial had it (the other items and keys included)."""
    trial = cfg.copy()
    for key, value in params.items():
        OmegaConf.update(trial, str(key), value, merge=False)
    out: dict[str, Any] = {}
    for key in params:
        parts = str(key).split(".")
        cut = next((i for i, p in enumerate(parts) if p.isdigit()), len(parts))
        path = ".".join(parts[:cut])
        node = OmegaConf.select(trial, path)
        out[path] = OmegaConf.to_container(node) if OmegaConf.is_config(node) else node
    return out


def _yaml_value(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text[:-4].strip() if text.endswith("\n...") or text.endswith(" ...") else text


def write_tuned(
    configs: Path,
    cfg: DictConfig,
    overrides: Sequence[str],
    params: dict[str, Any],
    provenance: dict[str, Any],
) -> Path:
    """Write ``<configs>/tuned/<dataset>/<loss>.yaml``: provenance, then the chosen values,
    each key commented with the range it was searched in."""
    dataset, loss = provenance["dataset"], provenance["loss"]
    space = {str(k): str(v) for k, v in cfg.hydra.sweeper.params.items()}
    values = tuned_values(cfg, params)
    lines = [
        "# @package _global_",
        f"# The tuned setting of loss={loss} on dataset={dataset}, written by `make tune` "
        "(softmine.commands.tune); experiment=fair trains with it.",
        f"# Study: {provenance['trials']} completed trials of Hydra's Optuna sweeper (TPE, seed "
        f"{provenance['sampler_seed']}), objective {OBJECTIVE} on held-out training classes, the test",
        f"# split never read; search space: configs/study/{dataset}.yaml and "
        f"configs/hparams_search/{loss}.yaml"
        + (f"; overrides {list(overrides)}" if overrides else "")
        + ".",
        f"# Best trial {provenance['best_trial']}: {OBJECTIVE} {provenance['val_map_at_r']:.4f}; "
        f"{provenance['date']}, commit {provenance['commit']}. Regenerate with "
        f"`make tune DATASET={dataset} LOSS={loss}`.",
        "tuned:                     # where this setting comes from (experiment=fair requires it; every run records it)",
    ]
    for key, value in provenance.items():
        lines.append(f"  {key}: {_yaml_value(value)}  # {PROVENANCE_COMMENTS[key]}")
    tree: dict[str, Any] = {}
    for path, value in values.items():
        node = tree
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value

    def emit(node: dict[str, Any], indent: int, prefix: str) -> None:
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else key
            if isinstance(value, dict) and path not in values:
                lines.append(f"{' ' * indent}{key}:  # chosen by the study")
                emit(value, indent + 2, path)
                continue
            searched = [v for k, v in space.items() if k == path or k.startswith(path + ".")]
            lines.append(
                f"{' ' * indent}{key}: {_yaml_value(value)}  # chosen; searched: {', '.join(searched)}"
            )

    emit(tree, 0, "")
    out = Path(configs) / TUNED_GROUP / dataset / f"{loss}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return out


def _losses(text: str) -> list[str]:
    if text == "all":
        return list(LOSSES)
    names = [n for n in re.split(r"[,\s]+", text) if n]
    if not names:
        raise ConfigError("--loss names a loss, a comma-separated list, or all")
    return names


@user_errors_exit
def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(
        prog="python -m softmine.commands.tune",
        description="Run (or resume) a loss's tuning study and write its tuned config.",
    )
    p.add_argument("--dataset", default="digits_pairs", help="a data set with a benchmark protocol")
    p.add_argument("--loss", required=True, help="a loss, a comma-separated list, or all")
    p.add_argument("--root", type=Path, default=ROOT, help="studies go to ROOT/<dataset>/<loss>")
    p.add_argument(
        "--configs",
        type=Path,
        default=Path(CONFIG_DIR),
        help="write tuned/<dataset>/<loss>.yaml here",
    )
    p.add_argument("overrides", nargs="*", help="more overrides for every trial (key=value)")
    args = p.parse_args(argv)
    for loss in _losses(args.loss):
        r = run_study(
            args.dataset, loss, root=args.root, configs=args.configs, overrides=args.overrides
        )
        shown = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.best_params.items()
        )
        print(
            f"{args.dataset} {loss}: best of {r.complete} trials ({r.failed} failed, not counted) "
            f"is trial {r.best_number}, {OBJECTIVE} {r.best_value:.4f}: {shown}\n  wrote {r.written}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
