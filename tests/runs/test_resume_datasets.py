"""``resume=true`` works on every dataset config, not only on the embedded digits.

Building a run from its config (Hydra's ``instantiate``) resolved the interpolations of
the shared ``dataset.transform`` node in place, and the run's record was written after
that: the record then differed from the same command composed afresh, and every image
data set's resume was refused. Each dataset config is built here on its fake copy
(:mod:`softmine.testing.fakes`, in the published layout), recorded, and resumed with the
same command; one fake CUB run is interrupted for real and resumed with the command
its Ctrl-C message prints.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import softmine.commands.train as train_command
from softmine.commands.train import train
from softmine.engine import Trainer
from softmine.runs.folder import Invocation
from softmine.testing.fakes import BUILDERS
from tests.conftest import FAST_CUB, ForkedPopen, compose, run_cli

VIDEO_SETS = ("mars", "ilidsvid", "prid2011", "lpw")
#: A small video network and clips, so that a video set builds in a second.
VIDEO = [
    "backbone=video_resnet50",
    "backbone.pretrained=false",
    "backbone.name=resnet18",
    "dataset.transform.height=32",
    "dataset.transform.width=16",
    "dataset.seq_len=2",
]
#: Every dataset config that reads files (digits ship inside scikit-learn).
DATASETS = sorted(BUILDERS)


def _overrides(name: str, root: Path) -> list[str]:
    key = "dataset.file" if name == "csv" else "dataset.root"
    given = [
        f"dataset={name}",
        f"{key}={root}",
        "trainer.device=cpu",
        "trainer.progress_bar=false",
        "trainer.tensorboard=false",
        "trainer.plots=false",
        "trainer.max_iters=1",
        "sampler.classes_per_batch=2",
        "sampler.samples_per_class=2",
        "sampler.allow_replacement=true",
    ]
    # the small CNN everywhere (imagefolder and csv default to a pretrained ResNet-50)
    return given + (
        VIDEO if name in VIDEO_SETS else ["backbone=tiny", "backbone.trunk.in_channels=3"]
    )


@pytest.fixture(scope="module")
def fake_roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("data")
    return {name: BUILDERS[name](base / name) for name in DATASETS}


def test_every_dataset_config_is_covered() -> None:
    """A new dataset config needs a fake copy (and so a place in this test)."""
    configs = Path(__file__).resolve().parents[2] / "configs" / "dataset"
    names = {p.stem for p in configs.glob("*.yaml")} - {"digits", "digits_pairs", "digits_zeroshot"}
    assert names <= set(DATASETS), sorted(names - set(DATASETS))


@pytest.mark.parametrize("name", DATASETS)
def test_the_same_command_resumes_on_every_dataset(
    name: str, fake_roots: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run is built (which resolves shared nodes in place) and recorded; the same command
    with resume=true is then accepted with no difference, and the record is unchanged."""
    fits: list[Trainer] = []
    monkeypatch.setattr(train_command, "fit_and_report", lambda t: fits.append(t) or {})
    given = _overrides(name, fake_roots[name])
    run_dir = tmp_path / "run"
    train(Invocation(run_dir, compose(given), given, choices={}))
    record = (run_dir / ".hydra" / "config.yaml").read_text()
    assert "${" in record  # recorded as written: interpolations are kept, not resolved
    again = [*given, "resume=true"]
    train(Invocation(run_dir, compose(again), again, choices={}))
    assert len(fits) == 2
    (entry,) = yaml.safe_load((run_dir / ".hydra" / "resumes.yaml").read_text())
    assert "changed" not in entry
    assert (run_dir / ".hydra" / "config.yaml").read_text() == record


