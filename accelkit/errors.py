"""The one error type the CLI turns into a one-line message and exit code 2."""

from __future__ import annotations


class AccelkitError(Exception):
    """A problem with the user's input: a file, key or value and what was expected.

    The CLI prints ``error: <message>`` on one line and exits with code 2; ``--debug`` shows the traceback.
    """


class JobInterrupted(Exception):
    """A job stopped on SIGINT/SIGTERM after saving a checkpoint; running the same command again resumes it.

    The CLI prints the message and exits with 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM).
    """

    def __init__(self, message: str, signum: int = 2):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
