"""Sweeps survive a bad job, write summary.csv whatever happened, and resume where they stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from softmine.commands.train import sweep_job
from softmine.runs import sweep
from softmine.runs.folder import Invocation
from tests.conftest import FAST_DIGITS, ForkedPopen, compose, run_cli
from tests.run_imports import import_what_a_run_imports


def _inv(run_dir: Path, *overrides: str) -> Invocation:
    given = ["trainer.device=cpu", *FAST_DIGITS, *overrides]
    return Invocation(run_dir, compose(given), given, choices={}, multirun=True)


def test_a_job_that_raises_is_recorded_and_the_sweep_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def bug(inv: Invocation) -> dict:
        raise KeyError("a bug\nwith a second line")

    monkeypatch.setattr("softmine.commands.train.train", bug)
    assert (
        sweep_job(_inv(tmp_path / "0", "seed=3"), tmp_path, 0) is None
    )  # no score (NaN would stop an Optuna study)
    assert "error: job 0 failed: KeyError" in capsys.readouterr().err
    (row,) = sweep.collect_runs(tmp_path).to_dict("records")
    assert row["status"] == "failed" and row["seed"] == "3"
    assert row["reason"].startswith("KeyError:") and "\n" not in row["reason"]


def test_a_stopped_sweep_skips_the_jobs_not_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("softmine.commands.train.train", lambda inv: pytest.fail("must not run"))
    sweep.request_stop(tmp_path, signal.SIGINT)
    assert (
        sweep_job(_inv(tmp_path / "1", "seed=1"), tmp_path, 1) is None
    )  # no score (NaN would stop an Optuna study)
    assert not (tmp_path / "1").exists()  # nothing written into its folder
    planned = [["seed=0"], ["seed=1"], ["seed=2"]]
    (tmp_path / "0" / ".hydra").mkdir(parents=True)  # job 0 had started: it holds a run
    rows = sweep.collect_runs(tmp_path, planned)
    assert rows["status"].tolist() == ["interrupted", "not started", "not started"]
    assert rows["seed"].tolist() == ["0", "1", "2"]


def test_resume_command_replaces_resume_and_sweep_dir(tmp_path: Path) -> None:
    argv = ["-m", "loss=osm,caa", "resume=false", "hydra.sweep.dir=old", "dataset.root=a b"]
    cmd = sweep.resume_command(argv, tmp_path)
    assert cmd == (
        f"softmine-train -m loss=osm,caa 'dataset.root=a b' resume=true hydra.sweep.dir={tmp_path}"
    )


def test_planned_jobs_follow_hydra_order() -> None:
    """Sweeper params (an experiment's) first, then the command line; the last key varies fastest."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        {
            "hydra": {
                "sweeper": {"_target_": sweep.BASIC_SWEEPER, "params": {"loss": "osm,caa"}},
                "overrides": {"task": ["seed=0,1", "trainer.epochs=1"]},
            }
        }
    )
    assert sweep.planned_jobs(cfg) == [
        ["loss=osm", "seed=0", "trainer.epochs=1"],
        ["loss=osm", "seed=1", "trainer.epochs=1"],
        ["loss=caa", "seed=0", "trainer.epochs=1"],
        ["loss=caa", "seed=1", "trainer.epochs=1"],
    ]


# ----------------------------------------------------------------------------- end to end

SWEEP = ["softmine.commands.train", "-m", "trainer.epochs=2", "trainer.device=cpu", *FAST_DIGITS]


@pytest.mark.slow
def test_a_failing_job_does_not_stop_the_sweep(tmp_path: Path) -> None:
    """The issue's probe: -m optimizer=sgd optimizer.lr=1e9,0.001."""
    folder = tmp_path / "S"
    import_what_a_run_imports()  # once here, not in the forked sweep
    res = run_cli(
        [*SWEEP, "optimizer=sgd", "optimizer.lr=1e9,0.001", f"hydra.sweep.dir={folder}"], tmp_path
    )
    assert res.returncode != 0
    assert "1 of 2 jobs failed" in res.stderr and "Traceback" not in res.stderr
    rows = pd.read_csv(folder / "summary.csv")
    assert rows["status"].tolist() == ["failed", "ok"]
    assert "non-finite" in rows["reason"][0]
    assert 0 < rows["map@r"][1] <= 1


@pytest.mark.slow
def test_interrupted_sweep_prints_the_command_that_resumes_it(tmp_path: Path) -> None:
    """Jobs of one epoch (45 steps): job 1 is interrupted at its step-10 check, its first after
    checkpoints/last.pt (step 5) shows it running; the sweep has until step 40 to see it."""
    folder = tmp_path / "S"
    one_epoch = [a for a in SWEEP if not a.startswith("trainer.epochs=")] + ["trainer.epochs=1"]
    args = [*one_epoch, "seed=0,1,2", "trainer.checkpoint_every=5", f"hydra.sweep.dir={folder}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SOFTMINE_DEBUG": ""}
    import_what_a_run_imports()  # once here, not in the forked sweep
    proc = ForkedPopen(
        [sys.executable, "-m", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    t0 = time.time()
    while not (folder / "1" / "checkpoints" / "last.pt").exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() - t0 < 200
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=200)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    command = err.strip().splitlines()[-1].strip()
    assert command.startswith("softmine-train -m ") and "resume=true" in command
    assert f"hydra.sweep.dir={folder}" in command
    rows = pd.read_csv(folder / "summary.csv")
    assert rows["status"].tolist() == ["ok", "interrupted", "not started"]
    first_log = (folder / "0" / "train_log.csv").read_text()

    resumed = run_cli(["softmine.commands.train", *command.split()[1:]], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = pd.read_csv(folder / "summary.csv")
    assert rows["status"].tolist() == ["ok", "ok", "ok"]
    assert (folder / "0" / "train_log.csv").read_text() == first_log  # not retrained
    assert "resumed from" in resumed.stdout + resumed.stderr  # job 1 went on from its checkpoint

    again = run_cli([*args], tmp_path)  # the same sweep into the same folder, without resume
    assert again.returncode == 2
    (line,) = again.stderr.strip().splitlines()
    assert "already holds a sweep" in line and "resume=true" in line
    assert pd.read_csv(folder / "summary.csv")["status"].tolist() == ["ok", "ok", "ok"]


@pytest.mark.slow
def test_ctrl_c_stops_a_parallel_sweep_gracefully(tmp_path: Path) -> None:
    """The joblib launcher (hydra/launcher=local): Ctrl-C reaches the whole process group."""
    folder = tmp_path / "S"
    args = [
        *SWEEP,
        "hydra/launcher=local",
        "seed=0,1,2",
        "trainer.checkpoint_every=5",
        f"hydra.sweep.dir={folder}",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SOFTMINE_DEBUG": ""}
    proc = ForkedPopen(  # the sweep's process forked from this one; its loky workers: fresh
        [sys.executable, "-m", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal would make it
    )
    t0 = time.time()
    while not all((folder / j / "checkpoints" / "last.pt").exists() for j in "01"):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() - t0 < 200
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=200)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "resume=true" in err
    rows = pd.read_csv(folder / "summary.csv")
    assert set(rows["status"][:2]) <= {"ok", "interrupted"}
    assert rows["status"][2] == "not started"
    assert not list(folder.rglob("*.tmp"))  # every interrupted job finished its checkpoint
