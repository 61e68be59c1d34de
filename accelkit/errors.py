"""The one error type the CLI turns into a one-line message and exit code 2."""

from __future__ import annotations


class AccelkitError(Exception):
    """A problem with the user's input: a file, key or value and what was expected.

    The CLI prints ``error: <message>`` on one line and exits with code 2; ``--debug`` shows the traceback.
    """
