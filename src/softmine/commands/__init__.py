"""The console commands: each module is a thin layer of argument parsing over the library.

:data:`COMMANDS` is the one table of them; ``softmine`` (the umbrella,
:mod:`softmine.__main__`) lists it and ``softmine <command> ...`` runs one. Most
commands are also a console script of their own (``softmine-eval``: pyproject.toml);
``tune`` and ``fair`` are what ``make tune`` / ``make fair`` run.
Every command parses its arguments and reports a user's error the same way
(:mod:`softmine.commands.common`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """One console command: the module whose ``main`` runs it, what it does in a line, and
    its own console script (None: run through ``softmine`` or ``make`` only)."""

    module: str
    summary: str
    script: str | None = None


COMMANDS: dict[str, Command] = {
    "train": Command(
        "softmine.commands.train",
        "train and evaluate an embedding (a Hydra app: softmine train --help)",
        "softmine-train",
    ),
    "eval": Command(
        "softmine.commands.evaluate",
        "evaluate a run folder, a checkpoint or saved embeddings",
        "softmine-eval",
    ),
    "report": Command(
        "softmine.commands.report", "one table and plots of finished runs", "softmine-report"
    ),
    "data": Command(
        "softmine.commands.data",
        "list, download and check the data sets; convert a .caffemodel",
        "softmine-data",
    ),
    "embed": Command(
        "softmine.commands.embed",
        "embed images with a trained model (.npz or .parquet)",
        "softmine-embed",
    ),
    "index": Command(
        "softmine.commands.index",
        "build a faiss index of embeddings and search it",
        "softmine-index",
    ),
    "export": Command(
        "softmine.commands.export",
        "export the embedding network to ONNX or TorchScript",
        "softmine-export",
    ),
    "tune": Command(
        "softmine.commands.tune", "a loss's tuning study and its tuned config (make tune)"
    ),
    "fair": Command(
        "softmine.commands.fair", "every loss with its tuned setting over seeds (make fair)"
    ),
}


def program_name(command: str) -> str:
    """What ``command`` calls itself in its messages: its console script, else ``softmine COMMAND``."""
    return COMMANDS[command].script or f"softmine {command}"
