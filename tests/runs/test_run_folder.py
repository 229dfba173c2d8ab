"""The run folder: one writer at a time, and a record that a refused command never changes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from softmine.commands.train import train
from softmine.errors import ConfigError
from softmine.reporting.sweep_report import aggregate, load_runs
from softmine.runs.folder import (
    Invocation,
    RunFolderBusy,
    RunLock,
    config_differences,
    plan_run,
)
from softmine.runs.layout import RUN_FILES
from tests.conftest import FAST_DIGITS, ForkedPopen, compose, run_cli
from tests.run_imports import import_what_a_run_imports

HOLD_LOCK = """
import sys, time
from softmine.runs.folder import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(60)
"""


def _holder(folder: Path) -> subprocess.Popen:
    """A separate process that takes the lock of ``folder`` and keeps it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(folder)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_is_refused_naming_the_first(tmp_path: Path) -> None:
    proc = _holder(tmp_path)
    try:
        with pytest.raises(RunFolderBusy, match=f"PID {proc.pid} on host {socket.gethostname()}"):
            RunLock(tmp_path).acquire()
    finally:
        proc.kill()
        proc.wait()


def test_lock_of_a_killed_holder_is_stale(tmp_path: Path) -> None:
    proc = _holder(tmp_path)
    proc.kill()  # SIGKILL: no cleanup, the lock file stays behind
    proc.wait()
    assert (tmp_path / RUN_FILES.lock).exists()
    lock = RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / RUN_FILES.lock).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / RUN_FILES.lock).exists()  # released on exit, nothing left behind


