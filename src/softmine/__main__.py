"""``softmine`` (or ``python -m softmine``): the list of commands, and ``softmine <command> ...`` runs one.

``softmine train experiment=demo`` is ``softmine-train experiment=demo``,
``softmine eval RUN`` is ``softmine-eval RUN``, and so on for every command of
:data:`softmine.commands.COMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from softmine.commands import COMMANDS, program_name
from softmine.commands.common import ArgumentParser


def build_parser() -> ArgumentParser:
    width = max(len(name) for name in COMMANDS) + 2
    lines = "\n".join(
        f"  {name:<{width}} {c.summary}" + (f" [{c.script}]" if c.script else "")
        for name, c in COMMANDS.items()
    )
    parser = ArgumentParser(
        prog="softmine",
        usage="softmine [-h] [--version] COMMAND [ARGS ...]",
        description="Deep metric learning with OSM+CAA.",
        epilog=f"commands (softmine COMMAND --help; [the same as a console script]):\n{lines}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", nargs="?", metavar="COMMAND", help="one of the commands below")
    return parser


def run(command: str, args: Sequence[str]) -> int | None:
    """Run ``command``'s ``main`` with ``args`` as its command line; its exit status."""
    module = importlib.import_module(COMMANDS[command].module)
    sys.argv = [program_name(command), *args]  # Hydra (train) reads its overrides from sys.argv
    return module.main()


def main(argv: Sequence[str] | None = None) -> int | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and not argv[0].startswith("-"):
        if argv[0] not in COMMANDS:
            parser.error(f"no command {argv[0]!r}; choose one of {', '.join(COMMANDS)}")
        return run(argv[0], argv[1:])
    parser.parse_args(argv)  # --help, --version
    parser.print_help()
    return None


if __name__ == "__main__":
    sys.exit(main())
