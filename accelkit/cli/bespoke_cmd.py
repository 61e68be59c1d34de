"""``accelkit bespoke TEACHER --nfe N``: a learned few-step solver (bespoke scale-time or BNS) for one teacher."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import emit, input_path
from .main import app


@app.command("bespoke")
def bespoke(
    teacher: str | None = typer.Argument(None, help="Teacher checkpoint; missing or '-': read a path from stdin."),
    nfe: int | None = typer.Option(None, "--nfe", help="Teacher evaluations per sample of the learned solver."),
    kind: str | None = typer.Option(None, "--kind", help="bespoke (default; scale-time RK1/RK2 on the error bound) "
                                                         "or bns (non-stationary, trained end to end)."),
    base: str | None = typer.Option(None, "--base", help="Bespoke base solver: rk1 or rk2 (default: rk2 for an "
                                                         "even NFE, rk1 for an odd one)."),
    init: str | None = typer.Option(None, "--init", help="BNS start: a standard solver (euler, dpm++2m, ...) or "
                                                         "best (default: the lowest validation error)."),
    couplings: str | None = typer.Option(None, "--couplings", help="A couple artifact made with --save-trajectory "
                                                                   "(default: compute ground-truth paths here)."),
    train_samples: int | None = typer.Option(None, "--train-samples", help="Ground-truth paths to train on."),
    val_samples: int | None = typer.Option(None, "--val-samples", help="Held-out paths for the validation RMSE."),
    steps: int | None = typer.Option(None, "--steps", help="Optimizer steps (recipe key bespoke.loop.steps)."),
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate (bespoke.loop.lr)."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Paths per optimizer step."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of the noise and the batch order."),
    device: str | None = typer.Option(None, "--device", help="auto (default), cpu, cuda or cuda:N."),
    output: Path | None = typer.Option(None, "-o", "--output", help="Artifact directory (default runs/bespoke-HASH)."),
    recipe: Path | None = typer.Option(None, "--recipe", help="Recipe YAML with a 'bespoke' section."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key: bespoke.key=value, e.g. "
                                                     "bespoke.path_points=128 (repeatable)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the plan; do no work."),
    force: bool = typer.Option(False, "--force", help="Replace an output directory that holds another recipe."),
) -> None:
    """Train a solver of NFE evaluations for TEACHER (its parameters only; the teacher stays frozen); prints the
    artifact path, which `accelkit sample` and `accelkit eval` take as --solver. Killed or interrupted, the same
    command resumes exactly."""
    from ..recipes import resolve_stage

    path_arg = teacher if teacher not in (None, "-") else None
    if path_arg is None and not (recipe is not None and teacher is None):
        path_arg = input_path(teacher, "teacher checkpoint")
    flags = {"teacher": path_arg, "nfe": nfe, "kind": kind, "base": base, "init": init, "couplings": couplings,
             "train_samples": train_samples, "val_samples": val_samples, "batch_size": batch_size, "seed": seed,
             "device": device}
    loop_sets = [f"bespoke.loop.{k}={v!r}" for k, v in (("steps", steps), ("lr", lr)) if v is not None]
    spec = resolve_stage("bespoke", recipe, flags, [*loop_sets, *set_])
    from ..pipeline import check_inputs, plan_stage, print_plan

    check_inputs(spec, "bespoke")
    if dry_run:
        print_plan([("bespoke", plan_stage("bespoke", spec, output))])
        return
    from ..stages.bespoke import run_bespoke

    emit(str(run_bespoke(spec, output, force=force)))
