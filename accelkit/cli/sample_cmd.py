"""``accelkit sample PATH``: samples of a teacher's ODE with a chosen solver and NFE, as PNG or safetensors."""

from __future__ import annotations

import typer

from .main import app

OUTPUT_SUFFIXES = (".png", ".safetensors")


def _parse_grid(grid: str) -> str | list[float]:
    """A grid name, or a comma-separated list of times."""
    from ..errors import AccelkitError

    if "," not in grid and not grid.strip().replace(".", "", 1).isdigit():
        return grid.strip()
    try:
        return [float(v) for v in grid.split(",") if v.strip()]
    except ValueError as e:
        raise AccelkitError(f"--grid {grid!r}: expected a grid name or a comma-separated list of times") from e


def _parse_labels(text: str) -> list[int]:
    from ..errors import AccelkitError

    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise AccelkitError(f"--label {text!r}: expected an integer class label or a comma-separated list") from e


@app.command("sample")
def sample_command(
    path: str = typer.Argument(None, help="Teacher checkpoint (see accelkit inspect); '-' or missing: from stdin."),
    output: str = typer.Option(..., "-o", "--output", help="Output file: .png (image grid, or scatter of 2-D "
                               "points) or .safetensors (the raw samples)."),
    solver: str = typer.Option(None, "--solver", help="ODE solver: euler, heun, midpoint, dpm++2m, dpm++3m, "
                               "ddim, unipc, unipc2, ipndm, ipndm-v, a bespoke artifact (a learned solver) or a "
                               "solver-stats artifact (DPM-Solver-v3) "
                               "(default: the sampler the model records, as reflow / distill students and exports "
                               "do, else euler)."),
    nfe: int = typer.Option(None, "--nfe", help="Network evaluations per sample (default: the recorded sampler's, "
                            "a learned solver's own, else 8)."),
    n: int = typer.Option(16, "-n", "--num-samples", help="Number of samples."),
    seed: int = typer.Option(0, "--seed", help="Sample i starts from the noise of (seed, i)."),
    guidance: float = typer.Option(None, "--guidance", help="Classifier-free guidance scale (1 = no guidance; "
                                   "default: the teacher's own, 1 unless saved otherwise)."),
    grid: str = typer.Option(None, "--grid", help="Time grid: uniform, logsnr, edm, shift, comma-separated times "
                             "from 1 to 0, or recommended (the grid a phased reflow student records) (default: the "
                             "solver's choice for the schedule)."),
    shift: float = typer.Option(None, "--shift", help="Shift of the 'shift' grid (default: the scheduler's "
                                "recorded shift, else 3)."),
    batch_size: int = typer.Option(None, "--batch-size", help="Samples per batch (results do not depend on it; "
                                   "default: 64 on the CPU, on CUDA the batch that fills about 80 % of the free "
                                   "memory, estimated from one network call)."),
    label: str = typer.Option(None, "--label", help="Class label(s) for class-conditional models, comma-separated, "
                              "cycled over the samples (default: 0, 1, 2, ...)."),
    cond: str = typer.Option(None, "--cond", help="Conditioning tensors (.safetensors: encoder_hidden_states, "
                             "encoder_attention_mask, pooled_projections, class_labels); sample i takes row i mod R."),
    code: int = typer.Option(None, "--code", help="QAC models (accelkit qac): this code index for every sample "
                             "(default: sample i's code drawn from the model's code weights with (seed, i))."),
    prompt: list[str] = typer.Option(None, "--prompt", help="Text prompt (repeatable; sample i takes prompt i mod "
                                     "P), encoded with the pipeline's own tokenizer and text encoder (cached)."),
    prompts_file: str = typer.Option(None, "--prompts", help="Text file of prompts, one a line (after any --prompt)."),
    negative_prompt: str = typer.Option(None, "--negative-prompt", help="The prompt guidance steers away from "
                                        "(default with --prompt: the empty prompt, or SDXL's zeros, as diffusers)."),
    null_class: int = typer.Option(None, "--null-class", help="The class label a class-conditional model was trained "
                                   "with as its null (dropped-label) class: guidance's null condition."),
    null_cond: str = typer.Option(None, "--null-cond", help="Null condition for guidance (.safetensors, batch 1); "
                                  "default: the null class, or zero text embeddings."),
    config: str = typer.Option(None, "--config", help="config.json (or its folder) of a single-file diffusers "
                               "state dict."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickled checkpoints (read with "
                                      "torch.load(weights_only=True))."),
    prediction_type: str = typer.Option(None, "--prediction-type", help="What the network predicts, where the "
                                        "checkpoint does not say."),
    schedule: str = typer.Option(None, "--schedule", help="Noise schedule, where the checkpoint does not say."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
    dtype: str = typer.Option("auto", "--dtype", help="Network dtype: fp32, fp16, bf16, or auto: float32 on the "
                              "CPU (as diffusers loads half-precision weights), the stored dtype on CUDA."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output file; use a learned --solver "
                               "trained for another teacher."),
    parallel: str = typer.Option(None, "--parallel", help="Parallel sampling over --solver (euler or ddim) on its "
                                 "grid: picard (ParaDiGMS sliding window) or parareal (SRDS); the same samples in "
                                 "fewer sequential rounds, more NFE (reported on stderr)."),
    window: int = typer.Option(None, "--window", help="picard: steps per window, one batched evaluation (default "
                               "16)."),
    tol: float = typer.Option(None, "--tol", help="picard: per-step tolerance relative to the noise level "
                              "(default 0.1); parareal: RMS change of the block ends (default 5e-3); 0: exact."),
    blocks: int = typer.Option(None, "--blocks", help="parareal: blocks of the grid (default about sqrt(steps))."),
    compile_network: bool = typer.Option(False, "--compile", help="Compile the network with torch.compile (CPU or "
                                         "CUDA): faster steps after a one-time compilation of each batch shape."),
    cuda_graphs: bool = typer.Option(False, "--cuda-graphs", help="CUDA only: capture each network call in a CUDA "
                                     "graph once and replay it at every step (fixed-grid solvers; the same "
                                     "samples)."),
) -> None:
    """Draw samples from the teacher's ODE and write them to -o (atomically; nothing is written on error)."""
    import math
    from pathlib import Path

    from ..errors import AccelkitError
    from .common import emit, input_path

    out = Path(output)
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise AccelkitError(f"-o {output}: unknown output type; expected a name ending in "
                            f"{' or '.join(OUTPUT_SUFFIXES)}")
    if out.exists() and not force:
        raise AccelkitError(f"-o {output}: file exists; pass --force to overwrite it")
    if n < 1:
        raise AccelkitError(f"-n {n}: expected at least 1 sample")
    if nfe is not None and nfe < 1:
        raise AccelkitError(f"--nfe {nfe}: expected at least 1 network evaluation")
    if batch_size is not None and batch_size < 1:
        raise AccelkitError(f"--batch-size {batch_size}: expected at least 1")
    if guidance is not None and not math.isfinite(guidance):
        raise AccelkitError(f"--guidance {guidance}: expected a finite number")
    if cuda_graphs and not device.startswith("cuda"):
        raise AccelkitError(f"--cuda-graphs: needs --device cuda (got --device {device}); leave it off on the CPU")
    time_grid = _parse_grid(grid) if grid is not None else None
    labels = _parse_labels(label) if label is not None else None
    path = input_path(path, "teacher checkpoint")

    import torch

    from ..console import err, log
    from ..models.loading import load_teacher
    from ..sampling import condition_from_options, read_condition, recorded_sampler
    from ..solvers import GRID_NAMES, get_solver, is_solver, solver_grid, solver_names

    recorded = recorded_sampler(path) if solver is None or nfe is None or time_grid is None else None
    if recorded and recorded["solver"] in solver_names() and solver in (None, recorded["solver"]):
        solver = recorded["solver"]
        nfe = recorded["nfe"] if nfe is None else nfe
        if time_grid is None and shift is None and nfe == recorded["nfe"] and recorded["grid"] is not None:
            time_grid = recorded["grid"]
        log(f"sample: {path} records its sampler; using {solver} at {nfe} NFE"
            f"{' on its grid' if time_grid is recorded['grid'] and time_grid is not None else ''}")
    solver = "euler" if solver is None else solver
    if parallel is not None or window is not None or tol is not None or blocks is not None:
        from ..solvers.parallel import wrap

        solver = wrap(parallel, solver, window=window, tol=tol, blocks=blocks)
    if not is_solver(solver):
        raise AccelkitError(f"--solver {solver!r}: unknown solver; expected one of {', '.join(solver_names())} or "
                            "a bespoke artifact")
    from ..solvers.parallel import is_parallel_spec

    learned = solver not in solver_names() and not is_parallel_spec(solver)
    if learned:
        if (grid is not None or shift is not None) and getattr(get_solver(solver), "own_times", True):
            raise AccelkitError(f"--grid / --shift: the learned solver {solver} steps on its own learned times")
        nfe = getattr(get_solver(solver), "nfe", 8) if nfe is None else nfe
    nfe = 8 if nfe is None else nfe
    if time_grid == "recommended":
        from ..evaluation import recommended_grid

        time_grid = recommended_grid(path)
        if time_grid is None:
            raise AccelkitError(f"--grid recommended: {path} records no recommended grid (a phased `accelkit reflow` "
                                "student does); give a grid name or times")
    if isinstance(time_grid, str) and time_grid not in GRID_NAMES:
        raise AccelkitError(f"--grid {time_grid!r}: unknown grid; expected one of {', '.join(GRID_NAMES)}, "
                            "recommended or comma-separated times")
    if learned:
        from ..solvers.learned import check_solver_teacher

        check_solver_teacher(solver, path, force)
    teacher = load_teacher(path, config=config, allow_pickle=allow_pickle, device=device, dtype=dtype,
                           prediction_type=prediction_type, schedule=schedule)
    from .common import prompt_texts

    texts = prompt_texts(prompt, prompts_file)
    if texts:
        from ..prompts import check_text_model, prompt_conditions
        from ..sampling import cycled_condition

        if cond is not None:
            raise AccelkitError("give the text condition either with --prompt / --prompts or with --cond, not both")
        check_text_model(teacher, path)
        text_cond, text_null = prompt_conditions(path, texts, negative_prompt, teacher)
        condition = cycled_condition(text_cond)
        teacher.null_condition = text_null
    elif negative_prompt is not None:
        raise AccelkitError("--negative-prompt: needs --prompt or --prompts")
    else:
        condition = condition_from_options(teacher, path, labels, cond)
    from ..qac import code_condition

    condition = code_condition(teacher, seed, code)(condition)  # a QAC model's code of sample i
    if null_cond is not None:
        teacher.null_condition = read_condition(null_cond, batch_one=True)
    if null_class is not None:
        if null_cond is not None:
            raise AccelkitError("give the null condition either with --null-class or with --null-cond, not both")
        teacher.null_condition = _null_class_condition(teacher, path, null_class)
    guidance = teacher.guidance_scale if guidance is None else guidance
    if guidance != 1.0:
        _check_guidance(teacher, path, guidance, condition is not None)
    teacher.guidance_scale = guidance
    grid_kw = {}
    if shift is not None and time_grid != "shift":
        raise AccelkitError(f"--shift {shift}: only used with --grid shift")
    if time_grid == "shift":
        grid_kw["shift"] = shift if shift is not None else float(teacher.info.get("shift", 3.0))
    solver_grid(teacher, solver, nfe, time_grid, **grid_kw)  # checks NFE and grid before any work
    writer = _writer(out, teacher, path, allow_pickle, device)  # refuses an unsupported sample shape before any work
    if batch_size is None and device.startswith("cuda"):
        from ..acceleration import batch_to_fill_memory

        batch_size = batch_to_fill_memory(teacher, condition, n, device)
        log(f"sample: batch size {batch_size} (about 80 % of the free CUDA memory; --batch-size to choose)")
    batch_size = 64 if batch_size is None else batch_size
    from ..teacher import Condition

    if isinstance(getattr(teacher, "null_condition", None), Condition):  # on the device once, not at every step
        teacher.null_condition = teacher.null_condition.map(lambda v: v.to(device))
    if compile_network or cuda_graphs:
        from ..acceleration import accelerate

        accelerate(teacher, compile=compile_network, cuda_graphs=cuda_graphs, solver=solver, what=path)

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from ..sampling import draw_samples

    columns = (TextColumn("sampling"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.fields[rate]}"), TimeRemainingColumn())
    with Progress(*columns, console=err, redirect_stdout=False, redirect_stderr=False) as progress:
        task = progress.add_task("sampling", total=n, rate="")

        def on_batch(k: int) -> None:
            progress.advance(task, k)
            elapsed = progress.tasks[0].elapsed or 0.0
            done = progress.tasks[0].completed
            progress.update(task, rate=f"{done / elapsed:.1f} samples/s" if elapsed > 0 else "")

        from ..solvers.parallel import parallel_reports

        with torch.inference_mode(), parallel_reports() as reports:
            samples = draw_samples(teacher, n, seed=seed, solver=solver, nfe=nfe, grid=time_grid, grid_kw=grid_kw,
                                   batch_size=batch_size, condition=condition, device=device, on_batch=on_batch)
    for k, report in enumerate(reports):
        log(f"batch {k + 1}: {report.line()}")
    if not bool(torch.isfinite(samples).all()):
        raise AccelkitError(f"{path}: sampling produced NaN or inf (solver {solver}, NFE {nfe}); "
                            "nothing was written")
    out.parent.mkdir(parents=True, exist_ok=True)
    writer(samples, {"teacher": path, "solver": solver, "nfe": nfe, "n": n, "seed": seed, "guidance": guidance,
                     "grid": time_grid, **grid_kw, "batch_size": batch_size, "labels": labels, "cond": cond,
                     "null_cond": null_cond, "code": code, "prompts": texts or None, "null_class": null_class,
                     "negative_prompt": negative_prompt})
    emit(str(out))


def _null_class_condition(teacher, path: str, label: int):
    """Condition(class_labels=[label]) after checking that the model takes class labels and has that class: the
    labels 0 .. N-1 of a diffusers class embedding, or also the extra null row N of accelkit's and DiT's tables."""
    import torch

    from ..errors import AccelkitError
    from ..teacher import Condition

    info = getattr(teacher, "info", {}).get("conditioning", {}) or {}
    n = info.get("num_classes")
    if info.get("kind") != "class" and n is None:
        raise AccelkitError(f"{path}: the model takes no class labels; --null-class is for class-conditional models")
    rows = None if n is None else int(n) + (1 if info.get("null_class") == n else 0)
    if label < 0 or (rows is not None and label >= rows):
        raise AccelkitError(f"--null-class {label}: expected a class label in 0..{(rows or 1) - 1} of {path}")
    return Condition(class_labels=torch.tensor([label]))


def _check_guidance(teacher, path: str, guidance: float, conditioned: bool) -> None:
    from ..errors import AccelkitError

    kind = teacher.info.get("conditioning", {}).get("kind", "none") if hasattr(teacher, "info") else "none"
    if kind == "none":
        raise AccelkitError(f"{path}: the model is unconditional; --guidance {guidance} needs a conditional model "
                            "(use --guidance 1)")
    if not conditioned:
        raise AccelkitError(f"--guidance {guidance}: needs a condition; pass --cond FILE (text embeddings)")
    if getattr(teacher, "null_condition", None) is None:
        raise AccelkitError(f"{path}: the model has no null condition to guide against; pass --null-class N (the "
                            "null class it was trained with) or --null-cond FILE")


def _writer(out, teacher, path: str, allow_pickle: bool = False, device: str = "cpu"):
    """A function writing the samples to ``out`` in the format its suffix names (checked now, before sampling)."""
    import json

    from ..artifacts import atomic_write_bytes
    from ..errors import AccelkitError

    shape = tuple(teacher.sample_shape)
    suffix = out.suffix.lower()
    if suffix == ".safetensors":

        def write_tensors(samples, settings):
            from ..artifacts import safetensors_bytes

            meta = {"format": "accelkit.samples/1", "settings": json.dumps(settings, default=str)}
            atomic_write_bytes(out, safetensors_bytes({"samples": samples}, meta))

        return write_tensors
    if shape == (2,):

        def write_scatter(samples, settings):
            from ..plots import plot_scatter_panels

            title = f"{settings['solver']}, NFE {settings['nfe']}, n = {settings['n']}"
            plot_scatter_panels({title: samples.numpy()}, out)

        return write_scatter
    if len(shape) == 3 and shape[0] in (1, 3):

        def write_grid(samples, settings):
            from ..images import image_grid, png_bytes

            atomic_write_bytes(out, png_bytes(image_grid(samples)))

        return write_grid
    vae_dir = getattr(teacher, "info", {}).get("vae")
    if len(shape) == 3 and vae_dir:
        from ..models.diffusers_models import decode_latents, load_vae

        vae = load_vae(vae_dir, allow_pickle=allow_pickle, config=getattr(teacher, "info", {}).get("vae_config"))
        vae.to(device)

        def write_decoded(samples, settings):
            from ..images import image_grid, png_bytes

            atomic_write_bytes(out, png_bytes(image_grid(decode_latents(vae, samples))))

        return write_decoded
    raise AccelkitError(f"-o {out}: a PNG needs 1- or 3-channel images or 2-D points, but {path} makes samples of "
                        f"shape {list(shape)} and has no VAE to decode them; write .safetensors instead")
