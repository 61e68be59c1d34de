"""``accelkit reflow``: a rectified-flow or rectified-diffusion student trained on a teacher's couplings."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import input_path, run_stage
from .main import app


@app.command("reflow")
def reflow(
    couplings: str | None = typer.Argument(None, help="A couple artifact; missing or '-': read a path from stdin."),
    method: str | None = typer.Option(None, "--method", help="rectified-flow (default; linear-schedule teacher) or "
                                                             "rectified-diffusion (the teacher's own schedule)."),
    steps: int | None = typer.Option(None, "--steps", help="Optimizer steps (recipe key reflow.loop.steps)."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Global batch size (over all processes)."),
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate (reflow.loop.lr)."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of the pair order and the training times."),
    timesteps: str | None = typer.Option(None, "--timesteps", help="Training time density: uniform (default), "
                                                                   "logit-normal or u-shaped."),
    loss: str | None = typer.Option(None, "--loss", help="l2 (default) or pseudo-huber."),
    loss_space: str | None = typer.Option(None, "--loss-space", help="Loss on the network output or on its x0 "
                                                                     "estimate (default: output for rectified-flow, "
                                                                     "x0 for rectified-diffusion)."),
    phases: int | None = typer.Option(None, "--phases", help="K windows of the phased (PeRFlow) form: the student is "
                                                             "straight within each; sampled in K steps (default 1)."),
    phase_nfe: int | None = typer.Option(None, "--phase-nfe", help="Teacher evaluations per window solve "
                                                                   "(phases > 1; default 8)."),
    device: str | None = typer.Option(None, "--device", help="auto (default), cpu, cuda or cuda:N."),
    output: Path | None = typer.Option(None, "-o", "--output", help="Artifact directory (default runs/reflow-HASH)."),
    recipe: Path | None = typer.Option(None, "--recipe", help="Recipe YAML with a 'reflow' section."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key: reflow.key=value, e.g. "
                                                     "reflow.loop.ema_rates=[0.9999] (repeatable)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the plan; do no work."),
    force: bool = typer.Option(False, "--force", help="Replace an output directory that holds another recipe."),
) -> None:
    """Train a student from the teacher of COUPLINGS on its (noise, sample) pairs; prints the artifact path (its
    teacher.safetensors loads as a teacher). Killed or interrupted, the same command resumes exactly."""
    from ..recipes import resolve_stage

    path_arg = couplings if couplings not in (None, "-") else None
    if path_arg is None and not (recipe is not None and couplings is None):
        path_arg = input_path(couplings, "couplings")
    flags = {"couplings": path_arg, "method": method, "batch_size": batch_size, "seed": seed,
             "timesteps": timesteps, "loss": loss, "loss_space": loss_space, "device": device,
             "phases": phases, "phase_nfe": phase_nfe}
    loop_sets = [f"reflow.loop.{k}={v!r}" for k, v in (("steps", steps), ("lr", lr)) if v is not None]
    spec = resolve_stage("reflow", recipe, flags, [*loop_sets, *set_])
    run_stage("reflow", spec, output, force, dry_run)
