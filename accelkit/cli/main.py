"""The ``accelkit`` Typer app and its entry point.

Each command lives in its own module under ``accelkit.cli`` and imports torch, diffusers and the stages inside
the command body, so ``accelkit --help`` and shell completion answer at once.
"""

from __future__ import annotations

import sys

import typer

from ..errors import AccelkitError, JobInterrupted

app = typer.Typer(
    name="accelkit",
    help="Make trained diffusion and flow-matching checkpoints fast: few-step solvers, learned solvers, students.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    rich_markup_mode=None,
)


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error."),
) -> None:
    """accelkit: few-step sampling and distillation for diffusion and flow-matching models."""


def _register() -> None:
    from . import commands  # noqa: F401  (registers every command on ``app``)


def run() -> None:
    """Console-script entry: one-line errors with exit code 2 for bad input; ``--debug`` shows the traceback."""
    debug = "--debug" in sys.argv[1:]
    _register()
    try:
        app(prog_name="accelkit")
    except AccelkitError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except JobInterrupted as e:
        if debug:
            raise
        print(f"interrupted: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
