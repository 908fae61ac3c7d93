"""User mistakes on the command line of every job: one ``error: <field or URL>: <what is wrong>`` line and exit
status 2, no traceback. ``DEEPFLOW_DEBUG=1`` lets the exception (with its traceback) through instead.

The family: :class:`UserError` (a ``ValueError``) is the base of every error the platform raises for a wrong
setting, URL or input file (``configuration.ConfigError``, the evaluate job's ``EvaluateError``, argparse usage
errors as :class:`UsageError`); :data:`USER_ERRORS` adds the library errors that mean the same (a plain
``ValueError``, a missing file, access denied). Every job's ``main`` runs its body under
:func:`report_user_errors` and builds its flags with :class:`JobArgumentParser`.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from typing import NoReturn

__all__ = [
    "MAX_ERROR_CHARS",
    "USER_ERRORS",
    "JobArgumentParser",
    "UsageError",
    "UserError",
    "debug_enabled",
    "describe",
    "one_line",
    "report_user_errors",
    "usage_message",
]

MAX_ERROR_CHARS = 600


class UserError(ValueError):
    """A mistake of the user (a setting, URL, flag or input file); ``str(error)`` is ``<field or URL>: <what is
    wrong and what is allowed>`` (several problems: one per line, printed joined by "; ")."""


class UsageError(UserError):
    """A command-line usage mistake (argparse's message, the flag first)."""


#: What a wrong setting, URL or input file raises: the family, and library errors that mean the same.
USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
)


def one_line(message: str) -> str:
    """``message`` on one line (lines joined with "; "), cut after :data:`MAX_ERROR_CHARS` characters."""
    line = "; ".join(part.strip() for part in message.splitlines() if part.strip()) or "failed"
    return line if len(line) <= MAX_ERROR_CHARS else line[: MAX_ERROR_CHARS - 3] + "..."


def describe(error: BaseException) -> str:
    """The error on one line: ``<path>: <reason>`` for OS errors, else its message."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return one_line(f"{error.filename}: {error.strerror}")
    return one_line(str(error) or type(error).__name__)


def debug_enabled() -> bool:
    """``DEEPFLOW_DEBUG`` set (and not 0): show tracebacks instead of one-line errors."""
    return os.environ.get("DEEPFLOW_DEBUG", "") not in ("", "0")


def report_user_errors(body: Callable[[], int]) -> int:
    """``body()``'s exit status, or 2 after printing ``error: ...`` to stderr for a :data:`USER_ERRORS`."""
    try:
        return body()
    except USER_ERRORS as error:
        if debug_enabled():
            raise
        print(f"error: {describe(error)}", file=sys.stderr, flush=True)
        return 2


_ARGUMENT = re.compile(r"^argument (?P<flags>[^:]+): (?P<reason>.*)$", re.DOTALL)
_REQUIRED = "the following arguments are required: "
_UNRECOGNIZED = "unrecognized arguments: "


def usage_message(message: str) -> str:
    """argparse's message with the flag first: ``argument --steps: invalid int value: 'x'`` ->
    ``--steps: invalid int value: 'x'``; ``the following arguments are required: --config`` -> ``--config:
    required``; ``unrecognized arguments: --fo`` -> ``--fo: unrecognized argument(s)``."""
    if match := _ARGUMENT.match(message):
        flags = match["flags"].split("/")[-1]  # "-c/--config" -> "--config"
        return f"{flags}: {match['reason']}"
    if message.startswith(_REQUIRED):
        return f"{message[len(_REQUIRED):]}: required"
    if message.startswith(_UNRECOGNIZED):
        return f"{message[len(_UNRECOGNIZED):]}: unrecognized argument(s)"
    return message


class JobArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors raise :class:`UsageError` (so :func:`report_user_errors` prints one
    ``error: --flag: <what is wrong>`` line and exits 2) instead of printing the usage block."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{usage_message(message)} (see {self.prog} --help)")
