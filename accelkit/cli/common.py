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


def run_stage(name: str, spec, output, force: bool, dry_run: bool) -> None:
    """The end of every training-stage command: check the resolved recipe's inputs, then print the plan
    (``--dry-run``) or run the stage and print its artifact path (rank 0 only under torchrun)."""
    from ..jobs import dist_env
    from ..pipeline import check_inputs, plan_stage, print_plan
    from ..recipes import get_stage

    check_inputs(spec, name)
    if dry_run:
        print_plan([(name, plan_stage(name, spec, output))])
        return
    path = get_stage(name).run(spec, output, force)
    if dist_env()[0] == 0:
        emit(str(path))
