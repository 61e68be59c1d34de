"""Every recipe shipped in recipes/ validates and plans (``accelkit run --dry-run``): its keys exist, its values
have the right types and its ``@stage`` references resolve."""

from __future__ import annotations

from pathlib import Path

import pytest

from accelkit.pipeline import run_pipeline
from accelkit.recipes import resolve_pipeline

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert len(RECIPES) >= 5


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_plans(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = resolve_pipeline(recipe)
    assert plan and run_pipeline(plan, dry_run=True) is None
