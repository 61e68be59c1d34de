"""restore and degrade: training-free linear inverse problems with a teacher as the prior (:mod:`accelkit.inverse`).

* ``degrade``: clean images (a file, or ``digits`` / ``fashion-mnist``) -> y = H x + n with the task's operator
  (:mod:`accelkit.operators`), noise n from (seed, i) for image i; writes ``measurement.safetensors`` (``y``,
  ``mask``, ``clean`` and the operator's settings in its header), so users can measure a restoration.
* ``restore``: a teacher and y -> ``n`` posterior samples per measurement by PiGDM, DPS or DDRM, or their mean;
  writes ``restored.safetensors`` (``restored``, and ``baseline``: the pseudo-inverse regularised by the noise
  level) and ``restored.png``; with a clean reference (``--reference``, or the ``clean`` of a measurement file) the
  summary holds PSNR and SSIM of the restoration, of its posterior samples, and of the baseline.

Both run as artifacts (``accelkit run`` recipes, ``-o DIR``) or straight to one file (``-o OUT.png|.safetensors``,
:func:`restore_to_file`, :func:`degrade_to_file`). Every input is checked before anything is written.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator
from torch import Tensor

from ..artifacts import Artifact, atomic_write_bytes
from ..console import log
from ..data import IMAGE_SETS
from ..errors import AccelkitError
from ..recipes import StageRecipe, register_stage

MEASUREMENT_FILE = "measurement.safetensors"
RESTORED_FILE = "restored.safetensors"
TASKS = ("inpaint", "super-resolution", "deblur", "denoise")


def parse_blur(spec: str | None) -> float | None:
    """``gaussian:S`` -> S (pixels)."""
    if spec is None:
        return None
    kind, _, value = spec.partition(":")
    try:
        std = float(value)
    except ValueError:
        std = -1.0
    if kind != "gaussian" or not std > 0 or not math.isfinite(std):
        raise AccelkitError(f"--blur {spec!r}: expected gaussian:S with a positive standard deviation S in pixels")
    return std


class OperatorFields(StageRecipe):
    """The measurement y = H x + n: the task's operator and the noise level."""

    task: str | None = Field(None, description=f"one of {', '.join(TASKS)}")
    mask: str | None = Field(None, description="inpaint: a .png / .safetensors mask (1 = observed) or a named mask "
                                               "(bottom-half, top-half, left-half, right-half, center, random:P)")
    factor: int | None = Field(None, description="super-resolution: the average-pooling factor")
    blur: str | None = Field(None, description="deblur: gaussian:S, a Gaussian of S pixels (circular)")
    noise_std: float | None = Field(None, description="standard deviation of the measurement noise (data in [-1, 1])")

    @field_validator("task")
    @classmethod
    def _task(cls, v: str | None) -> str | None:
        if v is not None and v not in TASKS:
            raise ValueError(f"expected one of {', '.join(TASKS)}")
        return v

    @field_validator("noise_std")
    @classmethod
    def _noise(cls, v: float | None) -> float | None:
        if v is not None and not (v >= 0 and math.isfinite(v)):
            raise ValueError("expected a non-negative noise level")
        return v

    def _file_inputs(self, names: tuple[str, ...]) -> dict[str, str]:
        out = {}
        for name in names:
            v = getattr(self, name)
            if v is not None and (name != "mask" or v.lower().endswith((".png", ".safetensors"))):
                out[name] = str(v)
        return out


def build_operator(task: str, image_shape: tuple[int, ...], count: int, mask: Tensor | str | None, factor: int | None,
                   blur: str | None, seed: int):
    from ..measurements import read_mask
    from ..operators import make_operator

    if task == "inpaint" and isinstance(mask, str):
        mask = read_mask(mask, count, image_shape, seed)
    if task != "inpaint" and mask is not None:
        raise AccelkitError(f"--mask is for --task inpaint, not {task}")
    if task != "super-resolution" and factor is not None:
        raise AccelkitError(f"--factor is for --task super-resolution, not {task}")
    if task != "deblur" and blur is not None:
        raise AccelkitError(f"--blur is for --task deblur, not {task}")
    if isinstance(mask, Tensor):
        c, h, w = image_shape
        if mask.ndim != 4 or tuple(mask.shape[-2:]) != (h, w) or mask.shape[0] not in (1, count):
            raise AccelkitError(f"mask of shape {list(mask.shape)} does not match {count} image(s) of shape "
                                f"{list(image_shape)}")
    return make_operator(task, tuple(image_shape), mask=mask, factor=factor, blur_std=parse_blur(blur))


