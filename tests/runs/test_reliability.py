"""Reliability: exact resume after SIGKILL, clean Ctrl-C, determinism, non-finite values, bad configs."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from softmine.engine import Trainer
from softmine.errors import ConfigError, TrainingError
from tests.conftest import FAST_CUB, FAST_DIGITS, ForkedPopen, compose, run_cli

# Four short epochs (~45 iterations each) with a checkpoint every 7 iterations.
RUN = [
    "softmine.commands.train",
    "trainer.epochs=4",
    "trainer.eval_every=1",
    "trainer.checkpoint_every=7",
    "trainer.deterministic=true",
    "trainer.device=cpu",
    "seed=5",
    *FAST_DIGITS,
]


def _start(run_dir: Path, cwd: Path, extra: list[str] = ()) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return ForkedPopen(
        [sys.executable, "-m", *RUN, f"hydra.run.dir={run_dir}", *extra],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.02)


def _log_rows(run_dir: Path) -> list[dict[str, str]]:
    rows = list(csv.DictReader((run_dir / "train_log.csv").open()))
    for r in rows:
        for timing in ("epoch_time_s", "data_s", "step_s", "images_per_s"):
            r.pop(timing, None)
    return rows


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run, the yardstick for every interrupted one."""
    tmp = tmp_path_factory.mktemp("ref")
    res = run_cli([*RUN, f"hydra.run.dir={tmp / 'run'}"], tmp)
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp / "run"


