"""``accelkit score-distill``: a K-step generator from a teacher, trained by VSD, DMD, DMD2 or SIM."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import input_path, prompt_conditions_option, run_stage
from .main import app
from .options import ConditionsOption, NegativePromptOption, PromptOption, PromptsFileOption


@app.command("score-distill")
def score_distill(
    source: str | None = typer.Argument(None, help="A couple artifact, or a teacher (alone, or with --data); "
                                                   "missing or '-': read a path from stdin."),
    method: str | None = typer.Option(None, "--method", help="vsd, dmd, dmd2 (default) or sim."),
    steps: int | None = typer.Option(None, "--steps", help="K: the generator's sampling steps (default 1)."),
    data: str | None = typer.Option(None, "--data", help="Real samples (a built-in set or a .safetensors/.npy "
                                                         "file); used by dmd2's GAN term."),
    prompt: PromptOption = None,
    prompts_file: PromptsFileOption = None,
    negative_prompt: NegativePromptOption = None,
    conditions: ConditionsOption = None,
    train_steps: int | None = typer.Option(None, "--train-steps", help="Training steps "
                                                                       "(score_distill.loop.steps)."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Global batch size (over all processes)."),
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate of both networks (score_distill.loop.lr)."),
    ratio: int | None = typer.Option(None, "--ratio", help="Fake-score updates per generator update "
                                                           "(default 5 for dmd2, 1 otherwise)."),
    guidance: float | None = typer.Option(None, "--guidance", help="The real score's guidance scale."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of every draw."),
    device: str | None = typer.Option(None, "--device", help="auto (default), cpu, cuda or cuda:N."),
    output: Path | None = typer.Option(None, "-o", "--output", help="Artifact directory (default "
                                                                    "runs/score_distill-HASH)."),
    recipe: Path | None = typer.Option(None, "--recipe", help="Recipe YAML with a 'score_distill' section."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key: score_distill.key=value, e.g. "
                                                     "score_distill.gan_weight=3e-3 (repeatable)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the plan; do no work."),
    force: bool = typer.Option(False, "--force", help="Replace an output directory that holds another recipe."),
) -> None:
    """Train a K-step generator from the teacher of SOURCE against the frozen (guided) teacher and a fake score
    trained on its samples; prints the artifact path (its teacher.safetensors loads as a teacher and records its
    K-step sampler). Killed or interrupted, the same command resumes exactly."""
    from ..recipes import resolve_stage

    path_arg = source if source not in (None, "-") else None
    if path_arg is None and not (recipe is not None and source is None):
        path_arg = input_path(source, "source")
    conditions = prompt_conditions_option(path_arg, prompt, prompts_file, negative_prompt, conditions)
    flags = {"source": path_arg, "method": method, "steps": steps, "data": data, "batch_size": batch_size,
             "ratio": ratio, "guidance": guidance, "seed": seed, "device": device}
    flags["conditions"] = conditions
    loop_sets = [f"score_distill.loop.{k}={v!r}" for k, v in (("steps", train_steps), ("lr", lr)) if v is not None]
    spec = resolve_stage("score_distill", recipe, flags, [*loop_sets, *set_])
    run_stage("score_distill", spec, output, force, dry_run)
