"""``accelkit export``: a teacher, rescaled teacher or student with its sampler, for plain diffusers or one file."""

from __future__ import annotations

import typer

from .main import app


@app.command("export")
def export_command(
    path: str = typer.Argument(None, help="Teacher checkpoint or artifact (runs/rescale-*, runs/reflow-*, ...); "
                               "'-' or missing: read it from stdin."),
    output: str = typer.Option(..., "-o", "--output", help="Output: a folder (diffusers), or a .safetensors file "
                               "(or a folder to put NAME.safetensors in)."),
    fmt: str = typer.Option(None, "--format", help="diffusers (a folder diffusers loads with from_pretrained) or "
                            "safetensors (one file with modelspec.* and accelkit.* metadata); default: safetensors "
                            "when -o ends in .safetensors or the network is accelkit's own (MLP, SmallUNet), else "
                            "diffusers. A LoRA student (loop.lora) also exports as a LoRA file: lora (diffusers / "
                            "peft keys, for pipe.load_lora_weights) or kohya (sd-scripts' lora_unet_* keys)."),
    solver: str = typer.Option(None, "--solver", help="Solver to export: a name or a bespoke artifact "
                               "(runs/bespoke-..., at its own NFE; another teacher's needs --force) (default: the "
                               "artifact's recorded one, else euler for the linear schedule, dpm++2m otherwise)."),
    nfe: int = typer.Option(None, "--nfe", help="Network evaluations per sample (default: recorded, else 2 for "
                            "students, 8 for teachers)."),
    grid: str = typer.Option(None, "--grid", help="Time grid: uniform, logsnr, edm, shift, or comma-separated times "
                             "from 1 to 0 (default: recorded, else the stock diffusers scheduler's own)."),
    shift: float = typer.Option(None, "--shift", help="Shift of the 'shift' grid (default: the recorded shift, "
                                "else 3)."),
    dtype: str = typer.Option(None, "--dtype", help="Weights' dtype in the export: fp32, fp16, bf16 (default: as "
                              "stored)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
    config: str = typer.Option(None, "--config", help="config.json (or its folder) of a single-file diffusers "
                               "state dict."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow a pickled checkpoint (read with "
                                      "torch.load(weights_only=True))."),
    prediction_type: str = typer.Option(None, "--prediction-type", help="What the network predicts, where the "
                                        "checkpoint does not say."),
    schedule: str = typer.Option(None, "--schedule", help="Noise schedule, where the checkpoint does not say."),
) -> None:
    """Export PATH with the sampler it is meant to run with; prints the written path.

    --format diffusers: a pipeline folder (model subfolder, scheduler/, model_index.json). The scheduler is a stock
    diffusers one where it computes exactly accelkit's solver on the grid, else accelkit.export.AccelkitScheduler
    (import accelkit.export.scheduler before DiffusionPipeline.from_pretrained). --format safetensors: one file in the
    network's own key layout that accelkit loads back and `accelkit inspect` describes.
    """
    from ..errors import AccelkitError
    from .common import emit, input_path
    from .sample_cmd import _parse_grid

    if fmt is not None and fmt not in ("diffusers", "safetensors", "lora", "kohya"):
        raise AccelkitError(f"--format {fmt!r}: expected diffusers, safetensors, lora or kohya")
    if nfe is not None and nfe < 1:
        raise AccelkitError(f"--nfe {nfe}: expected at least 1 network evaluation")
    time_grid = _parse_grid(grid) if grid is not None else None
    path = input_path(path, "teacher checkpoint or artifact")

    from ..console import log
    from ..export.exporter import export

    load = {k: v for k, v in {"config": config, "prediction_type": prediction_type, "schedule": schedule,
                              "dtype": dtype}.items() if v is not None}
    written, sampling = export(path, output, fmt, solver=solver, nfe=nfe, grid=time_grid, shift=shift, force=force,
                               allow_pickle=allow_pickle, **load)
    log(f"export: {sampling.solver} at {sampling.nfe} NFE on the {sampling.grid_name} grid ({sampling.origin})")
    emit(str(written))
