"""Verified, resumable downloads of the data sets that have a stable public URL.

:data:`DOWNLOADS` lists every published set. For CUB-200-2011 and Stanford Online
Products it holds the archive's URL, its published size and checksums; the others
need a form, a login or a drive link, and :func:`download` raises
:class:`ManualDownload` with where to get them and how to unpack them.

A download (:func:`fetch`) goes to ``<root>/<archive>.part``. If that file exists
(an earlier transfer was interrupted), the transfer resumes from its end with an
HTTP ``Range`` request; a server that ignores the range sends the whole file and
the part is started again. Only when the size and every published checksum match is
the part renamed to ``<root>/<archive>``; a mismatch deletes it and raises a
:class:`~softmine.errors.DataError` (a corrupt file is never kept as complete). The
archive is then unpacked into ``root`` (:func:`unpack`, refusing members that would
land outside it), which creates the folder the dataset config's ``dataset.root``
points to, and deleted unless asked to keep it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from softmine.data.sources import (
    CARS,
    CUB,
    ILIDSVID_SOURCE,
    INSHOP_SOURCE,
    LPW_SOURCE,
    MARS_SOURCE,
    PRID_SOURCE,
    SOP_SOURCE,
    Source,
)
from softmine.errors import ConfigError, DataError, SoftmineError

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes read and written at a time


@dataclass(frozen=True)
class Archive:
    """One published file: where it is, what it must be, and what unpacking it creates.

    Attributes:
        url: the publisher's URL.
        filename: the name it is saved under.
        size: its size in bytes (None: not published; only the checksums are checked).
        md5, sha256: its published checksums (hex; None where not published).
        creates: the folder, relative to the download root, that unpacking creates.
        marker: a file inside ``creates`` whose presence means the set is unpacked.
    """

    url: str
    filename: str
    size: int | None
    md5: str | None
    sha256: str | None
    creates: str
    marker: str


@dataclass(frozen=True)
class Download:
    """How one set is obtained: its archives, or, when there are none, what to do by hand."""

    source: Source
    archives: tuple[Archive, ...] = ()
    manual: str = ""


class ManualDownload(SoftmineError):
    """The set has no stable public URL; the message says where to get it and how to unpack it."""


DOWNLOADS: dict[str, Download] = {
    "cub": Download(
        CUB,
        (
            Archive(
                url="https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz",
                filename="CUB_200_2011.tgz",
                # Size and SHA-256: tensorflow/datasets url_checksums/caltech_birds2011.txt
                # (1150585339 bytes); MD5: the CUB loaders of TDeVries/cub2011_dataset and
                # avalanche (97eceeb1...), the same file.
                size=1_150_585_339,
                md5="97eceeb196236b17998738112f37df78",
                sha256="0c685df5597a8b24909f6a7c9db6d11e008733779a671760afef78feb49bf081",
                creates="CUB_200_2011",
                marker="images.txt",
            ),
        ),
    ),
    "sop": Download(
        SOP_SOURCE,
        (
            Archive(
                url="http://ftp.cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip",
                filename="Stanford_Online_Products.zip",
                # Size and SHA-256: tensorflow/datasets url_checksums/stanford_online_products.txt
                # (3083860082 bytes); MD5: pytorch-metric-learning's StanfordOnlineProducts
                # (up to v1.x) and torchvision-style SOP loaders (7f73d41a...).
                size=3_083_860_082,
                md5="7f73d41a2f44250d4779881525aea32e",
                sha256="b04fa78210e69fab050ce73939550e1cd0f96890bdd98ec9fee732c3b756ef48",
                creates="Stanford_Online_Products",
                marker="Ebay_test.txt",
            ),
        ),
    ),
    "cars196": Download(
        CARS,
        manual=(
            "get car_ims.tgz and cars_annos.mat (or the devkit distribution) and unpack them so "
            "that ROOT/cars196/ holds car_ims/ and cars_annos.mat: mkdir -p ROOT/cars196 && "
            "tar -xzf car_ims.tgz -C ROOT/cars196 && cp cars_annos.mat ROOT/cars196/"
        ),
    ),
    "mars": Download(
        MARS_SOURCE,
        manual=(
            "get bbox_train.zip and bbox_test.zip, and the info/ folder of "
            "github.com/liangzheng06/MARS-evaluation, and unpack them so that ROOT/mars/ holds "
            "bbox_train/, bbox_test/ and info/: unzip bbox_train.zip -d ROOT/mars && "
            "unzip bbox_test.zip -d ROOT/mars && cp -r MARS-evaluation/info ROOT/mars/"
        ),
    ),
    "ilidsvid": Download(
        ILIDSVID_SOURCE,
        manual=(
            "get iLIDS-VID.tar and unpack it so that ROOT/ilids-vid/ holds i-LIDS-VID/ and "
            "'train-test people splits/': mkdir -p ROOT/ilids-vid && "
            "tar -xf iLIDS-VID.tar -C ROOT/ilids-vid"
        ),
    ),
    "prid2011": Download(
        PRID_SOURCE,
        manual=(
            "get prid_2011.zip and unpack it so that ROOT/prid2011/ holds prid_2011/multi_shot/; "
            "train_test_splits_prid.mat comes from iLIDS-VID.tar ('train-test people splits/'): "
            "mkdir -p ROOT/prid2011/prid_2011 && unzip prid_2011.zip -d ROOT/prid2011/prid_2011"
        ),
    ),
    "inshop": Download(
        INSHOP_SOURCE,
        manual=(
            "get Img/img.zip and Eval/list_eval_partition.txt of the 'In-shop Clothes Retrieval "
            "Benchmark' and lay them out as published: mkdir -p ROOT/inshop/Img ROOT/inshop/Eval "
            "&& unzip img.zip -d ROOT/inshop/Img && cp list_eval_partition.txt ROOT/inshop/Eval/"
        ),
    ),
    "lpw": Download(
        LPW_SOURCE,
        manual=(
            "get pep_256x128.zip and unpack it so that ROOT/lpw/ holds pep_256x128/scen1, scen2 "
            "and scen3: mkdir -p ROOT/lpw && unzip pep_256x128.zip -d ROOT/lpw"
        ),
    ),
}


def _digests(path: Path) -> dict[str, str]:
    md5, sha256 = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            md5.update(block)
            sha256.update(block)
    return {"md5": md5.hexdigest(), "sha256": sha256.hexdigest()}


def verify(path: Path, archive: Archive) -> None:
    """A DataError unless ``path`` has the archive's published size and checksums."""
    size = path.stat().st_size
    if archive.size is not None and size != archive.size:
        raise DataError(
            f"{archive.filename}: {size:,} bytes, but the published size is {archive.size:,}"
        )
    digests = _digests(path)
    for kind in ("md5", "sha256"):
        want = getattr(archive, kind)
        if want is not None and digests[kind] != want.lower():
            raise DataError(
                f"{archive.filename}: {kind.upper()} {digests[kind]} does not match the published "
                f"{want}; the download is corrupt"
            )