# --------------------------------------------------------------------------------------------------------- degrade


class DegradeRecipe(OperatorFields):
    """degrade: clean images -> a measurement y = H x + n (and its mask) to restore and measure against."""

    input_fields = ("clean", "mask")

    clean: str = Field(description=f"clean images: a .png / .safetensors file, or {', '.join(IMAGE_SETS)}")
    count: int | None = Field(None, ge=1, description="use the first COUNT images (default: all)")
    seed: int = Field(0, ge=0, description="image i's noise (and random mask) from (seed, i)")

    def inputs(self) -> dict[str, str]:
        out = self._file_inputs(("mask",))
        if self.clean not in IMAGE_SETS:
            out["clean"] = self.clean
        return out

    def identity_dict(self) -> dict[str, Any]:
        d = super().identity_dict()
        if self.clean in IMAGE_SETS:
            d["clean"] = self.clean
        if self.mask is not None and "mask" not in self.inputs():
            d["mask"] = self.mask
        return d


def _clean_images(recipe: DegradeRecipe) -> Tensor:
    from ..data import load_dataset
    from ..measurements import read_images

    x = load_dataset(recipe.clean).samples if recipe.clean in IMAGE_SETS else \
        read_images(recipe.clean, "clean images", ("clean", "images", "samples", "restored"))
    if x.ndim != 4:
        raise AccelkitError(f"clean images {recipe.clean}: shape {list(x.shape)}; expected images (N, C, H, W)")
    return x[: recipe.count] if recipe.count is not None else x


