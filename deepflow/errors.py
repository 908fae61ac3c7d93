"""User mistakes on the command line of every job: one ``error: <field or URL>: <what is wrong>`` line and exit
status 2, no traceback. ``DEEPFLOW_DEBUG=1`` lets the exception (with its traceback) through instead.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable

__all__ = ["MAX_ERROR_CHARS", "USER_ERRORS", "debug_enabled", "describe", "one_line", "report_user_errors"]

MAX_ERROR_CHARS = 600

#: What a wrong setting, URL or input file raises (ConfigError is a ValueError).
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


def one_line(message: str) -> str:
    """``message`` on one line (lines joined with "; "), cut after :data:`MAX_ERROR_CHARS` characters."""
    line = "; ".join(part.strip() for part in message.splitlines() if part.strip()) or "failed"
    return line if len(line) <= MAX_ERROR_CHARS else line[: MAX_ERROR_CHARS - 3] + "..."


def describe(error: BaseException) -> str:
    """The error on one line: ``<path>: <reason>`` for OS errors, else its message."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
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
