"""`make bench` runs every script in scripts/bench/ with no arguments, so none may require one.

Helpers the benches import are named ``_*.py``; `make bench` does not run them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "scripts" / "bench"


def _required_positionals(source: str) -> list[str]:
    """The ``add_argument`` calls that declare a positional argument argparse requires."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument"):
            continue
        first = node.args[0] if node.args else None
        if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
            continue
        nargs = next((k.value for k in node.keywords if k.arg == "nargs"), None)
        optional = isinstance(nargs, ast.Constant) and nargs.value in ("?", "*")
        if not first.value.startswith("-") and not optional:
            found.append(first.value)
    return found


def test_the_check_finds_a_required_positional() -> None:
    src = "p.add_argument('runs', nargs='+')\np.add_argument('--k')\np.add_argument('x', nargs='?')"
    assert _required_positionals(src) == ["runs"]


BENCHES = sorted(p for p in BENCH.glob("*.py") if not p.name.startswith("_"))


def test_make_bench_skips_the_helpers() -> None:
    makefile = (BENCH.parents[1] / "Makefile").read_text()
    assert "scripts/bench/[!_]*.py" in makefile
    assert (BENCH / "_timing.py").exists() and BENCH / "_timing.py" not in BENCHES


@pytest.mark.parametrize("script", BENCHES, ids=lambda p: p.name)
def test_bench_script_needs_no_argument(script: Path) -> None:
    assert _required_positionals(script.read_text()) == [], (
        f"{script.name} cannot run from make bench"
    )
