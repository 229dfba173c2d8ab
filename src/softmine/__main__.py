"""``softmine`` (or ``python -m softmine``): the version and the list of commands."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from softmine.commands.common import ArgumentParser

COMMANDS = {
    "softmine-train": "train and evaluate an embedding (Hydra app: softmine-train --help)",
    "softmine-eval": "evaluate a run folder, a checkpoint or saved embeddings",
    "softmine-report": "one table and plots of finished runs",
    "softmine-embed": "embed images with a trained model (.npz or .parquet)",
    "softmine-index": "build a faiss index of embeddings and search it",
    "softmine-export": "export the embedding network to ONNX or TorchScript",
}


def main(argv: Sequence[str] | None = None) -> None:
    lines = "\n".join(f"  {name:<17} {what}" for name, what in COMMANDS.items())
    parser = ArgumentParser(
        prog="softmine",
        description="Deep metric learning with OSM+CAA. Commands (each has --help and --version):",
        epilog=lines,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args(argv)
    parser.print_help()


if __name__ == "__main__":
    main()
