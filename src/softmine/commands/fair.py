"""``make fair``: every loss with its tuned setting over seeds, then one table that says what "wins" means.

``run`` trains ``softmine-train -m experiment=fair dataset=D loss=<every loss> seed=0,...,4``
(two runs at a time, one thread each) into ``multirun/fair/<dataset>/<time>``;
``table`` reads that sweep's run folders and writes ``fair.md``, ``fair.csv`` and
``val_curves.png`` there (:mod:`softmine.reporting.fair_benchmark`, where the table's columns
are defined).

Usage::

    python -m softmine.commands.fair run --dataset digits_pairs            # the sweep, then the table
    python -m softmine.commands.fair table multirun/fair/digits_pairs/...  # the table of a finished sweep
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from softmine.commands.common import ArgumentParser, user_errors_exit
from softmine.errors import ConfigError
from softmine.reporting.fair_benchmark import BASELINES, LOSSES, table
from softmine.runs.layout import SweepLayout

SEEDS = (0, 1, 2, 3, 4)
ROOT = Path("multirun") / "fair"


def sweep_args(
    dataset: str, losses: Sequence[str], seeds: Sequence[int], folder: Path
) -> list[str]:
    """The ``softmine-train`` arguments of the benchmark's sweep."""
    return [
        "-m",
        "experiment=fair",
        f"dataset={dataset}",
        f"loss={','.join(losses)}",
        f"seed={','.join(str(s) for s in seeds)}",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        f"hydra.sweep.dir={folder}",
    ]


def run(
    dataset: str,
    losses: Sequence[str] = LOSSES,
    seeds: Sequence[int] = SEEDS,
    root: Path = ROOT,
    overrides: Sequence[str] = (),
) -> Path:
    """Train every loss with its tuned setting over ``seeds``, two at a time; the sweep folder."""
    folder = (Path(root) / dataset / dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    args = [*sweep_args(dataset, losses, seeds, folder), *overrides]
    code = subprocess.run(
        [sys.executable, "-m", "softmine.commands.train", *args], env=env
    ).returncode
    if code not in (0, 1):  # 1: some runs failed; the table says which
        raise ConfigError(f"the benchmark's sweep stopped (exit status {code}); see {folder}")
    return folder


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds takes comma-separated integers, got {text!r}") from None


@user_errors_exit
def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m softmine.commands.fair", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train every loss with its tuned setting, then the table")
    r.add_argument("--dataset", default="digits_pairs")
    r.add_argument(
        "--losses",
        default=",".join(LOSSES),
        help="comma-separated (default: the 11 tuned ones; add "
        f"{','.join(BASELINES)} once `make tune` has tuned them)",
    )
    r.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated")
    r.add_argument("--root", type=Path, default=ROOT)
    r.add_argument("overrides", nargs="*", help="more overrides for every run (key=value)")
    t = sub.add_parser("table", help="the table of a finished sweep")
    t.add_argument("sweep", type=Path)
    args = p.parse_args(argv)
    if args.command == "run":
        losses = [x for x in args.losses.split(",") if x]
        folder = run(args.dataset, losses, _seeds(args.seeds), args.root, args.overrides)
    else:
        folder = args.sweep
    text, _ = table(folder)
    print(text)
    files = SweepLayout(folder)
    print(
        f"wrote {files.fair_markdown}, {files.fair_table.name}, {files.val_curves.name}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