def degrade(recipe: DegradeRecipe) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The measurement tensors (y, clean, mask) and settings of ``recipe`` (checked; nothing written)."""
    from ..noise import sample_noise

    if recipe.task is None:
        raise AccelkitError("degrade: --task is required (inpaint, super-resolution, deblur or denoise)")
    noise_std = 0.0 if recipe.noise_std is None else recipe.noise_std
    clean = _clean_images(recipe)
    op = build_operator(recipe.task, tuple(clean.shape[1:]), clean.shape[0], recipe.mask, recipe.factor,
                        recipe.blur, recipe.seed)
    x = clean.double()
    hx = op(x)
    noise = sample_noise(recipe.seed, range(x.shape[0]), tuple(hx.shape[1:]), dtype=torch.float64)
    y = op.ut(hx + noise_std * noise) if recipe.task == "inpaint" else hx + noise_std * noise
    tensors = {"y": y.float(), "clean": clean.float()}
    if recipe.task == "inpaint":
        tensors["mask"] = op.mask[:, :1].float() if bool((op.mask == op.mask[:, :1]).all()) else op.mask.float()
    settings = {"task": recipe.task, "factor": recipe.factor, "blur": recipe.blur, "noise_std": noise_std,
                "seed": recipe.seed, "clean": recipe.clean, "mask": recipe.mask, "count": int(x.shape[0])}
    return tensors, settings


def _measurement_bytes(tensors: dict[str, Tensor], settings: dict[str, Any]) -> bytes:
    from ..artifacts import safetensors_bytes
    from ..measurements import MEASUREMENT_KEY

    return safetensors_bytes(tensors, {MEASUREMENT_KEY: json.dumps(settings), "format": "accelkit.measurement/1"})


def degrade_to_file(recipe: DegradeRecipe, out: Path, force: bool = False) -> Path:
    """Write the measurement to one file: .safetensors (y, mask, clean, settings) or .png (y; the mask beside it as
    OUT-mask.png)."""
    from ..measurements import image_bytes

    suffix = _check_output_file(out, force)
    tensors, settings = degrade(recipe)
    if suffix == ".png":
        if tensors["y"].shape[0] != 1:
            raise AccelkitError(f"-o {out}: a PNG holds one measurement and there are {tensors['y'].shape[0]} "
                                "images; write .safetensors (or pass --count 1)")
        data = [(out, image_bytes(tensors["y"], ".png"))]
        if "mask" in tensors:
            data.append((out.with_name(out.stem + "-mask.png"), image_bytes(tensors["mask"] * 2 - 1, ".png")))
    else:
        data = [(out, _measurement_bytes(tensors, settings))]
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, blob in data:
        atomic_write_bytes(path, blob)
    return out


def run_degrade(recipe: DegradeRecipe, output: Path | None = None, force: bool = False) -> Path:
    from ..metrics import psnr

    tensors, settings = degrade(recipe)  # every check before the artifact directory is made
    with Artifact.open(output, "degrade", recipe, recipe.inputs(), force=force, seeds={"seed": recipe.seed}) as art:
        if art.state == "complete":
            log(f"degrade: reusing {art.path}")
            return art.path
        art.write_file(MEASUREMENT_FILE, _measurement_bytes(tensors, settings))
        art.complete({**settings, "measurement_shape": list(tensors["y"].shape)})
        if recipe.task == "denoise":
            log(f"degrade: PSNR of y itself {psnr(tensors['y'], tensors['clean']):.2f} dB")
        return art.path


# --------------------------------------------------------------------------------------------------------- restore


class RestoreRecipe(OperatorFields):
    """restore: posterior samples of clean images given a measurement, with a teacher as the prior."""

    input_fields = ("teacher", "input", "reference", "mask", "config", "cond")
    execution_fields = frozenset({"batch_size", "device", "allow_pickle"})

    teacher: str = Field(description="teacher checkpoint (file, folder or artifact)")
    input: str = Field(description="the measurement y: .png, .safetensors, or a degrade artifact")
    reference: str | None = Field(None, description="clean images to measure PSNR / SSIM against (default: the "
                                                    "measurement file's own, if it holds them)")
    method: str = Field("pigdm", description="pigdm, dps or ddrm")
    nfe: int = Field(20, ge=1, description="network evaluations per sample (pigdm / dps: each with one VJP)")
    n: int = Field(1, ge=1, description="posterior samples per measurement")
    mean: bool = Field(False, description="write the mean of the n samples (the posterior-mean estimate)")
    seed: int = Field(0, ge=0, description="sample k = i n + j starts from the noise of (seed, k)")
    start: float | None = Field(None, gt=0, le=1, description="start noise level as a time of the linear schedule "
                                                              "(default: pigdm 0.8, dps / ddrm 1)")
    solver: str = Field("ddim", description="pigdm: the ODE solver of the guided teacher")
    gamma: float = Field(1.0, ge=0, description="pigdm: guidance weight (1 = Tweedie's formula)")
    zeta: float = Field(1.0, ge=0, description="dps: step size on grad ||y - H x0_hat||")
    eta: float = Field(0.85, ge=0, le=1, description="ddrm: eta")
    eta_b: float = Field(1.0, ge=0, le=1, description="ddrm: eta_b")
    labels: list[int] | None = Field(None, description="class labels of a class-conditional teacher, cycled over the "
                                                       "measurements (default: unconditional / the null class)")
    cond: str | None = Field(None, description="conditioning tensors (.safetensors); measurement i takes row i mod R")
    config: str | None = Field(None, description="config.json of a single-file diffusers state dict")
    prediction_type: str | None = Field(None, description="override the teacher's prediction type")
    schedule: str | None = Field(None, description="override the teacher's schedule")
    allow_pickle: bool = Field(False, description="allow a pickled checkpoint (weights_only)")
    batch_size: int = Field(64, ge=1, description="samples per batch (results do not depend on it)")
    device: str = Field("cpu", description="cpu, cuda, cuda:N")

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        from ..inverse import METHODS

        if v not in METHODS:
            raise ValueError(f"expected one of {', '.join(METHODS)}")
        return v

    def inputs(self) -> dict[str, str]:
        return self._file_inputs(self.input_fields)

    def identity_dict(self) -> dict[str, Any]:
        d = super().identity_dict()
        if self.mask is not None and "mask" not in self.inputs():
            d["mask"] = self.mask
        return d


@dataclass
class RestoreProblem:
    """Everything a restoration needs, loaded and checked."""

    teacher: Any
    op: Any
    y: Tensor
    noise_std: float
    reference: Tensor | None
    settings: Any
    measurement: dict[str, Any]
    condition: Any = None


def _measurement_path(path: str) -> str:
    p = Path(path)
    if p.is_dir():
        if not (p / MEASUREMENT_FILE).is_file():
            raise AccelkitError(f"--input {path}: a directory without {MEASUREMENT_FILE}; expected a degrade "
                                "artifact, a .png or a .safetensors measurement")
        return str(p / MEASUREMENT_FILE)
    if not p.is_file():
        raise AccelkitError(f"--input {path}: no such file")
    return path


def _agree(name: str, given: Any, recorded: Any, path: str) -> Any:
    if given is not None and recorded is not None and given != recorded:
        raise AccelkitError(f"--{name.replace('_', '-')} {given}: {path} was measured with {name} {recorded}")
    return given if given is not None else recorded


def prepare_restore(recipe: RestoreRecipe) -> RestoreProblem:
    """Load the teacher and the measurement and check them against each other (nothing is written)."""
    from ..inverse import RestoreSettings
    from ..measurements import read_images, read_measurement
    from ..models.loading import load_teacher
    from ..solvers import get_solver

    if recipe.method == "pigdm":
        get_solver(recipe.solver)
    path = _measurement_path(recipe.input)
    y, recorded_mask, clean, rec = read_measurement(path)
    task = _agree("task", recipe.task, rec.get("task"), path)
    if task is None:
        raise AccelkitError(f"--input {recipe.input}: records no task; pass --task ({', '.join(TASKS)})")
    factor = _agree("factor", recipe.factor, rec.get("factor"), path)
    if recipe.blur is not None and rec.get("blur") is not None and parse_blur(recipe.blur) == parse_blur(rec["blur"]):
        rec["blur"] = recipe.blur
    blur = _agree("blur", recipe.blur, rec.get("blur"), path)
    noise_std = _agree("noise_std", recipe.noise_std, rec.get("noise_std"), path)
    if noise_std is None:
        raise AccelkitError(f"--input {recipe.input}: records no noise level; pass --noise-std S (0 for none)")
    if recipe.mask is not None and recorded_mask is not None:
        raise AccelkitError(f"--mask {recipe.mask}: {path} holds its own mask")
    teacher = load_teacher(recipe.teacher, config=recipe.config, allow_pickle=recipe.allow_pickle,
                           device=recipe.device, prediction_type=recipe.prediction_type, schedule=recipe.schedule)
    shape = tuple(teacher.sample_shape)
    if len(shape) != 3:
        raise AccelkitError(f"{recipe.teacher}: makes samples of shape {list(shape)}; restore works on images "
                            "(C x H x W)")
    mask = recipe.mask if recipe.mask is not None else recorded_mask
    op = build_operator(task, shape, y.shape[0], mask, factor, blur, rec.get("seed", recipe.seed))
    want = tuple(op.measurement_shape())
    if tuple(y.shape[1:]) != want:
        raise AccelkitError(f"--input {recipe.input}: measurements of shape {list(y.shape[1:])}, but {task} of the "
                            f"teacher's {list(shape)} images gives {list(want)}")
    if task == "inpaint":
        y = op.ut(y.double()).float()  # missing pixels are not measurements
    reference = None
    if recipe.reference is not None:
        reference = read_images(recipe.reference, "--reference", ("clean", "images", "samples"))
    elif clean is not None:
        reference = clean
    if reference is not None and (reference.shape[0] != y.shape[0] or tuple(reference.shape[1:]) != shape):
        raise AccelkitError(f"--reference: {list(reference.shape)} images; expected {y.shape[0]} of shape "
                            f"{list(shape)}")
    from ..sampling import condition_from_options

    condition = None
    if recipe.labels is not None or recipe.cond is not None:
        condition = condition_from_options(teacher, recipe.teacher, recipe.labels, recipe.cond)
    settings = RestoreSettings(recipe.method, recipe.nfe, recipe.start, recipe.solver, recipe.gamma, recipe.zeta,
                               recipe.eta, recipe.eta_b)
    settings.check()
    measurement = {"task": task, "factor": factor, "blur": blur, "noise_std": noise_std, "count": int(y.shape[0]),
                   "path": path}
    return RestoreProblem(teacher, op, y, float(noise_std), reference, settings, measurement, condition)


def solve_restore(problem: RestoreProblem, recipe: RestoreRecipe) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Run the restoration: tensors (restored, baseline) and the summary (settings, timings, metrics)."""
    import time

    from ..inverse import method_grid, restore
    from ..metrics import psnr, ssim

    start = time.perf_counter()
    samples = restore(problem.teacher, problem.op, problem.y, problem.noise_std, problem.settings, n=recipe.n,
                      seed=recipe.seed, batch_size=recipe.batch_size, device=recipe.device,
                      condition=problem.condition)
    seconds = time.perf_counter() - start
    if not bool(torch.isfinite(samples).all()):
        raise AccelkitError(f"{recipe.method}: the restoration produced NaN or inf (NFE {recipe.nfe}); nothing was "
                            "written (try more NFE, or for pigdm a later --start)")
    mean = samples.mean(1)
    restored = mean if recipe.mean else samples.reshape(-1, *samples.shape[2:])
    baseline = problem.op.regularized_pinv(problem.y.double(), problem.noise_std**2).float()
    grid = method_grid(problem.teacher, problem.settings)
    summary: dict[str, Any] = {
        "measurement": problem.measurement, "method": recipe.method, "nfe": recipe.nfe, "n": recipe.n,
        "mean": recipe.mean, "seed": recipe.seed, "start_time": float(grid[0]),
        "vjp_per_evaluation": recipe.method in ("pigdm", "dps"), "seconds": round(seconds, 3),
        "restored_shape": list(restored.shape),
    }
    if problem.reference is not None:
        ref = problem.reference.float()
        metrics = {"posterior_mean": {"psnr": psnr(mean, ref), "ssim": ssim(mean, ref)},
                   "baseline": {"psnr": psnr(baseline, ref), "ssim": ssim(baseline, ref)}}
        if recipe.n > 1 or not recipe.mean:
            flat = samples.reshape(-1, *samples.shape[2:])
            ref_k = ref.repeat_interleave(recipe.n, 0)
            metrics["samples"] = {"psnr": psnr(flat, ref_k), "ssim": ssim(flat, ref_k)}
        summary["metrics"] = metrics
        pm, base = metrics["posterior_mean"], metrics["baseline"]
        log(f"restore: {recipe.method}, {recipe.nfe} NFE, {recipe.n} sample(s) per input: PSNR {pm['psnr']:.2f} dB, "
            f"SSIM {pm['ssim']:.3f} (mean of the samples); pseudo-inverse baseline {base['psnr']:.2f} dB, SSIM "
            f"{base['ssim']:.3f}")
    return {"restored": restored.contiguous(), "baseline": baseline.contiguous()}, summary


