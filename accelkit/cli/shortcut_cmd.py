"""``accelkit shortcut``: a shortcut-model or MeanFlow student of a teacher, sampled in one or a few jumps."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import input_path, prompt_conditions_option, run_stage
from .main import app
from .options import ConditionsOption, NegativePromptOption, PromptOption, PromptsFileOption


def parse_range(value: str | None) -> list[float] | None:
    """``A,B`` -> [A, B] (validated by the recipe)."""
    from ..errors import AccelkitError

    if value is None:
        return None
    parts = value.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        return [float(p) for p in parts]
    except ValueError:
        raise AccelkitError(f"--guidance-range {value!r}: expected two numbers A,B (e.g. 1,4)") from None


@app.command("shortcut")
def shortcut(
    source: str | None = typer.Argument(None, help="A couple artifact, or a teacher with --data; missing or '-': "
                                                   "read a path from stdin."),
    method: str | None = typer.Option(None, "--method", help="shortcut (default: step size as input, two half "
                                                             "jumps make one) or meanflow (average velocity)."),
    data: str | None = typer.Option(None, "--data", help="Clean samples: a built-in set or a .safetensors/.npy "
                                                         "file (needed with a teacher as SOURCE)."),
    prompt: PromptOption = None,
    prompts_file: PromptsFileOption = None,
    negative_prompt: NegativePromptOption = None,
    conditions: ConditionsOption = None,
    anchor: str | None = typer.Option(None, "--anchor", help="data (default: flow matching on the clean samples) "
                                                             "or teacher (the teacher's velocity: a distillation)."),
    guidance: float | None = typer.Option(None, "--guidance", help="Bake this guidance scale into the targets."),
    guidance_range: str | None = typer.Option(None, "--guidance-range", help="A,B: the guidance scale as an input "
                                                                            "over [A, B]; sample with --guidance."),
    nfe: int | None = typer.Option(None, "--nfe", help="Jumps of the recorded sampler (default 1; shortcut: a "
                                                       "power of two up to finest_steps)."),
    steps: int | None = typer.Option(None, "--steps", help="Optimizer steps (recipe key shortcut.loop.steps)."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Global batch size (over all processes)."),
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate (shortcut.loop.lr)."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of the sample order, times, noise and scales."),
    device: str | None = typer.Option(None, "--device", help="auto (default), cpu, cuda or cuda:N."),
    output: Path | None = typer.Option(None, "-o", "--output", help="Artifact directory (default "
                                                                    "runs/shortcut-HASH)."),
    recipe: Path | None = typer.Option(None, "--recipe", help="Recipe YAML with a 'shortcut' section."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key: shortcut.key=value, e.g. "
                                                     "shortcut.finest_steps=64 (repeatable)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the plan; do no work."),
    force: bool = typer.Option(False, "--force", help="Replace an output directory that holds another recipe."),
) -> None:
    """Train a self-consistency student of SOURCE's teacher (shortcut model or MeanFlow); prints the artifact path
    (its teacher.safetensors loads as a teacher and records its sampler). Killed or interrupted, the same command
    resumes exactly."""
    from ..recipes import resolve_stage

    path_arg = source if source not in (None, "-") else None
    if path_arg is None and not (recipe is not None and source is None):
        path_arg = input_path(source, "source")
    conditions = prompt_conditions_option(path_arg, prompt, prompts_file, negative_prompt, conditions)
    flags = {"source": path_arg, "method": method, "data": data, "anchor": anchor, "guidance": guidance,
             "guidance_range": parse_range(guidance_range), "nfe": nfe, "batch_size": batch_size, "seed": seed,
             "device": device}
    flags["conditions"] = conditions
    loop_sets = [f"shortcut.loop.{k}={v!r}" for k, v in (("steps", steps), ("lr", lr)) if v is not None]
    spec = resolve_stage("shortcut", recipe, flags, [*loop_sets, *set_])
    run_stage("shortcut", spec, output, force, dry_run)