def test_a_record_with_values_resolved_by_an_older_version_still_resumes(
    fake_roots: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run folders written before the fix hold some interpolations resolved: equal in value,
    they are no difference."""
    monkeypatch.setattr(train_command, "fit_and_report", lambda t: {})
    given = _overrides("cub", fake_roots["cub"])
    run_dir = tmp_path / "run"
    train(Invocation(run_dir, compose(given), given, choices={}))
    config_file = run_dir / ".hydra" / "config.yaml"
    old = yaml.safe_load(config_file.read_text())
    old["dataset"]["transform"]["test"]["transforms"][1]["size"] = 256  # was ${..resize}
    config_file.write_text(yaml.safe_dump(old))
    again = [*given, "resume=true"]
    train(Invocation(run_dir, compose(again), again, choices={}))
    changed = [*given, "resume=true", "dataset.transform.resize=300"]
    with pytest.raises(Exception, match=r"dataset.transform.resize \(256 -> 300\)"):
        train(Invocation(run_dir, compose(changed), changed, choices={}))


#: The loading options as dataset configs forwarded them into every split node before
#: they were given once (``root: ${..root}`` in ``dataset.test``, ``${...root}`` one deeper).
FORWARDED = ("root", "on_bad_image", "cache", "cache_size", "cache_dir")


@pytest.mark.parametrize("name", ["cub", "mars"])
@pytest.mark.slow
def test_a_record_whose_splits_forward_the_loading_options_still_resumes(
    name: str, fake_roots: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run recorded with the old dataset layout resumes with the same command; a changed
    option is still refused, named as the option given once."""
    monkeypatch.setattr(train_command, "fit_and_report", lambda t: {})
    given = _overrides(name, fake_roots[name])
    run_dir = tmp_path / "run"
    train(Invocation(run_dir, compose(given), given, choices={}))
    config_file = run_dir / ".hydra" / "config.yaml"
    old = yaml.safe_load(config_file.read_text())
    splits = [s for s in ("test", "query", "gallery") if s in old["dataset"]]
    for key in FORWARDED:
        old["dataset"]["train"]["dataset"][key] = "${..." + key + "}"
        for split in splits:
            old["dataset"][split][key] = "${.." + key + "}"
    config_file.write_text(yaml.safe_dump(old))
    again = [*given, "resume=true"]
    train(Invocation(run_dir, compose(again), again, choices={}))
    assert "changed" not in yaml.safe_load((run_dir / ".hydra" / "resumes.yaml").read_text())[0]
    changed = [*given, "resume=true", "dataset.cache=ram"]
    with pytest.raises(Exception, match=r"settings that differ .*: dataset.cache \([^,]*; "):
        train(Invocation(run_dir, compose(changed), changed, choices={}))
    allowed = [*changed, "resume_override=dataset.cache"]  # the one key the message names
    train(Invocation(run_dir, compose(allowed), allowed, choices={}))


@pytest.mark.slow
def test_ctrl_c_then_the_printed_command_resumes_a_cub_run(tmp_path: Path) -> None:
    """The issue's probe: interrupt a fake-CUB run, run the command the message prints."""
    root = BUILDERS["cub"](tmp_path / "CUB_200_2011", num_classes=8, images_per_class=6)
    run_dir = tmp_path / "run"
    args = [
        *FAST_CUB,
        f"dataset.root={root}",
        "trainer.max_iters=12",
        "dataset.transform.resize=40",
        "dataset.transform.crop_size=32",
        "trainer.checkpoint_every=1",
        "trainer.interrupt_every=1",
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SOFTMINE_DEBUG": ""}
    proc = ForkedPopen(
        [sys.executable, "-m", "softmine.commands.train", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    last = run_dir / "checkpoints" / "last.pt"
    try:
        while not last.exists():
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    (printed,) = re.findall(r"^  (softmine-train .*)$", err, flags=re.M)
    step = torch.load(last, weights_only=True)["train_state"]["step"]
    assert 0 < step < 12
    res = run_cli(["softmine.commands.train", *shlex.split(printed)[1:]], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from {last} at step {step}" in res.stdout + res.stderr
    assert torch.load(last, weights_only=True)["train_state"]["step"] == 12
    assert json.loads((run_dir / "metrics.json").read_text())["iteration"] == 12
