"""``softmine-report PATH...``: one table of finished runs, mean ± std over seeds, and its plots.

Examples::

    softmine-report multirun/noise/2026-11-28_13-00-00        # a sweep folder
    softmine-report outputs/2026-11-28 multirun/ablation -o report/
    softmine-report multirun/noise/... --x dataset.label_noise --metrics map@r attention_auc

What is read, how runs are grouped and what is written: :mod:`softmine.reporting.sweep_report`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from softmine.commands.common import ArgumentParser, user_errors_exit
from softmine.reporting.sweep_report import IGNORED, report
from softmine.runs.layout import RUN_FILES


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="softmine-report",
        description="Tables (Markdown + CSV) and plots of finished runs: mean ± std over seeds, "
        "one row per configuration (the overrides that vary, seed excluded).",
    )
    p.add_argument("paths", nargs="+", help="run folders, sweep folders, or folders above them")
    p.add_argument(
        "-o",
        "--out",
        help="output folder, not a run folder (default: PATH if one folder, PATH/summary if "
        "that is a run folder, else ./report)",
    )
    p.add_argument(
        "--metrics", nargs="+", help=f"metrics to show (default: all in {RUN_FILES.metrics})"
    )
    p.add_argument("--x", help="numeric override to plot against (default: the first that varies)")
    p.add_argument(
        "--ignore",
        nargs="+",
        default=[],
        help="more override keys to leave out of the grouping (seed always is)",
    )
    p.add_argument(
        "--run-plots",
        action="store_true",
        help="also draw each run's training curves / attention plot where missing, and "
        f"write its {RUN_FILES.report}",
    )
    return p


@user_errors_exit
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _, markdown, written = report(
        args.paths,
        out=args.out,
        metrics=args.metrics,
        x=args.x,
        ignore=(*IGNORED, *args.ignore),
        run_plots=args.run_plots,
    )
    print(markdown)
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
