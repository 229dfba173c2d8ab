"""``softmine-data download`` against a local HTTP server on 127.0.0.1 serving small fake archives."""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from softmine.commands.data import main
from softmine.data import CUB200, StanfordOnlineProducts
from softmine.data.download import DOWNLOADS, Archive, Download, download, fetch, unpack
from softmine.data.sources import CUB, SOP_SOURCE
from softmine.errors import ConfigError, DataError
from softmine.testing.fakes import make_cub, make_sop


class Server:
    """Files served from memory; ``cut[name] = n`` sends the first n bytes once, then hangs up."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}
        self.ignore_range: set[str] = set()
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                name = self.path.lstrip("/")
                server.requests.append((name, self.headers.get("Range")))
                if name not in server.files:
                    self.send_error(404)
                    return
                data, start = server.files[name], 0
                rng = self.headers.get("Range")
                if rng and name not in server.ignore_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if name in server.cut:
                    self.wfile.write(body[: server.cut.pop(name)])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    s.thread.start()
    try:
        yield s
    finally:
        s.httpd.shutdown()
        s.httpd.server_close()
        s.thread.join(timeout=5)


def _tgz(folder: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        t.add(folder, arcname=folder.name)
    return buf.getvalue()


def _zip(folder: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for path in sorted(folder.rglob("*")):
            z.write(path, path.relative_to(folder.parent).as_posix())
    return buf.getvalue()


def _archive(url: str, data: bytes, creates: str, marker: str, name: str) -> Archive:
    return Archive(
        url=url,
        filename=name,
        size=len(data),
        md5=hashlib.md5(data).hexdigest(),
        sha256=hashlib.sha256(data).hexdigest(),
        creates=creates,
        marker=marker,
    )


@pytest.fixture(scope="module")
def cub_tgz(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return _tgz(make_cub(tmp_path_factory.mktemp("src") / "CUB_200_2011"))


def _cub(server: Server, data: bytes, name: str = "CUB_200_2011.tgz") -> dict[str, Download]:
    server.files[name] = data
    archive = _archive(server.url(name), data, "CUB_200_2011", "images.txt", "CUB_200_2011.tgz")
    return {"cub": Download(CUB, (archive,))}


def test_good_archive_is_verified_unpacked_and_loads(
    server: Server, cub_tgz: bytes, tmp_path: Path
) -> None:
    folder = download("cub", tmp_path / "data", downloads=_cub(server, cub_tgz))
    assert folder == tmp_path / "data" / "CUB_200_2011"
    assert len(CUB200(folder, "train")) == 6 and len(CUB200(folder, "test")) == 6
    assert not (tmp_path / "data" / "CUB_200_2011.tgz").exists()  # archive removed after unpacking
    assert not list((tmp_path / "data").glob("*.part"))
    # A second call finds the unpacked set and contacts nobody.
    before = len(server.requests)
    download("cub", tmp_path / "data", downloads=_cub(server, cub_tgz))
    assert len(server.requests) == before


def test_sop_zip_unpacks_to_the_configs_default_root(server: Server, tmp_path: Path) -> None:
    data = _zip(make_sop(tmp_path / "src" / "Stanford_Online_Products"))
    server.files["sop.zip"] = data
    archive = _archive(
        server.url("sop.zip"),
        data,
        "Stanford_Online_Products",
        "Ebay_test.txt",
        "Stanford_Online_Products.zip",
    )
    folder = download(
        "sop",
        tmp_path / "data",
        keep_archive=True,
        downloads={"sop": Download(SOP_SOURCE, (archive,))},
    )
    assert folder.name == "Stanford_Online_Products" == Path(SOP_SOURCE.folder).name
    assert len(StanfordOnlineProducts(folder, "test")) == 6
    assert (tmp_path / "data" / "Stanford_Online_Products.zip").is_file()


def test_corrupt_archive_is_a_checksum_error_and_not_kept(
    server: Server, cub_tgz: bytes, tmp_path: Path
) -> None:
    table = _cub(server, cub_tgz)
    corrupt = bytearray(cub_tgz)
    corrupt[100] ^= 0xFF  # same size, one byte changed
    server.files["CUB_200_2011.tgz"] = bytes(corrupt)
    with pytest.raises(DataError, match=r"MD5 [0-9a-f]{32} does not match the published"):
        download("cub", tmp_path, downloads=table)
    assert not (tmp_path / "CUB_200_2011.tgz").exists()
    assert not (tmp_path / "CUB_200_2011.tgz.part").exists()
    assert not (tmp_path / "CUB_200_2011").exists()
    server.files["CUB_200_2011.tgz"] = cub_tgz[:-10]  # a short file fails on its size first
    with pytest.raises(DataError, match=f"but the published size is {len(cub_tgz):,}"):
        download("cub", tmp_path, downloads=table)


def test_interrupted_transfer_resumes_with_a_range_request(
    server: Server, cub_tgz: bytes, tmp_path: Path
) -> None:
    table = _cub(server, cub_tgz)
    half = len(cub_tgz) // 2
    server.cut["CUB_200_2011.tgz"] = half
    with pytest.raises(DataError, match=f"stopped after {half:,} .*run the same command again"):
        download("cub", tmp_path, downloads=table)
    part = tmp_path / "CUB_200_2011.tgz.part"
    assert part.stat().st_size == half and not (tmp_path / "CUB_200_2011").exists()
    folder = download("cub", tmp_path, downloads=table)
    assert server.requests[-1] == ("CUB_200_2011.tgz", f"bytes={half}-")
    assert len(CUB200(folder, "test")) == 6 and not part.exists()


def test_server_ignoring_range_restarts_cleanly(
    server: Server, cub_tgz: bytes, tmp_path: Path
) -> None:
    table = _cub(server, cub_tgz)
    (tmp_path / "CUB_200_2011.tgz.part").write_bytes(cub_tgz[:50])
    server.ignore_range.add("CUB_200_2011.tgz")
    folder = download("cub", tmp_path, downloads=table)
    assert server.requests[-1][1] == "bytes=50-" and (folder / "images.txt").is_file()


def test_fetch_of_a_complete_part_verifies_without_downloading(
    server: Server, cub_tgz: bytes, tmp_path: Path
) -> None:
    archive = _cub(server, cub_tgz)["cub"].archives[0]
    (tmp_path / "CUB_200_2011.tgz.part").write_bytes(cub_tgz)
    assert fetch(archive, tmp_path).read_bytes() == cub_tgz
    assert server.requests == []


def test_missing_file_on_the_server_is_one_clear_error(server: Server, tmp_path: Path) -> None:
    archive = Archive(server.url("nope.tgz"), "nope.tgz", 10, None, None, "x", "y")
    with pytest.raises(DataError, match="cannot download .*nope.tgz: HTTP 404"):
        fetch(archive, tmp_path)
    with pytest.raises(ConfigError, match="not an http"):
        fetch(Archive("file:///etc/passwd", "p", None, None, None, "x", "y"), tmp_path)


def test_a_damaged_archive_that_passes_no_checksum_is_one_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.tgz"
    broken.write_bytes(b"\x1f\x8b" + b"\x00" * 40)  # gzip magic, then nothing valid
    with pytest.raises(DataError, match="cannot unpack .*broken.tgz"):
        unpack(broken, tmp_path / "dest")


def test_archive_members_may_not_leave_the_root(tmp_path: Path) -> None:
    evil = tmp_path / "evil.tgz"
    with tarfile.open(evil, "w:gz") as t:
        info = tarfile.TarInfo("../outside.txt")
        info.size = 2
        t.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(DataError, match="would be written outside"):
        unpack(evil, tmp_path / "dest")
    assert not (tmp_path / "outside.txt").exists()


def test_cli_downloads_and_prints_the_training_command(
    server: Server,
    cub_tgz: bytes,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(DOWNLOADS, "cub", _cub(server, cub_tgz)["cub"])
    main(["download", "cub", "--root", str(tmp_path / "data"), "--no-progress"])
    out = capsys.readouterr().out
    assert f"dataset.root={tmp_path / 'data' / 'CUB_200_2011'}" in out
    server.files["CUB_200_2011.tgz"] = b"garbage"  # the published size and checksums differ
    with pytest.raises(SystemExit) as e:
        main(["download", "cub", "--root", str(tmp_path / "other"), "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: CUB_200_2011.tgz:")


@pytest.mark.parametrize("name", ["cars196", "mars", "ilidsvid", "prid2011", "inshop", "lpw"])
def test_sets_behind_a_form_print_where_and_how(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        main(["download", name, "--root", str(tmp_path), "--no-progress"])
    assert e.value.code == 1
    out = capsys.readouterr().out
    assert "has no public URL with a published checksum" in out
    assert DOWNLOADS[name].source.url in out and str(tmp_path) in out
    assert (
        f"`softmine-data check {name} {tmp_path / DOWNLOADS[name].source.folder.split('/')[-1]}`"
        in out
    )
    assert list(tmp_path.iterdir()) == []


def test_published_entries_are_complete() -> None:
    for name in ("cub", "sop"):
        (archive,) = DOWNLOADS[name].archives
        assert archive.url.startswith(("http://", "https://")) and archive.size
        assert len(archive.md5) == 32 and len(archive.sha256) == 64
        assert archive.creates == Path(DOWNLOADS[name].source.folder).name


def test_list(capsys: pytest.CaptureFixture[str]) -> None:
    main(["list"])
    out = capsys.readouterr().out
    assert "cub" in out and "automatic, 1.1 GiB" in out and "sop" in out and "2.9 GiB" in out


def test_softmine_data_check_a_copy_of_your_own(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`softmine-data check` (the command every data error names) exits 0 on a good copy and
    1 on a damaged one; it knows every set softmine.data.check can check."""
    from softmine.commands.data import CHECKABLE
    from softmine.data.check import CHECKS
    from softmine.testing.fakes import make_image_folder

    assert sorted(CHECKABLE) == sorted(CHECKS)
    root = make_image_folder(tmp_path / "images")
    main(["check", "imagefolder", str(root), "--workers", "1"])  # returns: exit 0
    assert capsys.readouterr().out.rstrip().endswith("all checks passed")
    bad = next(p for p in sorted(root.rglob("*")) if p.is_file())
    bad.write_bytes(b"not an image")
    with pytest.raises(SystemExit) as e:
        main(["check", "imagefolder", str(root), "--workers", "1"])
    assert e.value.code == 1
    out = capsys.readouterr().out
    assert f"[FAIL]   cannot decode image {bad}" in out and "problem(s) found" in out


def test_the_sources_know_which_sets_the_command_downloads() -> None:
    """Data errors name `softmine-data download` from softmine.data.sources alone (which the
    download module imports): what they say must match DOWNLOADS."""
    from softmine.data.sources import SOURCES

    assert {n for n, s in SOURCES.items() if s.url} == set(DOWNLOADS)
    verified = {n for n, s in SOURCES.items() if s.verified_download}
    assert verified == {n for n, e in DOWNLOADS.items() if e.archives}
    for name in verified:  # the archive unpacks into the default dataset.root's folder
        assert DOWNLOADS[name].archives[0].creates == Path(SOURCES[name].folder).name
