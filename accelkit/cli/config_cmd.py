"""``accelkit config show``: the fully resolved recipe, with every default filled in, as YAML on stdout."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from .main import app

config_app = typer.Typer(help="Inspect recipes.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("show")
def show(
    recipe: Path = typer.Argument(..., help="Recipe YAML (a stage section or a 'stages:' list)."),
    set_: list[str] = typer.Option([], "--set", help="Override: stage.key=value or stages[i].stage.key=value."),
) -> None:
    """Print RECIPE resolved and validated (defaults filled in) as YAML."""
    from ..recipes import dump_yaml, pipeline_as_data, resolve_pipeline

    sys.stdout.write(dump_yaml(pipeline_as_data(resolve_pipeline(recipe, set_))))
