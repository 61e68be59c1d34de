"""``accelkit restore``: inpainting, super-resolution, deblurring and denoising with a teacher as the prior
(PiGDM, DPS, DDRM; training-free), and ``--degrade`` to make measurements from clean images."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import emit, input_path
from .main import app

FILE_SUFFIXES = (".png", ".safetensors")


@app.command("restore")
def restore(
    teacher: str | None = typer.Argument(None, help="Teacher checkpoint (the prior); missing or '-': read a path "
                                                    "from stdin. Not given with --degrade."),
    input: str | None = typer.Option(None, "--input", "-i", help="The measurement y: .png, .safetensors (as "
                                     "--degrade writes it: y, mask, clean, settings) or a degrade artifact."),
    degrade: str | None = typer.Option(None, "--degrade", help="Instead of restoring: write the measurement y = H x "
                                       "+ n (and the mask) of these clean images (.png / .safetensors, or digits, "
                                       "fashion-mnist)."),
    task: str | None = typer.Option(None, "--task", help="inpaint, super-resolution, deblur or denoise (default: "
                                                        "the measurement's)."),
    mask: str | None = typer.Option(None, "--mask", help="inpaint: mask file (.png white = observed, .safetensors "
                                    "1 = observed) or the hidden part: bottom-half, top-half, left-half, right-half, "
                                    "center, random:P."),
    factor: int | None = typer.Option(None, "--factor", help="super-resolution: average-pooling factor (2, 4, ...)."),
    blur: str | None = typer.Option(None, "--blur", help="deblur: gaussian:S (a circular Gaussian of S pixels)."),
    noise_std: float | None = typer.Option(None, "--noise-std", help="Measurement noise std (images in [-1, 1]; "
                                           "default: the measurement's, 0 for --degrade)."),
    method: str | None = typer.Option(None, "--method", help="pigdm (default), dps or ddrm."),
    nfe: int | None = typer.Option(None, "--nfe", help="Network evaluations per sample (default 20; pigdm / dps "
                                   "take one vector-Jacobian product with each)."),
    n: int | None = typer.Option(None, "-n", "--num-samples", help="Posterior samples per measurement (default 1)."),
    mean: bool = typer.Option(False, "--mean", help="Write the mean of the -n samples (posterior-mean estimate)."),
    reference: str | None = typer.Option(None, "--reference", help="Clean images for PSNR / SSIM (default: the "
                                         "measurement file's own)."),
    start: float | None = typer.Option(None, "--start", help="Start noise level as a linear-schedule time in (0, 1] "
                                       "(default: pigdm 0.8, dps / ddrm 1)."),
    solver: str | None = typer.Option(None, "--solver", help="pigdm: ODE solver of the guided teacher (default "
                                      "ddim)."),
    label: str | None = typer.Option(None, "--label", help="Class label(s) of a class-conditional teacher, "
                                     "comma-separated, cycled over the measurements."),
    cond: str | None = typer.Option(None, "--cond", help="Conditioning tensors (.safetensors: encoder_hidden_states, "
                                    "...); measurement i takes row i mod R."),
    count: int | None = typer.Option(None, "--count", help="--degrade: use the first COUNT clean images."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of the noise (sample k from (seed, k))."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Samples per batch (results do not depend on "
                                          "it)."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1, ..."),
    config: str | None = typer.Option(None, "--config", help="config.json of a single-file diffusers state dict."),
    prediction_type: str | None = typer.Option(None, "--prediction-type", help="What the network predicts, where "
                                               "the checkpoint does not say."),
    schedule: str | None = typer.Option(None, "--schedule", help="Noise schedule, where the checkpoint does not say."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow a pickled checkpoint (weights_only)."),
    output: Path | None = typer.Option(None, "-o", "--output", help="OUT.png or OUT.safetensors: write that file; "
                                       "a directory: the artifact (default runs/restore-HASH or runs/degrade-HASH)."),
    json_out: bool = typer.Option(False, "--json", help="Print the output path and the summary (metrics) as JSON."),
    recipe: Path | None = typer.Option(None, "--recipe", help="Recipe YAML with a 'restore' or 'degrade' section."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key: restore.key=value (repeatable)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the plan; do no work."),
    force: bool = typer.Option(False, "--force", help="Overwrite an output file / replace an artifact of another "
                                                      "recipe."),
) -> None:
    """Restore images from a linear measurement y = H x + n with TEACHER as the prior (training-free posterior
    sampling), or with --degrade make y from clean images. Prints the output path (--json: with PSNR / SSIM)."""
    import json

    from ..errors import AccelkitError
    from ..recipes import resolve_stage

    operator = {"task": task, "mask": mask, "factor": factor, "blur": blur, "noise_std": noise_std, "seed": seed}
    if degrade is not None:
        if teacher is not None:
            raise AccelkitError(f"--degrade makes a measurement from clean images and takes no teacher; got {teacher}")
        used = [name for name, v in (("--input", input), ("--method", method), ("--nfe", nfe), ("-n", n),
                                     ("--label", label), ("--cond", cond),
                                     ("--reference", reference), ("--start", start), ("--solver", solver))
                if v is not None] + (["--mean"] if mean else [])
        if used:
            raise AccelkitError(f"{used[0]} is for restoring; --degrade only writes the measurement")
        stage, flags = "degrade", {"clean": degrade, "count": count, **operator}
    else:
        if count is not None:
            raise AccelkitError("--count is for --degrade")
        teacher_path = teacher if teacher not in (None, "-") else None
        if teacher_path is None and recipe is None:
            teacher_path = input_path(teacher, "teacher checkpoint")
        stage = "restore"
        labels = None
        if label is not None:
            try:
                labels = [int(v) for v in label.split(",") if v.strip()]
            except ValueError:
                raise AccelkitError(f"--label {label!r}: expected integer class labels, comma-separated") from None
        flags = {"teacher": teacher_path, "input": input, "reference": reference, "method": method, "nfe": nfe,
                 "n": n, "mean": mean or None, "start": start, "solver": solver, "batch_size": batch_size,
                 "device": device, "config": config, "prediction_type": prediction_type, "schedule": schedule,
                 "allow_pickle": allow_pickle or None, "labels": labels, "cond": cond, **operator}
    spec = resolve_stage(stage, recipe, flags, set_)
    from ..pipeline import check_inputs

    check_inputs(spec, stage)
    from ..stages import restore as restore_stage

    to_file = output is not None and output.suffix.lower() in FILE_SUFFIXES
    if dry_run:
        if to_file:
            if stage == "restore":
                restore_stage.prepare_restore(spec)
            else:
                restore_stage.degrade(spec)
            from ..console import log

            log(f"{stage}: inputs check out; would write {output}")
            return
        from ..pipeline import plan_stage, print_plan

        print_plan([(stage, plan_stage(stage, spec, output))])
        return
    if to_file:
        if stage == "degrade":
            path, summary = restore_stage.degrade_to_file(spec, output, force), {}
        else:
            path, summary = restore_stage.restore_to_file(spec, output, force)
    else:
        run = restore_stage.run_degrade if stage == "degrade" else restore_stage.run_restore
        path = run(spec, output, force)
        summary = json.loads((path / "manifest.json").read_text()).get("summary", {})
    emit(json.dumps({"output": str(path), "summary": summary}) if json_out else str(path))
