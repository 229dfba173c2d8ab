"""``softmine-data``: download the published data sets into the layout the loaders read; check a copy.

Examples::

    softmine-data list                              # every set: automatic or by hand, size
    softmine-data download cub --root data/         # -> data/CUB_200_2011 (dataset=cub's default)
    softmine-data download sop --root data/         # -> data/Stanford_Online_Products
    softmine-data download mars --root data/        # prints where to get MARS and how to unpack it
    softmine-data check cub data/CUB_200_2011       # files, published counts, every image decoded
    softmine-data check sop data/Stanford_Online_Products --sample 20000 --workers 8
    softmine-data check csv data/my_set.csv         # your own data: counts listed, images decoded
    softmine-data convert-caffemodel googlenet_bn.caffemodel googlenet_bn.pth

A download checks the published size, MD5 and SHA-256 before anything is
unpacked; an interrupted download resumes when the same command runs again.
``check`` takes a ``dataset=`` config name (cub, cars196, sop, inshop, mars,
ilidsvid, prid2011, lpw, or imagefolder / csv for your own data, which have no
published counts: theirs are listed and every image decoded) and what
``dataset.root`` points to (for csv, the CSV file), and prints one line per finding.
``convert-caffemodel`` writes Caffe weights as a PyTorch state dict with softmine's
names (:func:`softmine.models.caffe.convert_caffemodel`) and prints one line: the layers
read, the tensors and parameters written, and the BatchNorm layout found; the ``.pth``
loads wherever ``backbone.pretrained`` takes a file (the ``.caffemodel`` itself can be
given there too; converting once saves the time).
Exit status: 0 done (a check: everything matches), 1 the set must be fetched by
hand (instructions printed) or the check found something missing, miscounted or
unreadable, 2 an error (one ``error:`` line).
"""

from __future__ import annotations

import sys
from pathlib import Path

from softmine.commands.common import ArgumentParser, user_errors_exit
from softmine.data.download import DOWNLOADS, ManualDownload, download
from softmine.hardware import available_cpus

#: The data sets ``check`` knows (softmine.data.check.CHECKS; listed here so that
#: ``--help`` does not import every loader).
CHECKABLE = (*DOWNLOADS, "imagefolder", "csv")

EXIT_MANUAL = 1
EXIT_CHECK_FAILED = 1


class _Progress:
    """A tqdm byte counter on stderr, opened on the first chunk (nothing shows for manual sets)."""

    def __init__(self) -> None:
        self.bar = None

    def __call__(self, done: int, total: int | None) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr)
        if total is not None and self.bar.total != total:
            self.bar.total = total
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _list() -> None:
    for name, entry in DOWNLOADS.items():
        if entry.archives:
            size = sum(a.size or 0 for a in entry.archives) / 2**30
            how = f"automatic, {size:.1f} GiB, MD5 + SHA-256 checked"
        else:
            how = "by hand: `softmine-data download NAME` says where and how"
        print(f"{name:<10} {entry.source.name:<42} {how}")


def _check(dataset: str, root: str, sample: int | None, workers: int) -> None:
    """Print the check of the copy at ``root``; exit 1 when it found a problem."""
    from softmine.data.check import check

    report = check(dataset, root, sample=sample, workers=workers)
    print(report.render())
    if not report.ok:
        sys.exit(EXIT_CHECK_FAILED)


def _convert(source: Path, out: Path) -> None:
    """Convert a .caffemodel into a .pth and print what was converted."""
    from softmine.models.caffe import conversion_summary, convert_caffemodel

    state = convert_caffemodel(source, out)
    print(conversion_summary(state, source.expanduser(), out.expanduser()))


@user_errors_exit
def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="softmine-data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{list,download,check,convert-caffemodel}"
    )
    sub.add_parser("list", help="the data sets and how each is obtained")
    get = sub.add_parser("download", help="download, verify and unpack one data set")
    get.add_argument("name", choices=sorted(DOWNLOADS), help="dataset config name")
    get.add_argument(
        "--root", type=Path, default=Path("data"), help="folder to unpack into (default: data)"
    )
    get.add_argument(
        "--keep-archive", action="store_true", help="keep the verified archive after unpacking"
    )
    get.add_argument(
        "--timeout", type=float, default=60.0, help="seconds without data before giving up"
    )
    get.add_argument("--no-progress", action="store_true", help="no progress bar")
    chk = sub.add_parser(
        "check", help="check a copy: files present, published counts, every image readable"
    )
    chk.add_argument("dataset", choices=sorted(CHECKABLE), help="dataset config name")
    chk.add_argument(
        "root", help="the dataset folder (what dataset.root points to); for csv the CSV file"
    )
    chk.add_argument(
        "--sample", type=int, default=None, help="decode only this many random images (all)"
    )
    chk.add_argument(
        "--workers",
        type=int,
        default=min(8, available_cpus()),
        help="processes decoding images (default: min(8, usable CPUs))",
    )
    conv = sub.add_parser(
        "convert-caffemodel",
        help="convert Caffe weights (.caffemodel) to a PyTorch state dict with softmine's names",
    )
    conv.add_argument("caffemodel", type=Path, help="the Caffe weights (.caffemodel)")
    conv.add_argument("output", type=Path, help="where to write the state dict (.pth)")
    args = parser.parse_args(argv)
    if args.command == "list":
        _list()
        return
    if args.command == "check":
        _check(args.dataset, args.root, args.sample, args.workers)
        return
    if args.command == "convert-caffemodel":
        _convert(args.caffemodel, args.output)
        return
    progress = None if args.no_progress else _Progress()
    try:
        folder = download(
            args.name,
            args.root,
            keep_archive=args.keep_archive,
            timeout=args.timeout,
            progress=progress,
        )
    except ManualDownload as e:
        print(str(e))
        sys.exit(EXIT_MANUAL)
    finally:
        if progress is not None:
            progress.close()
    print(f"{DOWNLOADS[args.name].source.name} is ready in {folder}")
    print(f"train with: softmine-train dataset={args.name} dataset.root={folder}")


if __name__ == "__main__":
    main()
