"""``accelkit solver-stats TEACHER``: DPM-Solver-v3's empirical model statistics of one teacher (a small artifact)."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import emit, input_path
from .main import app


@app.command("solver-stats")
def solver_stats(
    teacher: str | None = typer.Argument(None, help="Teacher checkpoint; missing or '-': read a path from stdin."),
    samples: int | None = typer.Option(None, "--samples", help="Trajectories the statistics average over "
                                                               "(default 256)."),
    points: int | None = typer.Option(None, "--points", help="Log-SNR values the statistics are computed at "
                                                             "(default 60)."),
    val_samples: int | None = typer.Option(None, "--val-samples", help="Held-out noises for the summary's RMSE "
                                                                       "against DPM-Solver++ and UniPC (0: none)."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of the noise and the Hutchinson probes."),
    device: str | None = typer.Option(None, "--device", help="auto (default), cpu, cuda or cuda:N."),
    output: Path | None = typer.Option(None, "-o", "--output", help="Artifact directory (default "
                                                                    "runs/solver-stats-HASH)."),
    recipe: Path | None = typer.Option(None, "--recipe", help="Recipe YAML with a 'solver-stats' section."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key: solver-stats.key=value (repeatable)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the plan; do no work."),
    force: bool = typer.Option(False, "--force", help="Replace an output directory that holds another recipe."),
) -> None:
    """Compute DPM-Solver-v3's empirical model statistics of TEACHER on its own trajectories; prints the artifact
    path, which `accelkit sample` and `accelkit eval` take as --solver (DPM-Solver-v3 at any NFE)."""
    from ..recipes import resolve_stage

    path_arg = teacher if teacher not in (None, "-") else None
    if path_arg is None and not (recipe is not None and teacher is None):
        path_arg = input_path(teacher, "teacher checkpoint")
    flags = {"teacher": path_arg, "samples": samples, "points": points, "val_samples": val_samples, "seed": seed,
             "device": device}
    spec = resolve_stage("solver-stats", recipe, flags, set_)
    from ..pipeline import check_inputs, plan_stage, print_plan

    check_inputs(spec, "solver-stats")
    if dry_run:
        print_plan([("solver-stats", plan_stage("solver-stats", spec, output))])
        return
    from ..stages.solver_stats import run_solver_stats

    emit(str(run_solver_stats(spec, output, force=force)))
