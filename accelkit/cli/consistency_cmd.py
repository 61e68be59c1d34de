"""``accelkit consistency``: a consistency student (CD, LCM, PCM) or consistency tuning on data (ECT, SCT)."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import input_path, prompt_conditions_option, run_stage
from .main import app
from .options import ConditionsOption, NegativePromptOption, PromptOption, PromptsFileOption


@app.command("consistency")
def consistency(
    source: str | None = typer.Argument(None, help="A couple artifact, or a teacher together with --data; missing "
                                                   "or '-': read a path from stdin."),
    method: str | None = typer.Option(None, "--method", help="cd (default), lcm (guided CD; needs --guidance), pcm "
                                                             "(phased), ect or sct (consistency tuning on data)."),
    data: str | None = typer.Option(None, "--data", help="Clean samples: a built-in data set or a .safetensors/.npy "
                                                         "file (needed when SOURCE is a teacher)."),
    prompt: PromptOption = None,
    prompts_file: PromptsFileOption = None,
    negative_prompt: NegativePromptOption = None,
    conditions: ConditionsOption = None,
    guidance: float | None = typer.Option(None, "--guidance", help="lcm / pcm: the teacher's guidance scale in its "
                                                                   "solver step (accelkit's g; LCM's w = g - 1)."),
    guidance_range: str | None = typer.Option(None, "--guidance-range", help="lcm: A,B: the student takes the "
                                                                              "guidance scale as an input, drawn "
                                                                              "from [A, B] in training."),
    phases: int | None = typer.Option(None, "--phases", help="pcm: M phases = the student's sampling steps "
                                                             "(default 4)."),
    steps: int | None = typer.Option(None, "--steps", help="Optimizer steps (consistency.loop.steps)."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Global batch size (over all processes)."),
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate (consistency.loop.lr)."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of the batch order, the times and the noise."),
    loss: str | None = typer.Option(None, "--loss", help="pseudo-huber (default) or l2."),
    device: str | None = typer.Option(None, "--device", help="auto (default), cpu, cuda or cuda:N."),
    output: Path | None = typer.Option(None, "-o", "--output", help="Artifact directory (default "
                                                                    "runs/consistency-HASH)."),
    recipe: Path | None = typer.Option(None, "--recipe", help="Recipe YAML with a 'consistency' section."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key: consistency.key=value, e.g. "
                                                     "consistency.discretisation=50 (repeatable)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the plan; do no work."),
    force: bool = typer.Option(False, "--force", help="Replace an output directory that holds another recipe."),
) -> None:
    """Train a consistency student from SOURCE's teacher (a couple artifact, or a teacher with --data); prints the
    artifact path (its teacher.safetensors loads as a teacher and records its sampler). Killed or interrupted, the
    same command resumes exactly."""
    from ..errors import AccelkitError
    from ..recipes import resolve_stage

    g_range = None
    if guidance_range is not None:
        try:
            lo, hi = (float(v) for v in guidance_range.split(","))
        except ValueError:
            raise AccelkitError(f"--guidance-range {guidance_range!r}: expected two numbers A,B (e.g. 1,4)") from None
        g_range = [lo, hi]
    path_arg = source if source not in (None, "-") else None
    if path_arg is None and not (recipe is not None and source is None):
        path_arg = input_path(source, "SOURCE")
    conditions = prompt_conditions_option(path_arg, prompt, prompts_file, negative_prompt, conditions)
    flags = {"source": path_arg, "method": method, "data": data, "guidance": guidance, "guidance_range": g_range,
             "phases": phases,
             "batch_size": batch_size, "seed": seed, "loss": loss, "device": device}
    flags["conditions"] = conditions
    loop_sets = [f"consistency.loop.{k}={v!r}" for k, v in (("steps", steps), ("lr", lr)) if v is not None]
    spec = resolve_stage("consistency", recipe, flags, [*loop_sets, *set_])
    run_stage("consistency", spec, output, force, dry_run)
