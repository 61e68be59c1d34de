"""``accelkit rescale``: the teacher's ODE under another schedule, as an artifact that loads as a teacher."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import emit, input_path
from .main import app

SCHEDULES = "linear, vp-cosine, edm, ve, vp-linear, vp-scaled-linear, vp-squaredcos"


@app.command("rescale")
def rescale(
    teacher: str | None = typer.Argument(None, help="Teacher checkpoint; missing or '-': read a path from stdin."),
    to: str | None = typer.Option(None, "--to", help=f"Target schedule: {SCHEDULES}."),
    config: str | None = typer.Option(None, "--config", help="config.json of a single-file diffusers state dict."),
    prediction_type: str | None = typer.Option(None, "--prediction-type", help="Override the prediction type."),
    schedule: str | None = typer.Option(None, "--schedule", help="Override the teacher's own schedule."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow a pickled source (weights_only)."),
    force: bool = typer.Option(False, "--force", help="Replace an output directory that holds another recipe."),
    output: Path | None = typer.Option(None, "-o", "--output", help="Artifact directory (default runs/rescale-HASH)."),
    recipe: Path | None = typer.Option(None, "--recipe", help="Recipe YAML with a 'rescale' section."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key: rescale.key=value (repeatable)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the plan; do no work."),
) -> None:
    """Express TEACHER's ODE exactly under another schedule (scale + time map); prints the artifact path.

    The artifact refers to the original weights by path and content hash instead of copying them, and loads as a
    teacher everywhere a checkpoint is taken (sample, couple, inspect, ...).
    """
    from ..recipes import resolve_stage

    teacher_path = teacher if teacher not in (None, "-") else None
    if teacher_path is None and not (recipe is not None and teacher is None):
        teacher_path = input_path(teacher, "teacher")
    flags = {"teacher": teacher_path, "to": to, "config": config, "prediction_type": prediction_type,
             "schedule": schedule, "allow_pickle": allow_pickle or None}
    spec = resolve_stage("rescale", recipe, flags, set_)
    from ..pipeline import check_inputs, plan_stage, print_plan

    check_inputs(spec, "rescale")
    if dry_run:
        print_plan([("rescale", plan_stage("rescale", spec, output))])
        return
    from ..stages.rescale import run_rescale

    emit(str(run_rescale(spec, output, force=force)))