def _open(url: str, start: int, timeout: float):
    headers = {"User-Agent": "softmine-data"}
    if start:
        headers["Range"] = f"bytes={start}-"
    return urlopen(Request(url, headers=headers), timeout=timeout)  # noqa: S310 - http(s) URLs only


def fetch(
    archive: Archive,
    folder: str | Path,
    *,
    timeout: float = 60.0,
    progress: Callable[[int, int | None], None] | None = None,
) -> Path:
    """Download ``archive`` into ``folder`` (resuming a ``.part``), verify it, return its path.

    ``progress(done, total)`` is called after every chunk. An interrupted transfer
    leaves the ``.part`` for the next call to resume and raises a DataError saying so;
    a size or checksum mismatch deletes the part and raises a DataError.
    """
    if not archive.url.startswith(("http://", "https://")):
        raise ConfigError(f"{archive.url} is not an http(s) URL")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final, part = folder / archive.filename, folder / (archive.filename + ".part")
    if final.is_file():
        verify(final, archive)
        return final
    start = part.stat().st_size if part.is_file() else 0
    if archive.size is not None and start > archive.size:
        part.unlink()
        start = 0
    if archive.size is None or start < archive.size:
        _transfer(archive, part, start, timeout, progress)
    try:
        verify(part, archive)
    except DataError:
        part.unlink()
        raise
    os.replace(part, final)
    return final