@pytest.mark.slow
def test_deterministic_runs_repeat_exactly(reference: Path, tmp_path: Path) -> None:
    res = run_cli([*RUN, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "run" / "metrics.json").read_text() == (
        reference / "metrics.json"
    ).read_text()


def _wait_for_rows(path: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while not path.exists() or len(path.read_text().splitlines()) < n + 1:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() - t0 < timeout, f"{path} never reached {n} rows"
        time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.parametrize("epochs_done", [0, 2])
def test_sigkill_then_resume_matches_uninterrupted_run(
    reference: Path, tmp_path: Path, epochs_done: int
) -> None:
    """Killed right after the first checkpoint, or in the third epoch (after two eval rows)."""
    run_dir = tmp_path / "run"
    proc = _start(run_dir, tmp_path)
    _wait_for(run_dir / "checkpoints" / "last.pt", proc)
    if epochs_done:
        _wait_for_rows(run_dir / "train_log.csv", epochs_done, proc)
    proc.kill()
    proc.communicate()
    assert not (run_dir / "metrics.json").exists(), "the kill came too late to test anything"
    res = run_cli([*RUN, f"hydra.run.dir={run_dir}", "resume=true"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout + res.stderr  # from a checkpoint, not from scratch
    got = json.loads((run_dir / "metrics.json").read_text())
    assert got == json.loads((reference / "metrics.json").read_text())
    assert _log_rows(run_dir) == _log_rows(reference)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_saves_checkpoint_and_says_how_to_resume(
    reference: Path, tmp_path: Path, sig: int
) -> None:
    run_dir = tmp_path / "run"
    proc = _start(run_dir, tmp_path)
    _wait_for(run_dir / "checkpoints" / "last.pt", proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-2000:]
    assert "resume=true" in err and f"hydra.run.dir={run_dir}" in err
    assert "Traceback" not in err
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["train_state"]["step"] > 0 and not state["train_state"]["finished"]
    res = run_cli([*RUN, f"hydra.run.dir={run_dir}", "resume=true"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text()) == json.loads(
        (reference / "metrics.json").read_text()
    )


@pytest.mark.slow
def test_finished_run_is_never_overwritten(reference: Path, tmp_path: Path) -> None:
    before = (reference / "metrics.json").read_text()
    res = run_cli([*RUN, f"hydra.run.dir={reference}"], tmp_path)
    assert res.returncode == 2 and "already holds a run" in res.stderr
    res = run_cli([*RUN, f"hydra.run.dir={reference}", "resume=true"], tmp_path)
    assert res.returncode == 0
    assert (reference / "metrics.json").read_text() == before


def _trainer(tmp_path: Path, *overrides: str) -> Trainer:
    cfg = compose(
        [
            "trainer.epochs=1",
            "trainer.device=cpu",
            "trainer.checkpoint_every=2",
            *FAST_DIGITS,
            *overrides,
        ]
    )
    return Trainer(cfg, tmp_path)


def _poison(trainer: Trainer, at_call: int) -> None:
    """Make the loss NaN on its ``at_call``-th call."""
    forward = trainer.loss_fn.forward
    calls = {"n": 0}

    def poisoned(emb, y, **kw):
        calls["n"] += 1
        loss, details = forward(emb, y, **kw)
        if calls["n"] == at_call:
            loss = loss * float("nan")
        return loss, details

    trainer.loss_fn.forward = poisoned


def test_nonfinite_loss_stops_naming_step_and_keeps_checkpoint(tmp_path: Path) -> None:
    t = _trainer(tmp_path)
    _poison(t, at_call=5)
    with pytest.raises(TrainingError) as e:
        t.fit()
    msg = str(e.value)
    assert "non-finite loss at step 5" in msg and "l_pos=" in msg and "l_neg=" in msg
    kept = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert kept["train_state"]["step"] == 4
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())


@pytest.mark.slow
def test_nonfinite_loss_skip_goes_on(tmp_path: Path) -> None:
    t = _trainer(tmp_path, "trainer.on_nonfinite=skip")
    _poison(t, at_call=3)
    metrics = t.fit()
    assert t.state.skipped_steps == 1
    assert 0.0 < metrics["map@r"] <= 1.0


def test_nonfinite_gradient_is_caught(tmp_path: Path) -> None:
    t = _trainer(tmp_path)
    forward = t.loss_fn.forward

    def inf_grad(emb, y, **kw):
        loss, details = forward(emb, y, **kw)
        return loss + (emb * 0).sum() * 0 + _InfGrad.apply(emb).sum() * 0, details

    class _InfGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return torch.full_like(g, float("inf"))

    t.loss_fn.forward = inf_grad
    with pytest.raises(TrainingError, match="non-finite gradient at step 1"):
        t.fit()


@pytest.mark.slow
def test_resume_from_a_different_model_is_a_clear_error(tmp_path: Path) -> None:
    _trainer(tmp_path).fit()
    other = compose(
        [
            "trainer.epochs=1",
            "trainer.device=cpu",
            "backbone.embedding_dim=16",
            "resume=true",
            *FAST_DIGITS,
        ]
    )
    with pytest.raises(ConfigError, match="holds a different model"):
        Trainer(other, tmp_path).fit()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.margin=0", "loss.margin must be > 0"),
        ("loss.sigma=-1", "loss.sigma must be > 0"),
        ("loss.lam=1.5", "loss.lam must lie in [0, 1]"),
        ("sampler.classes_per_batch=50", "larger than the 10 classes"),
        ("sampler.samples_per_class=200", "fewer than K=200"),
        ("backbone.embedding_dim=0", "backbone.embedding_dim must be a positive integer"),
        ("trainer.device=tpu", "trainer.device must be one of"),
        ("hydra.run.dir=/proc/softmine-test", "cannot write to the output folder"),
        ("trainer.precision=fp8", "trainer.precision must be one of"),
    ],
)
def test_bad_config_is_one_line_and_exit_2(tmp_path: Path, override: str, message: str) -> None:
    res = run_cli(["softmine.commands.train", override, *FAST_DIGITS[:2]], tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    assert message in res.stderr
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_debug_switch_shows_the_traceback(tmp_path: Path) -> None:
    res = run_cli(
        ["softmine.commands.train", "loss.margin=0", "debug=true", *FAST_DIGITS[:2]], tmp_path
    )
    assert res.returncode != 0
    assert "Traceback" in res.stderr or "ConfigError" in res.stderr


def _cub_with_corrupt_image(tmp_path: Path) -> tuple[Path, Path]:
    from softmine.testing.fakes import make_cub

    root = make_cub(tmp_path / "CUB_200_2011", num_classes=8, images_per_class=6)
    bad = sorted((root / "images").glob("001.*/*.jpg"))[1]
    bad.write_bytes(b"not a jpeg")
    return root, bad


BAD_IMAGE_RUN = [
    "softmine.commands.train",
    *FAST_CUB,
    "trainer.epochs=2",
    "dataset.transform.resize=16",
    "dataset.transform.crop_size=16",
]


@pytest.mark.slow
def test_corrupt_training_image_is_named_or_skipped_and_reported(tmp_path: Path) -> None:
    root, bad = _cub_with_corrupt_image(tmp_path)
    res = run_cli(
        [*BAD_IMAGE_RUN, f"dataset.root={root}", f"hydra.run.dir={tmp_path / 'a'}"], tmp_path
    )
    assert res.returncode == 2 and str(bad) in res.stderr and "Traceback" not in res.stderr
    assert "on_bad_image=skip" in res.stderr  # the message names the way out
    run_dir = tmp_path / "b"
    res = run_cli(
        [
            *BAD_IMAGE_RUN,
            f"dataset.root={root}",
            f"hydra.run.dir={run_dir}",
            "data.on_bad_image=skip",
            "trainer.num_workers=2",  # skipped files are collected across worker processes
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "1 unreadable image files were skipped" in res.stdout
    reason = "not an image file Pillow can identify (unknown format or damaged header)"
    assert (run_dir / "bad_images.txt").read_text() == f"{bad}\t{reason}\n"
    assert (run_dir / "metrics.json").exists()
