"""Check a downloaded dataset before training: files present, published counts, images readable.

Usage::

    python scripts/check_data.py cub data/CUB_200_2011
    python scripts/check_data.py mars data/mars --sample 20000 --workers 8
    python scripts/check_data.py csv data/my_dataset.csv

DATASET is a ``dataset=`` config name: cub, cars196, sop, inshop, mars, ilidsvid,
prid2011, lpw, or imagefolder / csv for your own data (no published counts: the
counts are listed and every image decoded). ROOT is what ``dataset.root`` points
to; for csv, the CSV file.
Prints one line per finding and exits 0 when everything matches, 1 when
something is missing, miscounted or unreadable, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import sys

from softmine.data.check import CHECKS, check
from softmine.hardware import available_cpus


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dataset", choices=sorted(CHECKS), help="dataset config name")
    parser.add_argument(
        "root", help="the dataset folder (what dataset.root points to); for csv the CSV file"
    )
    parser.add_argument(
        "--sample",
        type=int,
        default=None,
        help="decode only this many random images (default: all)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=min(8, available_cpus()),
        help="processes decoding images (default: min(8, usable CPUs))",
    )
    args = parser.parse_args(argv)
    report = check(args.dataset, args.root, sample=args.sample, workers=args.workers)
    print(report.render())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