def _transfer(
    archive: Archive,
    part: Path,
    start: int,
    timeout: float,
    progress: Callable[[int, int | None], None] | None,
) -> None:
    """Append the bytes from ``start`` on to ``part`` (or rewrite it if the server ignores Range)."""
    try:
        response = _open(archive.url, start, timeout)
    except HTTPError as e:
        if e.code == 416 and start:  # nothing left to send: the part is complete
            return
        raise DataError(f"cannot download {archive.url}: HTTP {e.code} {e.reason}") from None
    except (URLError, OSError) as e:
        raise DataError(f"cannot reach {archive.url} ({getattr(e, 'reason', e)})") from None
    with response:
        if start and response.status != 206:
            log.info("%s: the server ignored the resume request; downloading again", archive.url)
            start = 0
        length = response.headers.get("Content-Length")
        total = start + int(length) if length is not None else archive.size
        done = start
        try:
            with open(part, "ab" if start else "wb") as out:
                for block in iter(lambda: response.read(CHUNK), b""):
                    out.write(block)
                    done += len(block)
                    if progress is not None:
                        progress(done, total)
        except (OSError, ValueError, HTTPException) as e:  # reset, timeout, IncompleteRead
            raise DataError(
                f"the download of {archive.url} stopped after {done:,} bytes ({e}); run the "
                f"same command again to resume it from {part}"
            ) from None
    if total is not None and done < total:
        raise DataError(
            f"the download of {archive.url} stopped after {done:,} of {total:,} bytes; run the "
            f"same command again to resume it from {part}"
        )


def _safe_members(names: list[str], dest: Path) -> None:
    root = dest.resolve()
    for name in names:
        target = (dest / name).resolve()
        if os.path.isabs(name) or (target != root and root not in target.parents):
            raise DataError(f"the archive member {name!r} would be written outside {dest}")


def unpack(path: Path, dest: Path) -> None:
    """Extract a .tgz/.tar/.zip archive into ``dest``; members may not leave ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                _safe_members(z.namelist(), dest)
                z.extractall(dest)
            return
        with tarfile.open(path) as t:
            _safe_members(t.getnames(), dest)
            for member in t.getmembers():
                if member.issym() or member.islnk():
                    _safe_members(
                        [os.path.join(os.path.dirname(member.name), member.linkname)], dest
                    )
            if hasattr(tarfile, "data_filter"):
                t.extractall(dest, filter="data")
            else:  # Python < 3.10.12: members were checked above
                t.extractall(dest)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error) as e:
        raise DataError(f"cannot unpack {path} ({e}); delete it and download again") from None


def download(
    name: str,
    root: str | Path,
    *,
    keep_archive: bool = False,
    timeout: float = 60.0,
    progress: Callable[[int, int | None], None] | None = None,
    downloads: dict[str, Download] | None = None,
) -> Path:
    """Fetch, verify and unpack set ``name`` under ``root``; returns its ``dataset.root`` folder.

    Raises :class:`ManualDownload` for sets without a stable public URL, and a
    ConfigError for an unknown name. Already unpacked sets are left as they are.
    """
    table = DOWNLOADS if downloads is None else downloads
    if name not in table:
        raise ConfigError(f"unknown data set {name!r}; choose one of {sorted(table)}")
    entry, root = table[name], Path(root)
    if not entry.archives:
        raise ManualDownload(
            f"{entry.source.name} has no public URL with a published checksum (it is "
            f"behind a form, a login or a drive link, or only on mirrors): open {entry.source.url}, "
            f"then {entry.manual.replace('ROOT', str(root))}. Check the copy with "
            f"`softmine-data check {name} {root / entry.source.folder.split('/')[-1]}`."
        )
    for archive in entry.archives:
        target = root / archive.creates
        if (target / archive.marker).is_file():
            log.info("%s is already unpacked at %s", archive.filename, target)
            continue
        path = fetch(archive, root, timeout=timeout, progress=progress)
        unpack(path, root)
        if not (target / archive.marker).is_file():
            raise DataError(
                f"{archive.filename} unpacked, but {target / archive.marker} is not there; "
                "the archive's layout is not the published one"
            )
        if not keep_archive:
            path.unlink()
    return root / entry.archives[0].creates