def _check_output_file(out: Path, force: bool) -> str:
    suffix = out.suffix.lower()
    if suffix not in (".png", ".safetensors"):
        raise AccelkitError(f"-o {out}: expected a .png or .safetensors file, or a directory for the artifact")
    if out.exists() and not force:
        raise AccelkitError(f"-o {out}: file exists; pass --force to overwrite it")
    return suffix


def restore_to_file(recipe: RestoreRecipe, out: Path, force: bool = False) -> tuple[Path, dict[str, Any]]:
    """Restore straight to one file: .safetensors (restored, baseline; the summary in the header) or .png."""
    from ..measurements import image_bytes

    suffix = _check_output_file(out, force)
    problem = prepare_restore(recipe)
    tensors, summary = solve_restore(problem, recipe)
    meta = {"format": "accelkit.restored/1", "summary": json.dumps(summary), "recipe": recipe.model_dump_json()}
    data = image_bytes(tensors["restored"], suffix, tensors, meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, data)
    return out, summary


def run_restore(recipe: RestoreRecipe, output: Path | None = None, force: bool = False) -> Path:
    from ..measurements import image_bytes

    problem = prepare_restore(recipe)  # every check before the artifact directory is made
    with Artifact.open(output, "restore", recipe, recipe.inputs(), force=force, seeds={"seed": recipe.seed}) as art:
        if art.state == "complete":
            log(f"restore: reusing {art.path}")
            return art.path
        tensors, summary = solve_restore(problem, recipe)
        art.write_file(RESTORED_FILE, image_bytes(tensors["restored"], ".safetensors", tensors,
                                                  {"format": "accelkit.restored/1"}))
        if tensors["restored"].shape[1] in (1, 3):
            art.write_file("restored.png", image_bytes(tensors["restored"], ".png"))
        art.complete(summary)
        return art.path


def _run_restore(recipe: StageRecipe, output: Path | None, force: bool) -> Path:
    assert isinstance(recipe, RestoreRecipe)
    return run_restore(recipe, output, force)


def _run_degrade(recipe: StageRecipe, output: Path | None, force: bool) -> Path:
    assert isinstance(recipe, DegradeRecipe)
    return run_degrade(recipe, output, force)


register_stage("degrade", DegradeRecipe, _run_degrade)
register_stage("restore", RestoreRecipe, _run_restore)

__all__ = ["DegradeRecipe", "RestoreRecipe", "degrade", "degrade_to_file", "run_degrade", "prepare_restore",
           "solve_restore", "restore_to_file", "run_restore", "parse_blur"]
