"""``accelkit adversarial``: a K-step generator from a teacher, trained against heads on its frozen features (LADD)."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import input_path, prompt_conditions_option, run_stage
from .main import app
from .options import ConditionsOption, NegativePromptOption, PromptOption, PromptsFileOption


@app.command("adversarial")
def adversarial(
    source: str | None = typer.Argument(None, help="A couple artifact, or a teacher with --data; missing or '-': "
                                                   "read a path from stdin."),
    method: str | None = typer.Option(None, "--method", help="ladd (default)."),
    steps: int | None = typer.Option(None, "--steps", help="K: the generator's sampling steps (default 1)."),
    data: str | None = typer.Option(None, "--data", help="Real samples: a built-in set or a .safetensors/.npy file "
                                                         "(default: the couplings' teacher samples)."),
    prompt: PromptOption = None,
    prompts_file: PromptsFileOption = None,
    negative_prompt: NegativePromptOption = None,
    conditions: ConditionsOption = None,
    train_steps: int | None = typer.Option(None, "--train-steps", help="Training steps (adversarial.loop.steps)."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Global batch size (over all processes)."),
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate of both networks (adversarial.loop.lr)."),
    ratio: int | None = typer.Option(None, "--ratio", help="Discriminator updates per generator update (default 1)."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of every draw."),
    device: str | None = typer.Option(None, "--device", help="auto (default), cpu, cuda or cuda:N."),
    output: Path | None = typer.Option(None, "-o", "--output", help="Artifact directory (default "
                                                                    "runs/adversarial-HASH)."),
    recipe: Path | None = typer.Option(None, "--recipe", help="Recipe YAML with an 'adversarial' section."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key: adversarial.key=value, e.g. "
                                                     "adversarial.discriminator.r1_weight=1 (repeatable)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the plan; do no work."),
    force: bool = typer.Option(False, "--force", help="Replace an output directory that holds another recipe."),
) -> None:
    """Train a K-step generator from the teacher of SOURCE against a discriminator of trainable heads on the frozen
    teacher's features at noised inputs; prints the artifact path (its teacher.safetensors loads as a teacher and
    records its K-step sampler). Killed or interrupted, the same command resumes exactly."""
    from ..recipes import resolve_stage

    path_arg = source if source not in (None, "-") else None
    if path_arg is None and not (recipe is not None and source is None):
        path_arg = input_path(source, "source")
    conditions = prompt_conditions_option(path_arg, prompt, prompts_file, negative_prompt, conditions)
    flags = {"source": path_arg, "method": method, "steps": steps, "data": data, "batch_size": batch_size,
             "ratio": ratio, "seed": seed, "device": device}
    flags["conditions"] = conditions
    loop_sets = [f"adversarial.loop.{k}={v!r}" for k, v in (("steps", train_steps), ("lr", lr)) if v is not None]
    spec = resolve_stage("adversarial", recipe, flags, [*loop_sets, *set_])
    run_stage("adversarial", spec, output, force, dry_run)
