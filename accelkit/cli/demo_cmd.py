"""``accelkit demo``: the pipeline on a built-in 2-D teacher, with the solver comparison."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import emit
from .main import app


@app.command("demo")
def demo(
    output: Path | None = typer.Option(None, "-o", "--output", help="Demo artifact (default runs/demo-HASH)."),
    set_: list[str] = typer.Option([], "--set", help="Override the demo recipe: stage.key=value (repeatable)."),
    show_recipe: bool = typer.Option(False, "--show-recipe", help="Print the demo's recipe (YAML) and exit."),
    force: bool = typer.Option(False, "--force", help="Replace outputs that hold another recipe's artifact."),
) -> None:
    """Train a 2-D flow teacher, couple it, rescale it, compare every solver at 1-16 NFE; prints the demo path.

    A table of quality against NFE goes to stderr; quality.json, quality.png and samples.png go into the demo
    artifact. A second run reuses every finished stage.
    """
    from ..demo import DEMO_RECIPE, run_demo

    if show_recipe:
        emit(DEMO_RECIPE.rstrip("\n"))
        return
    emit(str(run_demo(output, set_, force=force)))
