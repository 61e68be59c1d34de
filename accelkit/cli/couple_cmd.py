"""``accelkit couple``: (noise, sample) pairs from a teacher's ODE into a sharded artifact."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import emit, input_path
from .main import app


def _parse_grid(grid: str | None) -> str | list[float] | None:
    if grid is None or "," not in grid:
        return grid
    try:
        return [float(t) for t in grid.split(",")]
    except ValueError:
        from ..errors import AccelkitError

        raise AccelkitError(f"--grid {grid!r}: expected a grid name or comma-separated times like 1,0.5,0") from None


@app.command("couple")
def couple(
    teacher: str | None = typer.Argument(None, help="Teacher checkpoint; missing or '-': read a path from stdin."),
    n: int | None = typer.Option(None, "-n", "--n", help="Number of (noise, sample) pairs."),
    solver: str | None = typer.Option(None, help="ODE solver (default euler)."),
    nfe: int | None = typer.Option(None, help="Network evaluations per sample (default 32)."),
    grid: str | None = typer.Option(None, help="Time grid name, or comma-separated decreasing times."),
    guidance: float | None = typer.Option(None, help="Classifier-free guidance scale (needs --conditions)."),
    conditions: str | None = typer.Option(None, help="Conditions file (.safetensors or .json): row i mod M."),
    prompt: list[str] = typer.Option(None, "--prompt", help="Text prompt (repeatable; sample i takes prompt i mod P), "
                                     "encoded with the pipeline's tokenizer and text encoder into a cached "
                                     "conditions file."),
    prompts_file: str | None = typer.Option(None, "--prompts", help="Text file of prompts, one a line."),
    negative_prompt: str | None = typer.Option(None, "--negative-prompt", help="Guidance's null (default with "
                                               "--prompt: the empty prompt, or SDXL's zeros)."),
    save_trajectory: int | None = typer.Option(None, "--save-trajectory", help="Also store K intermediate states."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Samples per step (does not change results)."),
    micro_batch: int | None = typer.Option(None, "--micro-batch", help="Samples per teacher call (default 64)."),
    shard_size: int | None = typer.Option(None, "--shard-size", help="Samples per shard file (default 4096)."),
    seed: int | None = typer.Option(None, help="Noise seed (sample i's noise depends on seed and i only)."),
    dtype: str | None = typer.Option(None, help="fp32 (default), fp64, bf16 or fp16."),
    device: str | None = typer.Option(None, help="cpu (default), cuda, cuda:N."),
    checkpoint_every: float | None = typer.Option(None, "--checkpoint-every", help="Seconds between checkpoints."),
    repair: bool = typer.Option(False, "--repair", help="Regenerate only the shards whose hash is wrong."),
    force: bool = typer.Option(False, "--force", help="Replace an output directory that holds another recipe."),
    output: Path | None = typer.Option(None, "-o", "--output", help="Artifact directory (default runs/couple-HASH)."),
    recipe: Path | None = typer.Option(None, "--recipe", help="Recipe YAML with a 'couple' section."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key: couple.key=value (repeatable)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the plan; do no work."),
    parallel: str | None = typer.Option(None, "--parallel", help="Parallel sampling over --solver (euler, the "
                                        "default here, or ddim): picard or parareal; the same pairs in fewer "
                                        "sequential rounds."),
    window: int | None = typer.Option(None, "--window", help="picard: steps per window (default 16)."),
    tol: float | None = typer.Option(None, "--tol", help="picard / parareal tolerance (0: exact)."),
    blocks: int | None = typer.Option(None, "--blocks", help="parareal: blocks of the grid (default ~sqrt(steps))."),
    compile_network: bool | None = typer.Option(None, "--compile", help="Compile the teacher's network with "
                                                "torch.compile (CPU or CUDA): faster steps after a one-time "
                                                "compilation."),
    cuda_graphs: bool | None = typer.Option(None, "--cuda-graphs", help="CUDA only: capture each network call in a "
                                            "CUDA graph once and replay it at every step (fixed-grid solvers; the "
                                            "same pairs)."),
) -> None:
    """Generate (noise, sample) couplings from TEACHER's probability-flow ODE; prints the artifact path."""
    from ..recipes import resolve_stage

    teacher_path = teacher if teacher not in (None, "-") else None
    if teacher_path is None and not (recipe is not None and teacher is None):
        teacher_path = input_path(teacher, "teacher")
    if parallel is not None or window is not None or tol is not None or blocks is not None:
        from ..solvers.parallel import wrap

        solver = wrap(parallel, solver or "euler", window=window, tol=tol, blocks=blocks)

    from .common import prompt_conditions_option

    conditions = prompt_conditions_option(teacher_path, prompt, prompts_file, negative_prompt, conditions)
    if solver is None and nfe is None and grid is None and recipe is None and teacher_path is not None:
        from ..sampling import recorded_sampler

        # A shortcut / MeanFlow student is coupled with its own jumps; other students keep the accurate default
        # solve (k-rectified flow couples a reflow student's ODE, not its 1-step sampler).
        recorded = recorded_sampler(teacher_path)
        if recorded is not None and recorded["solver"] in ("shortcut", "meanflow"):
            from ..console import log
            from ..solvers import solver_names

            if recorded["solver"] in solver_names():
                solver, nfe = recorded["solver"], recorded["nfe"]
                grid = ",".join(repr(t) for t in recorded["grid"]) if isinstance(recorded["grid"], list) else None
                log(f"couple: {teacher_path} records its sampler; using {solver} at {nfe} NFE")
    flags = {"teacher": teacher_path, "n": n, "solver": solver, "nfe": nfe, "guidance": guidance,
             "conditions": conditions, "save_trajectory": save_trajectory, "batch_size": batch_size,
             "micro_batch": micro_batch, "shard_size": shard_size, "seed": seed, "dtype": dtype, "device": device,
             "checkpoint_every": checkpoint_every, "grid": _parse_grid(grid), "compile": compile_network,
             "cuda_graphs": cuda_graphs}
    spec = resolve_stage("couple", recipe, flags, set_)
    from ..pipeline import check_inputs, plan_stage, print_plan

    check_inputs(spec, "couple")
    if dry_run:
        print_plan([("couple", plan_stage("couple", spec, output))])
        return
    from ..stages.couple import run_couple

    path = run_couple(spec, output, force=force, repair=repair)
    from ..jobs import dist_env

    if dist_env()[0] == 0:
        emit(str(path))
