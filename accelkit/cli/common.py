"""Helpers shared by the command modules (standard library only: this is on the CLI's import path)."""

from __future__ import annotations

import sys

from ..errors import AccelkitError


def input_path(arg: str | None, what: str = "input") -> str:
    """The argument, or, when it is missing or ``-``, the first non-empty line of stdin (``a | b`` pipes)."""
    if arg not in (None, "-"):
        return arg
    if sys.stdin is None or sys.stdin.isatty():
        raise AccelkitError(f"no {what} given: pass a path or pipe one in on stdin")
    for line in sys.stdin:
        line = line.strip()
        if line:
            return line
    raise AccelkitError(f"no {what} given: stdin was empty")


def emit(path_or_json: str) -> None:
    """Write one line of data to stdout (an artifact path or JSON) and flush, for the next command in a pipe."""
    sys.stdout.write(path_or_json + "\n")
    sys.stdout.flush()
