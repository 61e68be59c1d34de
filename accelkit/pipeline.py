"""Running stages: one stage with its output planned (reuse / resume / new), or a whole recipe in order.

``run_stage`` is what every stage command calls; ``run_pipeline`` is ``accelkit run``: each stage is reused when its
artifact is complete, resumed when partial, run otherwise, and a later stage's ``@stage`` input is the earlier
stage's output directory. One summary table goes to stderr at the end; stdout gets only the last artifact's path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .artifacts import content_hash, default_output, identity_of, probe
from .console import err
from .errors import AccelkitError
from .recipes import PlannedStage, StageRecipe, get_stage

ACTIONS = {"new": "run", "partial": "resume", "complete": "reuse", "conflict": "refused"}


@dataclass
class StagePlan:
    name: str
    output: Path | None  # None while an input is an earlier stage's output not yet made
    state: str  # new / partial / complete / conflict / pending

    @property
    def action(self) -> str:
        return ACTIONS.get(self.state, "run")


def plan_stage(name: str, recipe: StageRecipe, output: str | Path | None = None) -> StagePlan:
    """Where stage ``name`` would write for ``recipe`` and what it would find there, without taking the lock."""
    inputs = recipe.inputs()
    missing = [k for k, v in inputs.items() if not Path(v).exists()]
    if missing:
        if output is None:
            return StagePlan(name, None, "pending")
        return StagePlan(name, Path(output), probe(output, "") if Path(output).exists() else "new")
    identity = identity_of(name, recipe, {k: content_hash(v) for k, v in inputs.items()})
    out = Path(output) if output is not None else default_output(name, identity)
    return StagePlan(name, out, probe(out, identity))


def check_inputs(recipe: StageRecipe, what: str) -> None:
    for field, path in recipe.inputs().items():
        if not Path(path).exists():
            raise AccelkitError(f"{what}.{field}: {path!r} does not exist")


def run_stage(name: str, recipe: StageRecipe, output: str | Path | None = None, force: bool = False) -> Path:
    """Run (or reuse, or resume) one stage; returns its artifact directory."""
    check_inputs(recipe, name)
    spec = get_stage(name)
    return Path(spec.run(recipe, Path(output) if output is not None else None, force))


def print_plan(plans: list[tuple[str, StagePlan]]) -> None:
    from rich.table import Table

    table = Table(title="plan", title_justify="left")
    for col in ("stage", "action", "output"):
        table.add_column(col)
    for label, p in plans:
        table.add_row(label, p.action if p.state != "pending" else "run (after its inputs)",
                      str(p.output) if p.output else "(decided by its inputs)")
    err.print(table)


def run_pipeline(plan: list[PlannedStage], force: bool = False, dry_run: bool = False,
                 outputs: dict[int, Path] | None = None) -> Path | None:
    """Run a resolved recipe's stages in order; returns the last stage's artifact directory (None on a dry run).

    ``outputs``, when given, receives every stage's artifact directory by stage index.
    """
    outputs = {} if outputs is None else outputs
    rows = []
    for stage in plan:
        recipe = stage.recipe
        if stage.refs:
            updates = {f: str(outputs[j]) for f, j in stage.refs.items() if j in outputs}
            recipe = recipe.model_copy(update=updates)
        if dry_run:
            resolved = all(j in outputs for j in stage.refs.values())
            p = plan_stage(stage.name, recipe) if resolved else StagePlan(stage.name, None, "pending")
            if p.state == "complete" and p.output is not None:
                outputs[stage.index] = p.output  # later stages can be planned against a finished input
            rows.append((stage.label, p))
            continue
        before = plan_stage(stage.name, recipe)
        if before.state == "conflict" and not force:
            raise AccelkitError(f"{stage.label}: {before.output} holds another recipe's artifact; pass --force")
        start = time.perf_counter()
        path = run_stage(stage.name, recipe, None, force)
        outputs[stage.index] = path
        rows.append((stage.label, before.action, path, time.perf_counter() - start))
    if dry_run:
        print_plan(rows)
        return None
    from rich.table import Table

    table = Table(title="summary", title_justify="left")
    for col in ("stage", "action", "seconds", "output"):
        table.add_column(col)
    for label, action, path, secs in rows:
        table.add_row(label, action, f"{secs:.1f}", str(path))
    err.print(table)
    return outputs[plan[-1].index]


__all__ = ["StagePlan", "plan_stage", "run_stage", "run_pipeline", "print_plan"]
