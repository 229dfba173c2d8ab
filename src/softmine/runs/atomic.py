"""Atomic file writes: a temporary file, fsync, then a rename; nothing partial is ever left behind.

A crash or SIGKILL at any moment leaves either the previous file or the new one.
A write that fails (a full disk, a read-only or over-quota filesystem) removes its
temporary file and raises :class:`~softmine.errors.StorageError` naming the file.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from softmine.errors import StorageError

TMP_SUFFIX = ".tmp"


def tmp_path(path: Path) -> Path:
    """Where :func:`write_atomic` writes ``path`` before renaming it into place."""
    return path.with_name(path.name + TMP_SUFFIX)


def write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(file)`` on a temporary file next to ``path``, fsync it and rename it to ``path``."""
    path = Path(path)
    tmp = tmp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):  # e.g. the parent is a file: nothing was created
            tmp.unlink(missing_ok=True)
        cause = _os_error(e)
        if cause is None:
            raise
        raise StorageError(
            f"cannot write {path} ({cause.strerror or cause})", errno=cause.errno
        ) from e
    return path


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind ``e`` (``torch.save`` raises a RuntimeError from its cleanup after one)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return None


def write_text_atomic(path: Path, text: str) -> Path:
    """:func:`write_atomic` for UTF-8 text."""
    return write_atomic(path, lambda f: f.write(text.encode()))


def remove_partial(folder: Path) -> list[Path]:
    """Delete the temporary files a killed writer left in ``folder`` (not recursive); returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    left = [p for p in folder.glob(f"*{TMP_SUFFIX}") if p.is_file()]
    for p in left:
        p.unlink(missing_ok=True)
    return left
