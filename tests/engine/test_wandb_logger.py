"""Experiment tracking with Weights & Biases: trainer.loggers=[csv,wandb], tested offline.

W&B's offline mode writes the whole run into one ``run-<id>.wandb`` file (a log of
protobuf records) under ``<dir>/wandb/offline-run-*/``, with no network; the tests read
that file back with W&B's own record type and check the config, the history and the
summary it holds.
"""

from __future__ import annotations

import json
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from softmine.engine.logger import WandbLogger, check_loggers
from softmine.errors import ConfigError
from tests.conftest import FAST_DIGITS, compose

BLOCK = 32 * 1024  # the .wandb file is LevelDB's log format: 32 KiB blocks of records
FULL, LAST = 1, 4  # record types that end one protobuf message


def _records(path: Path) -> Iterator[Any]:
    """The protobuf records (``wandb_internal_pb2.Record``) of a ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a .wandb file"
    pos, chunk = 7, b""  # a 7-byte file header: ":W&B", magic, version
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            pos += left - 7
            continue
        chunk += data[pos : pos + length]
        pos += length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def read_offline_run(wandb_dir: Path, timeout: float = 60.0) -> dict[str, Any]:
    """The one offline run under ``wandb_dir``: its id, name, project, config, history rows
    (step -> values) and final summary, from its ``.wandb`` file.

    W&B's service writes the file after ``run.finish()`` has returned (tens of ms later on
    an idle machine, longer under load), so the file is read until it holds the run's exit
    record, its last.
    """
    (run_file,) = wandb_dir.glob("offline-run-*/run-*.wandb")
    deadline = time.monotonic() + timeout
    from google.protobuf.message import DecodeError

    while True:
        try:
            out = _parse_run(run_file)
        except DecodeError:  # a record still being written
            out = {"exit": None}
        if out["exit"] is not None:
            return out
        assert time.monotonic() < deadline, f"W&B wrote no exit record to {run_file} in {timeout} s"
        time.sleep(0.05)


def _parse_run(run_file: Path) -> dict[str, Any]:
    """What :func:`read_offline_run` returns, from the records written so far."""
    out: dict[str, Any] = {"config": {}, "history": {}, "summary": {}, "exit": None}
    for r in _records(run_file):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out.update(id=r.run.run_id, name=r.run.display_name, project=r.run.project)
            out["tags"] = list(r.run.tags)
            out["config"].update({_key(i): json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            out["config"].update({_key(i): json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            row = {_key(i): json.loads(i.value_json) for i in r.history.item}
            out["history"].setdefault(int(row["_step"]), {}).update(row)
        elif kind == "summary":
            out["summary"].update({_key(i): json.loads(i.value_json) for i in r.summary.update})
        elif kind == "exit":
            out["exit"] = r.exit.exit_code
    return out


@pytest.mark.slow
def test_wandb_offline_records_config_history_and_final_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from softmine.engine import Trainer
    from softmine.reporting.artifacts import fit_and_report

    monkeypatch.setenv("WANDB_MODE", "offline")  # no network, whatever the settings say
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_home"))
    run_dir = tmp_path / "run"
    cfg = compose(
        [
            "trainer.max_iters=6",
            "trainer.log_every=2",
            "trainer.device=cpu",
            "trainer.loggers=[csv,wandb]",
            "trainer.wandb.mode=offline",
            "trainer.wandb.project=tests",
            "trainer.wandb.tags=[digits,ci]",
            *FAST_DIGITS,
        ]
    )
    metrics = fit_and_report(Trainer(cfg, run_dir))

    run = read_offline_run(run_dir / "wandb")
    assert run["id"] == (run_dir / "wandb_run_id").read_text().strip()
    assert run["project"] == "tests" and run["tags"] == ["digits", "ci"]
    assert run["name"] == str(run_dir)  # the run folder (outside the launch directory here)
    config = run["config"]
    assert config["trainer.max_iters"] == 6 and config["loss.margin"] == cfg.loss.margin
    assert config["backbone.trunk._target_"] == "softmine.models.TinyCNN"
    assert config["trainer.loggers"] == ["csv", "wandb"]
    assert sorted(run["history"]) == [2, 4, 6]  # every 2 iterations; the epoch's row joins 6
    assert all("loss" in row for row in run["history"].values())
    for k, v in json.loads((run_dir / "metrics.json").read_text()).items():
        assert run["summary"][f"final/{k}"] == pytest.approx(v)
        assert v == pytest.approx(metrics[k])
    assert run["exit"] == 0


def test_resume_continues_the_same_wandb_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose([])
    settings = {"mode": "offline", "dir": str(tmp_path / "w1")}
    first = WandbLogger(tmp_path / "run", settings, cfg)
    first.log_metrics({"loss": 1.5, "recall@1": float("nan")}, 3)
    first.finish(tmp_path / "run", 3)  # no metrics.json: an unfinished run
    again = WandbLogger(
        tmp_path / "run", {**settings, "dir": str(tmp_path / "w2")}, cfg, resume=True
    )
    again.finish(tmp_path / "run", 3)
    assert again.run.id == first.run.id
    run = read_offline_run(tmp_path / "w1" / "wandb")
    assert run["name"] == "run" and run["history"][3]["loss"] == 1.5
    assert "recall@1" not in run["history"][3]  # NaN is left out
    assert run["exit"] == 1
    other = WandbLogger(tmp_path / "run", {**settings, "dir": str(tmp_path / "w3")}, cfg)
    other.finish(tmp_path / "run", 0)
    assert other.run.id != first.run.id  # a new run without resume


def test_wandb_is_a_known_logger_and_missing_package_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert check_loggers(["csv", "wandb"]) == ["csv", "wandb"]
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ConfigError) as e:
        WandbLogger(tmp_path, {}, compose([]))
    assert "\n" not in str(e.value) and "pip install 'softmine[wandb]'" in str(e.value)
