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


def prompt_texts(prompt: list[str] | None, prompts_file: str | None) -> list[str]:
    """The prompts of ``--prompt`` (repeatable) followed by those of ``--prompts FILE`` (one a line)."""
    texts = list(prompt or [])
    if prompts_file is not None:
        from ..prompts import read_prompts_file

        texts += read_prompts_file(prompts_file)
    return texts


def prompt_conditions_option(source: str | None, prompt: list[str] | None, prompts_file: str | None,
                             negative_prompt: str | None, conditions: str | None = None,
                             conditions_flag: str = "--conditions") -> str | None:
    """The conditions file of a command's ``--prompt`` / ``--prompts`` / ``--negative-prompt`` (encoded with the
    pipeline of ``source``, a teacher, cached by content: :func:`accelkit.prompts.prompt_conditions_file`), else
    its ``conditions_flag`` file, else None. ``couple`` and every training stage that takes a teacher take their
    prompts through here."""
    texts = prompt_texts(prompt, prompts_file)
    if not texts:
        if negative_prompt is not None:
            raise AccelkitError("--negative-prompt: needs --prompt or --prompts")
        return conditions
    if conditions is not None:
        raise AccelkitError(f"give the conditions either with --prompt / --prompts or with {conditions_flag}, "
                            "not both")
    if source is None:
        raise AccelkitError("--prompt: needs the teacher on the command line (its pipeline encodes the prompts)")
    from ..stages.student import is_couplings

    if is_couplings(source):
        raise AccelkitError(f"--prompt: {source} is a couple artifact, whose pairs carry the conditions they were "
                            "made with; give the prompts to `accelkit couple` (or a teacher with --data here)")
    from ..prompts import prompt_conditions_file

    return str(prompt_conditions_file(source, texts, negative_prompt))
