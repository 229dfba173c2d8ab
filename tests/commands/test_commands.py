"""The command table: ``softmine`` lists every command, runs each, and every command parses
its arguments and reports errors through the one shared helper (softmine.commands.common)."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest

from softmine import __version__
from softmine.__main__ import main as umbrella
from softmine.commands import COMMANDS
from tests.conftest import FAST_DIGITS, REPO, run_cli

ARGPARSE_COMMANDS = [name for name in COMMANDS if name != "train"]  # train is a Hydra app


def _console_scripts() -> dict[str, str]:
    """``[project.scripts]`` of pyproject.toml: script name -> ``module:function``."""
    text = (REPO / "pyproject.toml").read_text().split("[project.scripts]", 1)[1]
    section = text.split("\n[", 1)[0]
    return dict(re.findall(r'^([\w-]+) = "([\w.:]+)"', section, flags=re.M))


def test_every_console_script_is_a_command_of_the_table() -> None:
    scripts = _console_scripts()
    assert scripts.pop("softmine") == "softmine.__main__:main"
    listed = {c.script: f"{c.module}:main" for c in COMMANDS.values() if c.script}
    assert scripts == listed
    for command in COMMANDS.values():  # each module has the main the table promises
        assert callable(importlib.import_module(command.module).main)


def test_softmine_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        umbrella(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name, command in COMMANDS.items():
        assert re.search(rf"^  {re.escape(name)} +{re.escape(command.summary)}", out, re.M), name
    assert umbrella([]) is None  # no command: the same list
    assert "  report " in capsys.readouterr().out


def test_every_console_script_and_command_is_listed_by_help_no_args_and_a_typo(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``softmine --help``, ``softmine`` alone and ``softmine <unknown>`` each name every command;
    the first two also every console script of pyproject.toml's [project.scripts]."""
    scripts = set(_console_scripts()) - {"softmine"}
    assert scripts  # softmine-train, softmine-eval, ...
    with pytest.raises(SystemExit):
        umbrella(["--help"])
    helped = capsys.readouterr().out
    assert umbrella([]) is None
    bare = capsys.readouterr().out
    with pytest.raises(SystemExit):
        umbrella(["nosuchcommand"])
    typo = capsys.readouterr().err
    for out in (helped, bare):
        listed = set(re.findall(r"\[(softmine-[\w-]+)\]", out))
        assert listed == scripts, out
        for name in COMMANDS:
            assert re.search(rf"^  {re.escape(name)} ", out, re.M), name
    assert set(typo.split("choose one of ", 1)[1].split(" (")[0].split(", ")) == set(COMMANDS)


def test_softmine_version_and_an_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        umbrella(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"softmine {__version__}\n"
    with pytest.raises(SystemExit) as e:
        umbrella(["trian", "experiment=demo"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: no command 'trian'; choose one of ")


@pytest.mark.parametrize("name", ARGPARSE_COMMANDS)
def test_softmine_command_help_is_the_commands_own(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        umbrella([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ") and "--version" in out  # the shared ArgumentParser's flag


@pytest.mark.parametrize("name", ARGPARSE_COMMANDS)
def test_every_command_reports_a_usage_error_in_one_line(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The shared ArgumentParser: ``error: <what> (see <prog> --help)``, exit 2, no usage dump."""
    with pytest.raises(SystemExit) as e:
        umbrella([name, "--no-such-option"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and err.endswith(" --help)\n")


@pytest.mark.parametrize("name", ARGPARSE_COMMANDS)
def test_every_command_prints_its_version(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        umbrella([name, "--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip().endswith(f" {__version__}")


@pytest.mark.slow
def test_softmine_train_help_and_version(tmp_path: Path) -> None:
    res = run_cli(["softmine", "train", "--help"], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "== Configuration groups ==" in res.stdout or "Powered by Hydra" in res.stdout
    res = run_cli(["softmine", "train", "--version"], tmp_path)
    assert res.returncode == 0 and res.stdout.strip() == f"softmine-train {__version__}"


@pytest.mark.slow
def test_softmine_train_then_eval_run_the_commands(tmp_path: Path) -> None:
    run = tmp_path / "run"
    res = run_cli(
        ["softmine", "train", "trainer.epochs=1", *FAST_DIGITS, f"hydra.run.dir={run}"], tmp_path
    )
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["map@r"] <= 1.0
    ev = run_cli(["softmine", "eval", str(run)], tmp_path)
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert json.loads(ev.stdout)["map@r"] == pytest.approx(metrics["map@r"], abs=1e-6)
    bad = run_cli(["softmine", "train", "no_such_key=1"], tmp_path)  # Hydra's error, one line
    assert bad.returncode == 2 and bad.stderr.startswith("error: ")
