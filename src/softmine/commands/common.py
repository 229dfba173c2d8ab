"""Shared command-line behaviour: user errors become one line and a non-zero exit."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from softmine.errors import Interrupted, SoftmineError

F = TypeVar("F", bound=Callable[..., Any])

EXIT_USER_ERROR = 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a command killed by it


def debug_enabled() -> bool:
    """``SOFTMINE_DEBUG=1`` shows full tracebacks instead of one-line errors."""
    return os.environ.get("SOFTMINE_DEBUG", "").lower() in ("1", "true", "yes")


def user_message(e: BaseException) -> str:
    """The error's own sentence; unwraps the worker traceback that DataLoader workers add."""
    msg = str(e)
    if "Original Traceback (most recent call last):" in msg:
        last = [line for line in msg.splitlines() if line.strip()][-1]
        head, sep, rest = last.partition(": ")
        msg = rest if sep and type(e).__name__ in head else last
    return msg.strip()


def exit_with_error(message: str) -> NoReturn:
    """Print ``error: <message>`` on stderr and exit with :data:`EXIT_USER_ERROR` (2)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def user_errors_exit(func: F) -> F:
    """Turn a :class:`SoftmineError` into ``error: <message>`` on stderr and exit code 2.

    An :class:`Interrupted` run prints how to resume and exits with 128 + the signal number.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except Interrupted as e:
            print(str(e), file=sys.stderr)
            sys.exit(128 + e.signum)
        except SoftmineError as e:
            if debug_enabled():
                raise
            exit_with_error(user_message(e))
        except BrokenPipeError:  # output piped into `head` and the like: stop quietly
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            sys.exit(EXIT_BROKEN_PIPE)

    return wrapper  # type: ignore[return-value]


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` with our conventions: ``--version``, and usage errors as one ``error:`` line, exit 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument("--version", action="version", version=version_line(self.prog))

    def error(self, message: str) -> NoReturn:
        exit_with_error(f"{message} (see {self.prog} --help)")


def version_line(prog: str = "softmine") -> str:
    """``<prog> <version>``: what every command's ``--version`` prints."""
    from softmine import __version__

    return f"{prog} {__version__}"
