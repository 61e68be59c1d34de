"""``accelkit run``: a recipe's stages in order, each reused, resumed or run."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import emit
from .main import app


@app.command("run")
def run(
    recipe: Path = typer.Argument(..., help="Recipe YAML with a 'stages:' list."),
    set_: list[str] = typer.Option([], "--set", help="Override: stage.key=value or stages[i].stage.key=value."),
    force: bool = typer.Option(False, "--force", help="Replace outputs that hold another recipe's artifact."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the plan; do no work."),
) -> None:
    """Run RECIPE's stages in order; prints the last stage's artifact path."""
    from ..pipeline import run_pipeline
    from ..recipes import resolve_pipeline

    plan = resolve_pipeline(recipe, set_)
    path = run_pipeline(plan, force=force, dry_run=dry_run)
    if path is not None:
        emit(str(path))