def test_lock_file_of_a_dead_or_reused_pid_is_stale(tmp_path: Path) -> None:
    """Without an flock held (another filesystem, an old file), the PID + host check decides."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    for holder in (
        {"pid": dead.pid, "host": host},  # the process is gone
        {"pid": os.getppid(), "host": host, "started_ticks": "1"},  # a live PID, reused
    ):
        (tmp_path / RUN_FILES.lock).write_text(json.dumps(holder))
        RunLock(tmp_path).acquire().release()


def test_lock_file_of_a_live_process_is_respected(tmp_path: Path) -> None:
    parent = os.getppid()
    (tmp_path / RUN_FILES.lock).write_text(
        json.dumps({"pid": parent, "host": socket.gethostname()})
    )
    with pytest.raises(RunFolderBusy, match=f"PID {parent}"):
        RunLock(tmp_path).acquire()
    (tmp_path / RUN_FILES.lock).write_text(json.dumps({"pid": 1, "host": "another-host"}))
    with pytest.raises(RunFolderBusy, match="another-host"):
        RunLock(tmp_path).acquire()


def test_lock_is_released_when_the_run_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from softmine.engine.trainer import Trainer

    def crash(self: Trainer, *args: object) -> None:
        assert (tmp_path / RUN_FILES.lock).exists()  # held while the run is built and runs
        raise RuntimeError("a bug")

    monkeypatch.setattr(Trainer, "__init__", crash)
    with pytest.raises(RuntimeError, match="a bug"):
        train(_invocation(tmp_path, "trainer.epochs=1"))
    assert not (tmp_path / RUN_FILES.lock).exists()
    RunLock(tmp_path).acquire().release()


# ----------------------------------------------------------------------------- the plan


def _invocation(run_dir: Path, *overrides: str, multirun: bool = False) -> Invocation:
    given = ["trainer.device=cpu", *FAST_DIGITS, *overrides]
    return Invocation(run_dir, compose(given), given, choices={}, multirun=multirun)


def _recorded(run_dir: Path, *overrides: str, metrics: bool = True) -> None:
    """A run folder as a finished run leaves it (record and metrics, no training)."""
    from softmine.runs.folder import commit_plan

    commit_plan(plan_run(_invocation(run_dir, *overrides)))
    if metrics:
        (run_dir / "metrics.json").write_text(json.dumps({"map@r": 0.5}))


def test_a_new_run_into_a_folder_with_a_run_is_refused(tmp_path: Path) -> None:
    _recorded(tmp_path, "seed=1")
    with pytest.raises(ConfigError, match="already holds a run .*resume=true.*hydra.run.dir"):
        plan_run(_invocation(tmp_path, "seed=1"))
    with pytest.raises(ConfigError, match="hydra.sweep.dir"):  # a sweep job names the sweep key
        plan_run(_invocation(tmp_path, "seed=1", multirun=True))


def test_resume_on_a_folder_without_a_run_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="holds no run"):
        plan_run(_invocation(tmp_path, "resume=true"))
    # a job of a resumed sweep that had never started starts now
    assert plan_run(_invocation(tmp_path, "resume=true", multirun=True)).action == "new"


def test_resume_refuses_changed_settings_listing_every_key(tmp_path: Path) -> None:
    _recorded(tmp_path, "seed=1", "optimizer.lr=0.01", metrics=False)
    with pytest.raises(ConfigError) as e:
        plan_run(_invocation(tmp_path, "resume=true", "seed=5", "optimizer.lr=0.5"))
    msg = str(e.value)
    assert "optimizer.lr (0.01 -> 0.5)" in msg and "seed (1 -> 5)" in msg
    assert "resume_override=[optimizer.lr,seed]" in msg
    assert "\n" not in msg
    # the same settings, bookkeeping keys changed: accepted
    same = _invocation(tmp_path, "resume=true", "seed=1", "optimizer.lr=0.01", "trainer.plots=true")
    assert plan_run(same).action == "resume" and not plan_run(same).changes


def test_resume_override_allows_the_named_keys_only(tmp_path: Path) -> None:
    _recorded(tmp_path, "optimizer.lr=0.01", metrics=False)
    inv = _invocation(
        tmp_path, "resume=true", "optimizer.lr=0.001", "resume_override=[optimizer.lr]"
    )
    plan = plan_run(inv)
    assert [c.key for c in plan.changes] == ["optimizer.lr"]
    inv = _invocation(
        tmp_path, "resume=true", "optimizer.lr=0.001", "seed=3", "resume_override=[optimizer.lr]"
    )
    with pytest.raises(ConfigError, match=r"seed \(0 -> 3\)"):
        plan_run(inv)


def test_a_finished_run_can_only_be_extended(tmp_path: Path) -> None:
    _recorded(tmp_path, "trainer.epochs=2")
    assert plan_run(_invocation(tmp_path, "trainer.epochs=2", "resume=true")).action == "finished"
    with pytest.raises(ConfigError, match=r"trainer.epochs \(2 -> 5\)"):
        plan_run(_invocation(tmp_path, "trainer.epochs=5", "resume=true"))
    relabel = _invocation(
        tmp_path,
        "trainer.epochs=2",
        "optimizer.lr=0.5",
        "resume=true",
        "resume_override=[optimizer.lr]",
    )
    with pytest.raises(ConfigError, match="can only extend it"):
        plan_run(relabel)
    extend = _invocation(
        tmp_path, "trainer.epochs=5", "resume=true", "resume_override=[trainer.epochs]"
    )
    assert plan_run(extend).action == "resume"


def test_a_group_choice_is_one_difference(tmp_path: Path) -> None:
    diffs = config_differences(
        {"loss": {"margin": 1.2, "sigma": 0.8}, "seed": 0},
        {"loss": {"margin": 1.0}, "seed": 0, "trainer": {"device": "cuda"}},
        {"loss": "osm_caa", "hydra/launcher": "basic"},
        {"loss": "contrastive", "hydra/launcher": "joblib"},
    )
    assert [str(d) for d in diffs] == ['loss ("osm_caa" -> "contrastive")']


def test_commit_records_an_allowed_change_and_keeps_the_old_result(tmp_path: Path) -> None:
    from softmine.runs.folder import commit_plan

    _recorded(tmp_path, "trainer.epochs=2", "seed=4")
    inv = _invocation(
        tmp_path, "trainer.epochs=5", "seed=4", "resume=true", "resume_override=[trainer.epochs]"
    )
    commit_plan(plan_run(inv))
    overrides = yaml.safe_load((tmp_path / ".hydra" / "overrides.yaml").read_text())
    assert "trainer.epochs=5" in overrides and "seed=4" in overrides
    assert not any(o.startswith(("trainer.epochs=2", "resume")) for o in overrides)
    assert "epochs: 5" in (tmp_path / ".hydra" / "config.yaml").read_text()
    (entry,) = yaml.safe_load((tmp_path / ".hydra" / "resumes.yaml").read_text())
    assert entry["changed"] == {"trainer.epochs": {"from": 2, "to": 5}}
    assert entry["superseded_metrics"] == {"map@r": 0.5}
    assert not (tmp_path / "metrics.json").exists()  # no result labelled with the new length


# ----------------------------------------------------------------------------- report grouping


def test_report_does_not_group_by_bookkeeping_keys(tmp_path: Path) -> None:
    for i, extra in enumerate([[], ["resume=true"], ["trainer.device=cpu", "debug=true"]]):
        folder = tmp_path / str(i)
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"seed={i}", *extra]))
        (folder / "metrics.json").write_text(json.dumps({"map@r": 0.1 * i}))
    table = aggregate(load_runs([tmp_path]))
    assert len(table) == 1 and table["n"].iloc[0] == 3
    assert table["map@r_mean"].iloc[0] == pytest.approx(0.1)


# ----------------------------------------------------------------------------- end to end


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


RUN = ["softmine.commands.train", "trainer.epochs=2", "trainer.device=cpu", *FAST_DIGITS]


@pytest.mark.slow
def test_refused_commands_leave_the_run_folder_unchanged(tmp_path: Path) -> None:
    """The issue's probes: each is refused and the folder, record included, stays byte for byte."""
    run = tmp_path / "R"
    import_what_a_run_imports()  # once here, not in the forked run
    res = run_cli([*RUN, f"hydra.run.dir={run}"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    before = _snapshot(run)
    for extra, message in [
        (["loss.margin=0.3", "seed=7"], "already holds a run"),
        (["resume=true", "backbone.embedding_dim=32"], "backbone.embedding_dim (64 -> 32)"),
        (["resume=true", "trainer.epochs=5"], "trainer.epochs (2 -> 5)"),
    ]:
        res = run_cli([*RUN, f"hydra.run.dir={run}", *extra], tmp_path)
        assert res.returncode == 2, (extra, res.stderr[-2000:])
        assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1
        assert _snapshot(run) == before, extra
    runs = load_runs([run])
    assert runs["seed"].tolist() == [0]
    assert "override:loss.margin" not in runs


@pytest.mark.slow
def test_two_processes_into_one_folder(tmp_path: Path) -> None:
    """The second exits 2 at once naming the first's PID; the first finishes a consistent folder.

    The first is stopped (SIGSTOP) from when it holds the folder's lock until the second has
    exited: it cannot finish first, and a second that waited for the lock would wait forever.
    """
    run = tmp_path / "R"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SOFTMINE_DEBUG": ""}
    first_args = [*RUN[1:], "trainer.checkpoint_every=1", "seed=3"]
    import_what_a_run_imports()  # once here, not in the forked run
    first = ForkedPopen(
        [sys.executable, "-m", "softmine.commands.train", *first_args, f"hydra.run.dir={run}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    t0 = time.time()
    while not (run / RUN_FILES.lock).exists():
        assert first.poll() is None, first.communicate()[1][-2000:]
        assert time.time() - t0 < 120
        time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)
    try:
        t1 = time.time()
        second = run_cli([*RUN, "seed=4", f"hydra.run.dir={run}"], tmp_path, timeout=60)
        waited = time.time() - t1
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert second.returncode == 2
    assert f"PID {first.pid}" in second.stderr and "in use" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    assert waited < 60  # it did not wait for the first run to finish
    overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
    assert "seed=3" in overrides and "seed=4" not in overrides
    log = pd.read_csv(run / "train_log.csv")
    assert log["epoch"].tolist() == [1, 2]
    assert not list(run.rglob("*.tmp")) and not (run / RUN_FILES.lock).exists()
