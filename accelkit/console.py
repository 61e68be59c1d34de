"""The stderr console: logs, tables and progress go here; stdout is kept for data."""

from __future__ import annotations

from rich.console import Console

err = Console(stderr=True)


def log(message: str) -> None:
    """One log line on stderr."""
    err.print(message, highlight=False, soft_wrap=True)
