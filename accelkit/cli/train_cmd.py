"""``accelkit train``: a small teacher trained from scratch on a toy or image data set (or a tensor file)."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import run_stage
from .main import app


@app.command("train")
def train(
    data: str | None = typer.Option(None, "--data", help="checkerboard, moons, rings, gaussian-mixture, digits, "
                                                         "fashion-mnist, a .safetensors/.npy file of samples, or a "
                                                         "folder of same-size images."),
    objective: str | None = typer.Option(None, "--objective", help="flow (flow matching, linear schedule; default) "
                                                                    "or eps (DDPM noise prediction, discrete VP)."),
    steps: int | None = typer.Option(None, "--steps", help="Optimizer steps (recipe key train.loop.steps)."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Global batch size (over all processes)."),
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate (train.loop.lr)."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of the initial weights, data order and noise."),
    device: str | None = typer.Option(None, "--device", help="auto (default), cpu, cuda or cuda:N."),
    output: Path | None = typer.Option(None, "-o", "--output", help="Artifact directory (default runs/train-HASH)."),
    recipe: Path | None = typer.Option(None, "--recipe", help="Recipe YAML with a 'train' section."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key: train.key=value, e.g. "
                                                     "train.loop.ema_rates=[0.999,0.9999] (repeatable)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the plan; do no work."),
    force: bool = typer.Option(False, "--force", help="Replace an output directory that holds another recipe."),
) -> None:
    """Train a small diffusion / flow-matching teacher; prints the artifact path (its teacher.safetensors loads as a
    teacher). Killed or interrupted, the same command resumes exactly. Runs under torchrun for several processes."""
    from ..recipes import resolve_stage

    flags = {"data": data, "objective": objective, "batch_size": batch_size, "seed": seed, "device": device}
    loop_sets = [f"train.loop.{k}={v!r}" for k, v in (("steps", steps), ("lr", lr)) if v is not None]
    spec = resolve_stage("train", recipe, flags, [*loop_sets, *set_])
    run_stage("train", spec, output, force, dry_run)
