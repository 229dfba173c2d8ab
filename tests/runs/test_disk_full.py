"""A full disk (or a read-only one) never loses a finished result nor leaves partial files."""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import sys
from pathlib import Path

import pytest
import torch

from softmine.engine import Trainer
from softmine.errors import StorageError
from softmine.runs.atomic import write_atomic
from tests.conftest import FAST_DIGITS, compose, run_forked


def _full(f) -> None:
    f.write(b"x" * 1000)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_failed_write_keeps_the_old_file_and_removes_the_partial_one(tmp_path: Path) -> None:
    path = tmp_path / "file.bin"
    path.write_bytes(b"old")
    with pytest.raises(StorageError, match=f"cannot write {path} \\(No space left on device\\)"):
        write_atomic(path, _full)
    assert path.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [path]


def test_a_parent_that_is_a_file_is_one_storage_error(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("not a folder")
    with pytest.raises(StorageError, match="cannot write .*plain/out.bin"):
        write_atomic(tmp_path / "plain" / "out.bin", lambda f: f.write(b"x"))


def test_an_error_raised_while_cleaning_up_after_a_full_disk_is_still_a_full_disk(
    tmp_path: Path,
) -> None:
    """torch.save reports ENOSPC as a RuntimeError from its zip writer's cleanup."""

    def torch_like(f) -> None:
        try:
            _full(f)
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos") from None

    with pytest.raises(StorageError, match="No space left on device"):
        write_atomic(tmp_path / "c.pt", torch_like)
    assert not list(tmp_path.iterdir())


def _trainer(tmp_path: Path, *overrides: str) -> Trainer:
    cfg = compose(["trainer.epochs=1", "trainer.device=cpu", *FAST_DIGITS, *overrides])
    return Trainer(cfg, tmp_path)


def _saves_fail_from(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """``torch.save`` writes part of the file, then finds the disk full, from its ``n``-th call."""
    real, calls = torch.save, {"n": 0}

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= n:
            _full(f)
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def test_results_are_written_before_the_final_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = _trainer(tmp_path, "trainer.checkpoint_every=0")  # the final checkpoint is the only one
    _saves_fail_from(monkeypatch, 1)
    with pytest.raises(StorageError) as e:
        t.fit()
    msg = str(e.value)
    assert "No space left on device" in msg
    assert f"the results are safe in {tmp_path / 'metrics.json'}" in msg
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0 < metrics["map@r"] <= 1
    assert not list(tmp_path.rglob("*.tmp"))


def test_disk_full_during_training_says_which_checkpoint_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = _trainer(tmp_path, "trainer.checkpoint_every=20")
    _saves_fail_from(monkeypatch, 2)  # the step-20 checkpoint is written, the step-40 one fails
    with pytest.raises(StorageError) as e:
        t.fit()
    last = tmp_path / "checkpoints" / "last.pt"
    assert f"training stopped at step 40; the last checkpoint, with finite weights, is {last} " in (
        str(e.value)
    )
    assert "(step 20)" in str(e.value) and "resume=true" in str(e.value)
    monkeypatch.undo()
    assert torch.load(last, weights_only=True)["train_state"]["step"] == 20
    assert not list(tmp_path.rglob("*.tmp")) and not (tmp_path / "metrics.json").exists()


def test_read_only_filesystem_is_one_sentence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = _trainer(tmp_path, "trainer.checkpoint_every=20")

    def read_only(src, dst):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr("softmine.runs.atomic.os.replace", read_only)
    with pytest.raises(StorageError, match="Read-only file system.*no checkpoint was written yet"):
        t.fit()
    assert not list(tmp_path.rglob("*.tmp"))


def _limit_file_size() -> None:
    """A real full disk for one process, without root: files may not grow past 200 kB."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes then fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


@pytest.mark.slow
def test_full_disk_as_a_command_keeps_the_result(tmp_path: Path) -> None:
    run = tmp_path / "R"
    args = [
        sys.executable,
        "-m",
        "softmine.commands.train",
        "trainer.epochs=1",
        "trainer.device=cpu",
        f"hydra.run.dir={run}",
        *FAST_DIGITS,
    ]
    env = {**os.environ, "SOFTMINE_DEBUG": ""}
    res = run_forked(
        args, cwd=tmp_path, env=env, capture_output=True, text=True, preexec_fn=_limit_file_size
    )
    assert res.returncode == 2, res.stderr[-3000:]
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith(
        f"error: cannot write {run / 'checkpoints' / 'last.pt'} (File too large)"
    )
    assert f"the results are safe in {run / 'metrics.json'}" in line
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["map@r"] > 0
    assert not list(run.rglob("*.tmp"))
    again = run_forked(
        [*args, "resume=true"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    # metrics.json describes a network that is not on disk: resume trains it again and saves it
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-3000:]
    assert f"there is no {run / 'checkpoints' / 'last.pt'}" in out and "training again" in out
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["train_state"]
    assert state["step"] == metrics["iteration"] and state["finished"]
    assert json.loads((run / "metrics.json").read_text()) == pytest.approx(metrics)
