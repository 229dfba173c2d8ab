"""Check a downloaded dataset: files present, counts equal to the published statistics, images readable.

The logic behind ``softmine-data check DATASET ROOT``. Every dataset is
loaded with the same classes training uses (so a copy that passes here loads
there), the counts are compared with :attr:`Source.stats`, and every image
(or a random sample of them) is decoded.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from softmine.data.datasets.cars import Cars196
from softmine.data.datasets.csvlist import read_csv_table, row_splits
from softmine.data.datasets.cub import CUB200
from softmine.data.datasets.ilidsvid import ILIDSVID
from softmine.data.datasets.imagefolder import ImageFolder
from softmine.data.datasets.inshop import InShop
from softmine.data.datasets.lpw import LPW
from softmine.data.datasets.mars import MARS, read_tracks
from softmine.data.datasets.prid2011 import PRID2011
from softmine.data.datasets.sop import StanfordOnlineProducts
from softmine.data.images import BadImageError, read_image
from softmine.data.sources import SOURCES
from softmine.errors import ConfigError, DataError


@dataclass
class Report:
    """Outcome of a check: one line per finding, each passed or failed."""

    dataset: str
    root: str
    lines: list[tuple[bool, str]] = field(default_factory=list)

    def add(self, ok: bool, message: str) -> None:
        self.lines.append((ok, message))

    @property
    def ok(self) -> bool:
        return all(ok for ok, _ in self.lines)

    def render(self) -> str:
        problems = sum(not ok for ok, _ in self.lines)
        head = f"{SOURCES[self.dataset].name} at {Path(self.root).resolve()}"
        body = [f"  [{'ok' if ok else 'FAIL'}] {msg}" for ok, msg in self.lines]
        tail = "all checks passed" if not problems else f"{problems} problem(s) found"
        return "\n".join([head, *body, tail])


def _compare(report: Report, counts: dict[str, int], expected: dict[str, int]) -> None:
    for key, value in counts.items():
        want = expected.get(key)
        if want is None:
            report.add(True, f"{key}: {value:,}")
        elif value == want:
            report.add(True, f"{key}: {value:,} (published: {want:,})")
        else:
            report.add(False, f"{key}: {value:,}, but the published count is {want:,}")


def _decode(path: str) -> str | None:
    try:
        read_image(path)
    except BadImageError as e:
        return str(e)
    return None


def check_images(
    report: Report, paths: Iterable[str], sample: int | None = None, workers: int = 1
) -> None:
    """Check every path exists, then decode all (or a seeded random ``sample``) of them."""
    todo = sorted(set(paths))
    missing = [p for p in todo if not os.path.isfile(p)]
    if missing:
        report.add(
            False, f"{len(missing):,} of {len(todo):,} image files missing, e.g. {missing[0]}"
        )
        absent = set(missing)
        todo = [p for p in todo if p not in absent]
    else:
        report.add(True, f"all {len(todo):,} image files present")
    total = len(todo)
    if sample is not None and sample < total:
        todo = sorted(random.Random(0).sample(todo, sample))
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            errors = [e for e in pool.map(_decode, todo, chunksize=256) if e]
    else:
        errors = [e for e in map(_decode, todo) if e]
    scope = f"{len(todo):,} randomly chosen of {total:,}" if len(todo) < total else f"all {total:,}"
    if not errors:
        report.add(True, f"{scope} present images decode")
        return
    report.add(False, f"{len(errors):,} of {scope} present images do not decode:")
    for e in errors[:10]:
        report.add(False, f"  {e}")
    if len(errors) > 10:
        report.add(False, f"  ... and {len(errors) - 10:,} more")


Counts = dict[str, int]


def _image_set(
    cls: type[CUB200] | type[Cars196], root: str, report: Report
) -> tuple[Counts, list[str]]:
    # skip: missing images are counted below (check_images) instead of stopping here
    train, test = (cls(root, split, on_bad_image="skip") for split in ("train", "test"))
    if isinstance(train, Cars196):
        report.add(True, f"distribution: {train.layout}")
    cls(root, "train", crop=True, on_bad_image="skip")
    report.add(True, "index files and bounding boxes present and consistent")
    counts = {
        "images": len(train) + len(test),
        "classes": train.num_classes + test.num_classes,
        "train_images": len(train),
        "test_images": len(test),
    }
    listed = [p for p, _ in train.samples + test.samples]
    return counts, listed + sorted(train.bad_images | test.bad_images)


def _frames(*sets: MARS | ILIDSVID | PRID2011 | LPW) -> list[str]:
    return [f for s in sets for frames, _, _ in s.tracklets for f in frames]


def _mars(root: str, report: Report) -> tuple[Counts, list[str]]:
    train, query = MARS(root, "train"), MARS(root, "query")
    gallery = MARS(root, "gallery")
    torchreid = MARS(root, "gallery", gallery_includes_query=False)
    train_names, _ = read_tracks(Path(root), "train")
    test_names, test_info = read_tracks(Path(root), "test")
    report.add(True, "info/ files present and consistent with each other")
    counts = {
        "train_frames": len(train_names),
        "test_frames": len(test_names),
        "train_tracklets": len(train),
        "train_identities": train.num_classes,
        "test_tracklets": len(test_info),
        "query_tracklets": len(query),
        "gallery_tracklets": len(gallery),
        "gallery_tracklets_without_query": len(torchreid),
    }
    frames = [
        str(Path(root) / f"bbox_{part}" / n[:4] / n)
        for part, names in (("train", train_names), ("test", test_names))
        for n in names
    ]
    return counts, frames


def _people_splits(
    cls: type[ILIDSVID] | type[PRID2011], root: str, report: Report
) -> tuple[Counts, list[str]]:
    train = cls(root, "train", split_id=0)
    query, gallery = cls(root, "query", split_id=0), cls(root, "gallery", split_id=0)
    n_splits = 1
    while True:
        try:
            cls(root, "query", split_id=n_splits)
        except ConfigError:
            break
        n_splits += 1
    report.add(True, f"sequence folders and split file present; all {n_splits} splits load")
    counts = {
        "identities": train.num_classes + query.num_classes,
        "tracklets": len(train) + len(query) + len(gallery),
        "splits": n_splits,
        "train_identities": train.num_classes,
        "test_identities": query.num_classes,
    }
    return counts, _frames(train, query, gallery)


def _listed(*sets: StanfordOnlineProducts | InShop | ImageFolder) -> list[str]:
    """Every listed image path (missing ones too: loaded with skip, they are in bad_images)."""
    return [p for s in sets for p, _ in s.samples] + sorted(
        set().union(*(s.bad_images for s in sets))
    )


def _unmatched_queries(
    report: Report, query: InShop | LPW, gallery: InShop | LPW, what: str
) -> None:
    """Check that every query identity is in the gallery (the published splits: all are)."""
    unmatched = set(query.pids.tolist()) - set(gallery.pids.tolist())
    report.add(not unmatched, f"{len(unmatched)} {what} (published: 0)")


def _sop(root: str, report: Report) -> tuple[Counts, list[str]]:
    train, test = (StanfordOnlineProducts(root, s, on_bad_image="skip") for s in ("train", "test"))
    report.add(True, "Ebay_train.txt and Ebay_test.txt present and readable")
    counts = {
        "images": len(train) + len(test) + len(train.bad_images | test.bad_images),
        "classes": train.num_classes + test.num_classes,
        "train_images": len(train) + len(train.bad_images),
        "train_classes": train.num_classes,
        "test_images": len(test) + len(test.bad_images),
        "test_classes": test.num_classes,
    }
    shared = set(train.classes.tolist()) & set(test.classes.tolist())
    report.add(not shared, f"train and test share {len(shared)} class(es) (published: 0)")
    return counts, _listed(train, test)


def _inshop(root: str, report: Report) -> tuple[Counts, list[str]]:
    train, query, gallery = (
        InShop(root, s, on_bad_image="skip") for s in ("train", "query", "gallery")
    )
    report.add(True, "list_eval_partition.txt present and readable")
    n = {
        s: len(d) + len(d.bad_images)
        for s, d in (("train", train), ("query", query), ("gallery", gallery))
    }
    test_items = set(query.pids.tolist()) | set(gallery.pids.tolist())
    counts = {
        "images": sum(n.values()),
        "train_images": n["train"],
        "train_items": train.num_classes,
        "query_images": n["query"],
        "gallery_images": n["gallery"],
        "test_items": len(test_items),
    }
    _unmatched_queries(report, query, gallery, "query item(s) without a gallery image")
    return counts, _listed(train, query, gallery)


def _lpw(root: str, report: Report) -> tuple[Counts, list[str]]:
    train, query, gallery = (LPW(root, s) for s in ("train", "query", "gallery"))
    report.add(True, "scen1..scen3 view folders present")

    def frames(s: LPW) -> int:
        return sum(len(t[0]) for t in s.tracklets)

    test_ids = set(query.pids.tolist()) | set(gallery.pids.tolist())
    counts = {
        "identities": train.num_classes + len(test_ids),
        "tracklets": len(train) + len(query) + len(gallery),
        "frames": frames(train) + frames(query) + frames(gallery),
        "train_identities": train.num_classes,
        "train_tracklets": len(train),
        "train_frames": frames(train),
        "query_tracklets": len(query),
        "query_frames": frames(query),
        "gallery_tracklets": len(gallery),
        "gallery_frames": frames(gallery),
    }
    _unmatched_queries(report, query, gallery, "query people absent from the gallery")
    return counts, _frames(train, query, gallery)


def _imagefolder(root: str, report: Report) -> tuple[Counts, list[str]]:
    train, test = (ImageFolder(root, s, on_bad_image="skip") for s in ("train", "test"))
    report.add(True, "class folders found; split by image with the default dataset.test_ratio")
    counts = {
        "images": len(train) + len(test),
        "classes": len(set(train.classes.tolist()) | set(test.classes.tolist())),
        "train_images": len(train),
        "test_images": len(test),
    }
    return counts, _listed(train, test)


def _csv(file: str, report: Report) -> tuple[Counts, list[str]]:
    table = read_csv_table(file)
    masks = row_splits(table)
    columns = [
        c
        for c in ("split", "is_query", "is_gallery", "camera", "sequence")
        if getattr(table, c) is not None
    ]
    report.add(True, f"{len(table):,} rows; optional columns present: {columns or 'none'}")
    counts = {
        "rows": len(table),
        "classes": len(table.numbering),
        **{f"{s}_rows": int(masks[s].sum()) for s in ("train", "test", "query", "gallery")},
    }
    if table.sequence is not None:
        counts["tracklets"] = len(
            {(int(i), s) for i, s in zip(table.ids, table.sequence, strict=True)}
        )
    return counts, list(table.paths)


CHECKS: dict[str, Callable[[str, Report], tuple[Counts, list[str]]]] = {
    "cub": lambda root, r: _image_set(CUB200, root, r),
    "cars196": lambda root, r: _image_set(Cars196, root, r),
    "mars": _mars,
    "ilidsvid": lambda root, r: _people_splits(ILIDSVID, root, r),
    "prid2011": lambda root, r: _people_splits(PRID2011, root, r),
    "sop": _sop,
    "inshop": _inshop,
    "lpw": _lpw,
    "imagefolder": _imagefolder,
    "csv": _csv,
}


def check(
    dataset: str,
    root: str | Path,
    expected: dict[str, int] | None = None,
    sample: int | None = None,
    workers: int = 1,
) -> Report:
    """Check the copy of ``dataset`` (a config name, see :data:`CHECKS`) at ``root``.

    ``root`` is what ``dataset.root`` points to (for ``csv``: the CSV file). Sets of
    your own (``imagefolder``, ``csv``) have no published counts: theirs are listed.
    ``expected`` replaces the published counts (for fake copies in tests);
    ``sample`` decodes only that many randomly chosen images.
    """
    if dataset not in CHECKS:
        raise ConfigError(f"unknown dataset {dataset!r}; choose one of {sorted(CHECKS)}")
    report = Report(dataset, str(root))
    try:
        counts, paths = CHECKS[dataset](str(root), report)
    except DataError as e:
        report.add(False, str(e))
        return report
    _compare(report, counts, SOURCES[dataset].stats if expected is None else expected)
    check_images(report, paths, sample, workers)
    return report
