"""``accelkit distill``: a direct or progressive few-step student trained on a teacher's couplings."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import input_path, run_stage
from .main import app


@app.command("distill")
def distill(
    couplings: str | None = typer.Argument(None, help="A couple artifact; missing or '-': read a path from stdin."),
    method: str | None = typer.Option(None, "--method", help="progressive (default; halve the steps round by round) "
                                                             "direct (regress the N-step sample on the teacher's) or "
                                                             "guided (the guided teacher with g as an input, then "
                                                             "progressive rounds; needs --guidance-range)."),
    nfe: int | None = typer.Option(None, "--nfe", help="The student's steps (direct: 1, 2 or 4; default 1)."),
    start_nfe: int | None = typer.Option(None, "--start-nfe", help="progressive: the teacher's steps in the first "
                                                                   "round, nfe times a power of two (default 8)."),
    data: str | None = typer.Option(None, "--data", help="progressive: noise this data set (a 2-D set's name, digits, "
                                                         "fashion-mnist or a .safetensors/.npy file) instead of the "
                                                         "couplings' samples."),
    guidance_range: str | None = typer.Option(None, "--guidance-range", help="guided: A,B, the range of the "
                                                                              "guidance scale g the student takes "
                                                                              "(accelkit's scale)."),
    steps: int | None = typer.Option(None, "--steps", help="Optimizer steps (per round for progressive; recipe key "
                                                           "distill.loop.steps)."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Global batch size (over all processes)."),
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate (distill.loop.lr)."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of the pair order, the times and the fresh noise."),
    loss: str | None = typer.Option(None, "--loss", help="l2 (default) or pseudo-huber."),
    device: str | None = typer.Option(None, "--device", help="auto (default), cpu, cuda or cuda:N."),
    output: Path | None = typer.Option(None, "-o", "--output", help="Artifact directory (default runs/distill-HASH)."),
    recipe: Path | None = typer.Option(None, "--recipe", help="Recipe YAML with a 'distill' section."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key: distill.key=value, e.g. "
                                                     "distill.loop.ema_rates=[0.9999] (repeatable)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the plan; do no work."),
    force: bool = typer.Option(False, "--force", help="Replace an output directory that holds another recipe."),
) -> None:
    """Distill the teacher of COUPLINGS into a student of --nfe steps; prints the artifact path (its
    teacher.safetensors loads as a teacher; the manifest gives the solver, NFE and grid to sample it with). Killed
    or interrupted, the same command resumes exactly."""
    from ..errors import AccelkitError
    from ..recipes import resolve_stage

    g_range = None
    if guidance_range is not None:
        try:
            lo, hi = (float(v) for v in guidance_range.split(","))
        except ValueError:
            raise AccelkitError(f"--guidance-range {guidance_range!r}: expected two numbers A,B (e.g. 1,4)") from None
        g_range = [lo, hi]
    path_arg = couplings if couplings not in (None, "-") else None
    if path_arg is None and not (recipe is not None and couplings is None):
        path_arg = input_path(couplings, "couplings")
    flags = {"couplings": path_arg, "method": method, "nfe": nfe, "start_nfe": start_nfe, "data": data,
             "batch_size": batch_size, "guidance_range": g_range,
             "seed": seed, "loss": loss, "device": device}
    loop_sets = [f"distill.loop.{k}={v!r}" for k, v in (("steps", steps), ("lr", lr)) if v is not None]
    spec = resolve_stage("distill", recipe, flags, [*loop_sets, *set_])
    run_stage("distill", spec, output, force, dry_run)
