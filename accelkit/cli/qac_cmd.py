"""``accelkit qac``: a teacher turned into a QAC model (quantized adaptive conditions) on its own objective."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import input_path, prompt_conditions_option, run_stage
from .main import app
from .options import ConditionsOption, NegativePromptOption, PromptOption, PromptsFileOption


@app.command("qac")
def qac(
    source: str | None = typer.Argument(None, help="A teacher (with --data) or a couple artifact whose samples serve "
                                                   "as data; missing or '-': read a path from stdin."),
    data: str | None = typer.Option(None, "--data", help="Clean samples: a built-in set (checkerboard, moons, rings, "
                                                         "gaussian-mixture, digits, fashion-mnist) or a "
                                                         ".safetensors/.npy file."),
    prompt: PromptOption = None,
    prompts_file: PromptsFileOption = None,
    negative_prompt: NegativePromptOption = None,
    conditions: ConditionsOption = None,
    bits: int | None = typer.Option(None, "--bits", help="D: code channels, codebook L^D (default 8; 0: the control, "
                                                         "fine-tuning without codes)."),
    levels: int | None = typer.Option(None, "--levels", help="L: levels per channel (default 2, binary codes)."),
    encoder_width: int | None = typer.Option(None, "--encoder-width", help="Encoder width (default: about 1 % of "
                                                                           "the teacher's parameters)."),
    collection: str | None = typer.Option(None, "--collection", help="Code weights: online (default; EMA of batch "
                                                                     "code counts) or offline (counted after "
                                                                     "training)."),
    steps: int | None = typer.Option(None, "--steps", help="Optimizer steps (recipe key qac.loop.steps)."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Global batch size (over all processes)."),
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate (qac.loop.lr)."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of the encoder's weights, data order, times, noise."),
    device: str | None = typer.Option(None, "--device", help="auto (default), cpu, cuda or cuda:N."),
    output: Path | None = typer.Option(None, "-o", "--output", help="Artifact directory (default runs/qac-HASH)."),
    recipe: Path | None = typer.Option(None, "--recipe", help="Recipe YAML with a 'qac' section."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key: qac.key=value, e.g. "
                                                     "qac.loop.ema_rates=[0.9999] (repeatable)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the plan; do no work."),
    force: bool = typer.Option(False, "--force", help="Replace an output directory that holds another recipe."),
) -> None:
    """Condition the teacher on learned quantized codes of its data, training encoder and network jointly on the
    teacher's own objective (Liang et al. 2024); prints the artifact path. The artifact loads as a teacher: sample,
    couple and eval draw each sample's code from the collected weights (or take --code). Killed or interrupted, the
    same command resumes exactly."""
    from ..recipes import resolve_stage

    path_arg = source if source not in (None, "-") else None
    if path_arg is None and not (recipe is not None and source is None):
        path_arg = input_path(source, "source (teacher or couplings)")
    conditions = prompt_conditions_option(path_arg, prompt, prompts_file, negative_prompt, conditions)
    flags = {"source": path_arg, "data": data, "bits": bits, "levels": levels, "encoder_width": encoder_width,
             "collection": collection, "batch_size": batch_size, "seed": seed, "device": device}
    flags["conditions"] = conditions
    loop_sets = [f"qac.loop.{k}={v!r}" for k, v in (("steps", steps), ("lr", lr)) if v is not None]
    spec = resolve_stage("qac", recipe, flags, [*loop_sets, *set_])
    run_stage("qac", spec, output, force, dry_run)
