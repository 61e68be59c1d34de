"""``accelkit export``: a teacher, a rescaled teacher or a student, with the sampler it is meant to run with, as

* ``diffusers``: a folder plain diffusers loads (``model_index.json``, the model subfolder ``unet/`` or
  ``transformer/`` with ``config.json`` + ``diffusion_pytorch_model.safetensors``, ``scheduler/``), whose scheduler
  reproduces accelkit's sampling: a stock diffusers scheduler where one computes exactly accelkit's solver on the
  chosen grid (DPM-Solver++ and UniPC for DDPM-family teachers, flow-matching Euler for flow models), else
  :class:`accelkit.export.scheduler.AccelkitScheduler` (rescaled teachers, learned solvers, other grids);
* ``safetensors``: one file in the network's own key layout (diffusers' keys for a diffusers model) whose header
  carries accelkit's teacher format (so :func:`accelkit.models.loading.load_teacher` loads it back), the
  Stability AI ``modelspec.*`` keys and the sampler as ``accelkit.*`` keys.

The sampler (solver, NFE, time grid) is the one the artifact recorded (``summary.sampling``), else the one its kind
is made for (reflow students: Euler / DPM-Solver++ at 2 NFE), else the teacher's default (Euler for the linear
schedule, DPM-Solver++(2M) otherwise, at 8 NFE, on the grid of the stock diffusers scheduler when there is one);
``--solver``, ``--nfe``, ``--grid`` override it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..artifacts import MANIFEST, atomic_directory, content_hash, read_manifest, safetensors_bytes
from ..errors import AccelkitError
from ..schedules import DiscreteVPSchedule, LinearSchedule
from ..solvers.base import Solver
from ..teacher import NetworkTeacher, RescaledTeacher, Teacher
from .linear_form import network_of, scheduler_config

FORMATS = ("diffusers", "safetensors", "lora", "kohya")
EXPORT_FORMAT = "accelkit.export/1"
#: The file in an exported diffusers folder that records what was exported and how it samples.
RECORD_FILE = "accelkit_export.json"
#: Artifact kinds that hold a student (few-step model) rather than a teacher.
STUDENT_KINDS = ("reflow", "distill", "consistency")
DEFAULT_TEACHER_NFE = 8
DEFAULT_STUDENT_NFE = 2
#: diffusers pipelines for model classes that make sense on their own (other components may be passed to
#: ``from_pretrained``).
PIPELINES = {"UNet2DModel": "DDPMPipeline", "UNet2DConditionModel": "StableDiffusionPipeline",
             "DiTTransformer2DModel": "DiTPipeline", "SD3Transformer2DModel": "StableDiffusion3Pipeline"}
COMPONENTS = {"UNet2DModel": "unet", "UNet2DConditionModel": "unet", "DiTTransformer2DModel": "transformer",
              "SD3Transformer2DModel": "transformer"}
#: Facts of a loaded teacher's source folder (its pipeline and scheduler) that do not describe an exported file.
SOURCE_FOLDER_INFO = ("pipeline", "component", "scheduler", "sampling")
MODELSPEC_PREDICTION = {"eps": "epsilon", "v": "v", "x0": "sample", "flow": "flow", "flow_to_data": "flow_to_data"}


# ----------------------------------------------------------------------------------------------------------------
# What is exported


@dataclass
class Source:
    """The thing to export: its path, kind (``teacher``, ``rescale``, ``reflow``, ...), loaded teacher, the artifact
    manifest (None for a plain checkpoint) and the content hash of the path."""

    path: Path
    kind: str
    teacher: Teacher
    manifest: dict[str, Any] | None
    sha256: str

    @property
    def summary(self) -> dict[str, Any]:
        return (self.manifest or {}).get("summary") or {}


def open_source(path: str | os.PathLike, **load_kwargs: Any) -> Source:
    """Load ``path`` (a teacher file or folder, or an accelkit artifact) for export."""
    from ..models.loading import load_teacher

    p = Path(path)
    if not p.exists():
        raise AccelkitError(f"{path}: no such file or directory; expected a teacher checkpoint or an accelkit "
                            "artifact (runs/rescale-*, runs/reflow-*, ...)")
    manifest = read_manifest(p) if p.is_dir() and (p / MANIFEST).is_file() else None
    if manifest is not None and manifest.get("status") != "complete":
        raise AccelkitError(f"{path}: the {manifest.get('kind')} artifact is not complete (status "
                            f"{manifest.get('status')!r}); run its stage again to finish it")
    teacher = load_teacher(p, **{"dtype": None, **load_kwargs})  # exports keep the stored dtype unless asked
    kind = manifest["kind"] if manifest is not None else "teacher"
    return Source(p, kind, teacher, manifest, content_hash(p))


@dataclass
class Sampling:
    """How the export samples: ``solver`` with ``nfe`` evaluations on the time grid ``grid`` (explicit times, 1 to 0),
    ``grid_name`` how that grid was chosen, ``origin`` where the choice came from."""

    solver: str
    nfe: int
    grid: list[float]
    grid_name: str
    origin: str
    #: A solver object not registered by name (e.g. a learned bespoke solver), run in place of ``solver``.
    solver_object: Solver | None = field(default=None, compare=False, repr=False)

    def record(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "solver_object"}

    @property
    def runnable(self) -> str | Solver:
        """What :func:`accelkit.solvers.get_solver` takes: the object, else the registered name."""
        return self.solver_object if self.solver_object is not None else self.solver


def _is_diffusers_flow(teacher: Teacher) -> bool:
    """A flow-matching network as diffusers' FlowMatchEulerDiscreteScheduler drives it (flow, linear, 1000 t)."""
    return (isinstance(teacher, NetworkTeacher) and isinstance(teacher.schedule, LinearSchedule)
            and teacher.prediction == "flow" and teacher.time_input.kind == "scaled"
            and teacher.time_input.scale == float(teacher.time_input.num_train_timesteps))


def _is_diffusers_vp(teacher: Teacher) -> bool:
    """A DDPM-family network as diffusers' multistep schedulers drive it (eps / v / x0, discrete steps)."""
    return (isinstance(teacher, NetworkTeacher) and isinstance(teacher.schedule, DiscreteVPSchedule)
            and teacher.prediction in ("eps", "v", "x0") and teacher.time_input.kind == "discrete"
            and teacher.time_input.num_train_timesteps == teacher.schedule.num_train_timesteps)


def stock_scheduler(teacher: Teacher, solver: str | Solver, nfe: int):
    """A stock diffusers scheduler that computes exactly ``solver`` on its own grid for this teacher, and that grid
    as accelkit times (the training step k is t = (k + 1) / N, the final sigma 0 is t = 0); or None.

    DPM-Solver++(2M / 3M) and UniPC-2 equal diffusers' DPMSolverMultistepScheduler / UniPCMultistepScheduler with a
    final first-order step onto sigma = 0 (tests/test_solvers_diffusers.py); Euler on a flow-matching model equals
    FlowMatchEulerDiscreteScheduler, whose grid includes its shift.
    """
    if not isinstance(solver, str):
        return None
    if solver in ("consistency", "tcd", "edge-skip"):
        return lcm_scheduler(teacher, solver, nfe)
    if _is_diffusers_vp(teacher) and solver in ("dpm++2m", "dpm++3m", "unipc2"):
        from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

        sched: DiscreteVPSchedule = teacher.schedule  # type: ignore[assignment]
        pred = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}[teacher.prediction]
        common = dict(num_train_timesteps=sched.num_train_timesteps, beta_start=sched.beta_start,
                      beta_end=sched.beta_end, beta_schedule=sched.beta_schedule, prediction_type=pred,
                      timestep_spacing="trailing", final_sigmas_type="zero")
        if solver == "unipc2":
            scheduler = UniPCMultistepScheduler(solver_order=2, lower_order_final=True, **common)
        else:
            scheduler = DPMSolverMultistepScheduler(solver_order=int(solver[5]), lower_order_final=False,
                                                    algorithm_type="dpmsolver++", solver_type="midpoint", **common)
        scheduler.set_timesteps(nfe)
        n = sched.num_train_timesteps
        grid = [(float(k) + 1.0) / n for k in scheduler.timesteps] + [0.0]
    elif _is_diffusers_flow(teacher) and solver == "euler":
        from diffusers import FlowMatchEulerDiscreteScheduler

        shift = float(getattr(teacher, "info", {}).get("shift", 1.0))
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=teacher.time_input.num_train_timesteps,
                                                    shift=shift)
        scheduler.set_timesteps(nfe)
        grid = [float(s) for s in scheduler.sigmas]
    else:
        return None
    if len(grid) != nfe + 1 or any(b >= a for a, b in zip(grid, grid[1:], strict=False)):
        return None  # e.g. repeated training steps at more steps than the schedule has
    return scheduler, grid


def lcm_scheduler(teacher: Teacher, solver: str, nfe: int):
    """diffusers' LCMScheduler and its grid for a consistency student with LCM's boundary (``boundary: lcm``), or None.

    Its step is ours (:mod:`accelkit.solvers.consistency` with gamma = 1): denoised = c_skip(n) x + c_out(n) x0_hat
    with c_skip, c_out on the timestep n scaled by ``timestep_scaling``
    (:class:`accelkit.consistency.Parameterisation`);
    then x_next = sqrt(alphas_cumprod[n']) denoised + sqrt(1 - alphas_cumprod[n']) z, and the denoised value itself
    after the last step; its timesteps are LCM's skip grid (:func:`accelkit.consistency.lcm_grid`). The one difference
    is where z comes from: LCMScheduler draws it from the pipeline's generator, accelkit from the sample's own seed, so
    the samples are equal at one step and equal given the same z at more (``lcm_noise`` in the export record). TCD's
    gamma sampler and edge-skipping equal it at one step only (TCDScheduler has no boundary scalings and back-steps on
    integer timesteps)."""
    from ..consistency import LCM_ORIGINAL_STEPS, Parameterisation, lcm_grid

    param = Parameterisation.of(teacher)
    one_step_only = solver in ("tcd", "edge-skip")
    if not (_is_diffusers_vp(teacher) and param.lcm) or (one_step_only and nfe != 1) or nfe > LCM_ORIGINAL_STEPS:
        return None
    from diffusers import LCMScheduler

    sched: DiscreteVPSchedule = teacher.schedule  # type: ignore[assignment]
    pred = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}[teacher.prediction]  # type: ignore[attr-defined]
    scheduler = LCMScheduler(num_train_timesteps=sched.num_train_timesteps, beta_start=sched.beta_start,
                             beta_end=sched.beta_end, beta_schedule=sched.beta_schedule, prediction_type=pred,
                             original_inference_steps=LCM_ORIGINAL_STEPS, clip_sample=False, set_alpha_to_one=True,
                             timestep_scaling=float(param.timestep_scaling))  # type: ignore[arg-type]
    scheduler.set_timesteps(nfe)
    n = sched.num_train_timesteps
    grid = [(float(k) + 1.0) / n for k in scheduler.timesteps] + [0.0]
    if max(abs(a - b) for a, b in zip(grid, lcm_grid(sched, nfe), strict=True)) > 1e-12:
        return None
    return scheduler, grid


def _default_solver(teacher: Teacher) -> str:
    return "euler" if isinstance(teacher.schedule, LinearSchedule) else "dpm++2m"


def resolve_sampling(source: Source, solver: str | Solver | None = None, nfe: int | None = None,
                     grid: str | list[float] | None = None, shift: float | None = None) -> Sampling:
    """The sampler to export: the user's choices over the artifact's recorded or kind-given ones over defaults.

    ``solver`` may be a :class:`accelkit.solvers.Solver` object (a learned solver that is not registered by name).
    """
    from ..solvers import GRID_NAMES, default_grid, solver_grid, solver_names

    teacher = source.teacher
    recorded = source.summary.get("sampling") if isinstance(source.summary.get("sampling"), dict) else None
    student = source.kind in STUDENT_KINDS
    if recorded:
        origin = f"recorded by the {source.kind} artifact"
        base_solver, base_nfe, base_grid = recorded.get("solver"), recorded.get("nfe"), recorded.get("grid")
    elif student:
        method = source.summary.get("method", "")
        origin = f"{source.kind} student ({method or 'default'})"
        base_solver = "dpm++2m" if method == "rectified-diffusion" else _default_solver(teacher)
        base_nfe, base_grid = DEFAULT_STUDENT_NFE, "uniform"
    else:
        origin = "teacher default" if source.kind == "teacher" else f"teacher default ({source.kind} artifact)"
        base_solver, base_nfe, base_grid = _default_solver(teacher), DEFAULT_TEACHER_NFE, None
    if solver is not None or nfe is not None or grid is not None:
        origin += " with user overrides"
    solver_object = solver if isinstance(solver, Solver) else None
    solver = solver_object.name if solver_object is not None else solver if solver is not None else base_solver
    nfe = nfe if nfe is not None else int(base_nfe or DEFAULT_TEACHER_NFE)
    if solver_object is None and solver not in solver_names():
        raise AccelkitError(f"solver {solver!r}: unknown; expected one of {', '.join(solver_names())}")
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise AccelkitError(f"NFE {nfe!r}: expected an integer of at least 1")
    if grid is None and base_grid is not None and (isinstance(base_grid, str) or (
            solver == base_solver and nfe == base_nfe)):
        grid = base_grid
    if grid is None and shift is not None:
        grid = "shift"
    grid_kw: dict[str, float] = {}
    if grid is None:
        stock = stock_scheduler(teacher, solver_object or solver, nfe)
        if stock is not None:
            return Sampling(solver, nfe, stock[1], f"{type(stock[0]).__name__}'s own", origin)
        grid = default_grid(teacher.schedule)
    if isinstance(grid, str):
        if grid not in GRID_NAMES:
            raise AccelkitError(f"grid {grid!r}: expected one of {', '.join(GRID_NAMES)} or a list of times")
        if grid == "shift":
            grid_kw["shift"] = shift if shift is not None else float(getattr(teacher, "info", {}).get("shift", 3.0))
    elif shift is not None:
        raise AccelkitError(f"--shift {shift}: only used with the 'shift' grid")
    ts = solver_grid(teacher, solver_object or solver, nfe, grid, **grid_kw)
    name = grid if isinstance(grid, str) else "times"
    if grid_kw:
        name += f" (shift {grid_kw['shift']:g})"
    return Sampling(solver, nfe, [float(t) for t in ts], name, origin, solver_object)


# ----------------------------------------------------------------------------------------------------------------
# Common records


def _architecture(teacher: Teacher) -> tuple[str, dict[str, Any]]:
    from ..models.loading import architecture_of

    return architecture_of(network_of(teacher).network)


def export_record(source: Source, sampling: Sampling, scheduler: str) -> dict[str, Any]:
    """What was exported and how it samples (``accelkit_export.json`` in a folder; ``accelkit.*`` in a file)."""
    net = network_of(source.teacher)
    record: dict[str, Any] = {
        "format": EXPORT_FORMAT, "accelkit_version": __version__, "kind": source.kind,
        "source": str(source.path.resolve()), "source_sha256": source.sha256,
        "recipe_hash": (source.manifest or {}).get("identity"),
        "architecture": _architecture(source.teacher)[0], "prediction_type": net.prediction,
        "schedule": source.teacher.schedule.config(), "network_schedule": net.schedule.config(),
        "time_input": net.time_input.config(), "scheduler": scheduler, **sampling.record(),
    }
    if scheduler == "LCMScheduler":  # a consistency student with LCM's boundary: the stock config and its exactness
        stock = lcm_scheduler(source.teacher, sampling.solver, sampling.nfe)
        assert stock is not None
        record["scheduler_config"] = {k: v for k, v in dict(stock[0].config).items() if not k.startswith("_")}
        record["lcm_noise"] = lcm_noise_note(sampling.nfe)
    return record


def lcm_noise_note(nfe: int) -> str:
    """How exactly an exported LCMScheduler reproduces accelkit's samples (see :func:`lcm_scheduler`)."""
    if nfe == 1:
        return "none: one step, the same samples as accelkit's"
    return (f"{nfe - 1} re-noising draws from the pipeline's generator (accelkit draws them from each sample's own "
            "seed): the same step rule, samples equal given the same draws")


def scheduler_choice(source: Source, sampling: Sampling) -> str:
    """The scheduler an export carries, in words (for the log)."""
    stock = exact_stock_scheduler(source, sampling)
    if stock is None:
        return "AccelkitScheduler (accelkit's own: no stock diffusers scheduler runs this sampler exactly)"
    name = type(stock).__name__
    if name == "LCMScheduler":
        return f"{name} (stock; re-noising: {lcm_noise_note(sampling.nfe)})"
    return f"{name} (stock; computes this sampler exactly)"


# ----------------------------------------------------------------------------------------------------------------
# diffusers folder


def exact_stock_scheduler(source: Source, sampling: Sampling):
    """The stock diffusers scheduler that reproduces ``sampling`` exactly (its own grid is the sampling's), or None."""
    stock = stock_scheduler(source.teacher, sampling.runnable, sampling.nfe)
    if stock is not None and max(abs(a - b) for a, b in zip(stock[1], sampling.grid, strict=True)) < 1e-9:
        return stock[0]
    return None


def accelkit_scheduler_config(source: Source, sampling: Sampling) -> dict[str, Any]:
    """The :class:`AccelkitScheduler` config that replays ``sampling`` on the source's network."""
    net = network_of(source.teacher)
    record = {"solver": sampling.solver, "nfe": sampling.nfe, "grid": sampling.grid, "grid_name": sampling.grid_name,
              "schedule": source.teacher.schedule.config(),
              "network": {"prediction_type": net.prediction, "schedule": net.schedule.config(),
                          "time_input": net.time_input.config()}}
    grid = torch.tensor(sampling.grid, dtype=torch.float64)
    return scheduler_config(source.teacher, sampling.runnable, sampling.nfe, grid, record)


def diffusers_scheduler(source: Source, sampling: Sampling):
    """The scheduler for the folder: stock when it reproduces ``sampling`` exactly, else AccelkitScheduler."""
    stock = exact_stock_scheduler(source, sampling)
    if stock is not None:
        return stock
    from .scheduler import AccelkitScheduler

    return AccelkitScheduler(**accelkit_scheduler_config(source, sampling))


def export_diffusers(source: Source, sampling: Sampling, output: str | os.PathLike, force: bool = False) -> Path:
    """Write the diffusers folder ``output`` (atomically; an existing one only with ``force``)."""
    out = Path(output)
    architecture, _ = _architecture(source.teacher)
    if not architecture.startswith("diffusers."):
        raise AccelkitError(f"{source.path}: a {architecture} network has no diffusers model class, which the "
                            "diffusers format needs; use --format safetensors (accelkit's loader reads it)")
    if out.exists() and not force:
        raise AccelkitError(f"-o {out}: exists; pass --force to replace it")
    net = network_of(source.teacher)
    class_name = architecture.removeprefix("diffusers.")
    component = COMPONENTS[class_name]
    scheduler = diffusers_scheduler(source, sampling)
    unconditional = getattr(net.network, "class_embedding", None) is None
    pipeline = PIPELINES[class_name] if (class_name != "UNet2DModel" or unconditional) else None
    with atomic_directory(out, replace=force) as tmp:
        net.network.save_pretrained(tmp / component, safe_serialization=True)
        scheduler.save_pretrained(tmp / "scheduler")
        if pipeline is not None:  # otherwise no stock pipeline runs this model: its components load on their own
            index = {"_class_name": pipeline, "_diffusers_version": _diffusers_version(),
                     component: ["diffusers", class_name],
                     "scheduler": [_library_of(scheduler), type(scheduler).__name__]}
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        record = export_record(source, sampling, type(scheduler).__name__)
        record["pipeline"] = pipeline
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return out


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def _library_of(obj: Any) -> str:
    """The library entry diffusers writes for a component: ``diffusers``, or the full module of another class."""
    module = type(obj).__module__
    return "diffusers" if module.split(".")[0] == "diffusers" else module


# ----------------------------------------------------------------------------------------------------------------
# single .safetensors file


def _resolution(shape: tuple[int, ...]) -> str:
    return f"{shape[-1]}x{shape[-2]}" if len(shape) >= 3 else "x".join(map(str, shape))


def single_file_contents(source: Source, sampling: Sampling) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (the network's own keys) and header: accelkit's teacher format, ``modelspec.*`` and ``accelkit.*``."""
    from ..models.loading import teacher_file_contents

    net = network_of(source.teacher)
    info = {k: v for k, v in net.info.items() if k not in SOURCE_FOLDER_INFO}
    if isinstance(source.teacher, RescaledTeacher):
        info["rescaled_to"] = source.teacher.schedule.config()
    net = NetworkTeacher(net.network, net.call, net.prediction, net.schedule, net.sample_shape, net.time_input,
                         net.guidance_scale, net.null_condition, info)
    tensors, meta = teacher_file_contents(net)
    stock = exact_stock_scheduler(source, sampling)
    record = export_record(source, sampling, type(stock).__name__ if stock is not None else "AccelkitScheduler")
    if stock is None:  # the sampler's coefficients, for tools (and learned solvers) without accelkit's solvers
        record["scheduler_config"] = accelkit_scheduler_config(source, sampling)
    architecture = record["architecture"]
    title = source.path.name if source.path.is_dir() else source.path.stem
    meta.update({
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture if source.kind not in STUDENT_KINDS else f"{architecture}/{source.kind}",
        "modelspec.implementation": ("https://github.com/huggingface/diffusers" if architecture.startswith("diffusers.")
                                     else "accelkit"),
        "modelspec.title": title,
        "modelspec.description": f"{source.kind} exported by accelkit {__version__}; sample with {sampling.solver} "
                                 f"at {sampling.nfe} NFE (accelkit.* keys)",
        "modelspec.date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "modelspec.resolution": _resolution(net.sample_shape),
        "modelspec.prediction_type": MODELSPEC_PREDICTION[net.prediction],
    })
    for key, value in record.items():
        if value is not None:
            meta[f"accelkit.{key}"] = value if isinstance(value, str) else json.dumps(value)
    return tensors, meta


def tensor_data_sha256(data: bytes) -> str:
    """``0x`` + sha256 of a safetensors file's tensor bytes (everything after the header), as modelspec hashes."""
    n = int.from_bytes(data[:8], "little")
    return "0x" + hashlib.sha256(data[8 + n:]).hexdigest()


def export_safetensors(source: Source, sampling: Sampling, output: str | os.PathLike, force: bool = False) -> Path:
    """Write the single file ``output`` (atomically; an existing one only with ``force``)."""
    from ..artifacts import atomic_write_bytes

    out = Path(output)
    if out.suffix != ".safetensors":
        out = out / f"{source.path.name if source.path.is_dir() else source.path.stem}.safetensors"
    if out.exists() and not force:
        raise AccelkitError(f"-o {out}: exists; pass --force to replace it")
    if out.exists() and out.is_dir():
        raise AccelkitError(f"-o {out}: is a directory; expected a .safetensors file name")
    tensors, meta = single_file_contents(source, sampling)
    meta["modelspec.hash_sha256"] = tensor_data_sha256(safetensors_bytes(tensors, meta))
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, safetensors_bytes(tensors, meta))
    return out


# ----------------------------------------------------------------------------------------------------------------
# The one entry point


def default_format(source: Source, output: str | os.PathLike) -> str:
    """``safetensors`` for an output ending in ``.safetensors`` or a network with no diffusers model class
    (accelkit's built-in MLP and SmallUNet), else ``diffusers``."""
    if str(output).endswith(".safetensors") or not _architecture(source.teacher)[0].startswith("diffusers."):
        return "safetensors"
    return "diffusers"


def export(path: str | os.PathLike, output: str | os.PathLike, fmt: str | None = "diffusers", *,
           solver: str | Solver | None = None,
           nfe: int | None = None, grid: str | list[float] | None = None, shift: float | None = None,
           force: bool = False, **load_kwargs: Any) -> tuple[Path, Sampling]:
    """Export ``path`` to ``output`` in format ``fmt`` (None: :func:`default_format`); returns the written path and
    the sampler it carries."""
    if fmt is not None and fmt not in FORMATS:
        raise AccelkitError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    source = open_source(path, **load_kwargs)
    fmt = fmt or default_format(source, output)
    if isinstance(solver, str):
        from ..solvers import get_solver, solver_names
        from ..solvers.learned import check_solver_teacher, is_learned_solver

        if solver not in solver_names() and is_learned_solver(solver):  # a bespoke artifact: its own NFE and times
            check_solver_teacher(solver, path, force)
            solver = get_solver(solver)
            if not getattr(solver, "own_times", True):
                raise AccelkitError(f"--solver {solver.name}: DPM-Solver-v3's per-element statistics do not fit an "
                                    "exported scheduler; export with a standard or bespoke solver")
            nfe = getattr(solver, "nfe", None) if nfe is None else nfe
    sampling = resolve_sampling(source, solver, nfe, grid, shift)
    written = _write(source, sampling, path, output, fmt, force)
    from ..console import log

    log(f"export: scheduler {scheduler_choice(source, sampling)}")
    return written, sampling


def _write(source: Source, sampling: Sampling, path: str | os.PathLike, output: str | os.PathLike, fmt: str,
           force: bool) -> Path:
    if fmt == "diffusers" and sampling.solver in ("shortcut", "meanflow"):
        raise AccelkitError(f"{path}: a {sampling.solver} student takes its jump size as an input at every step, "
                            "which diffusers' pipelines do not feed; export it with --format safetensors")
    if fmt == "diffusers":
        return export_diffusers(source, sampling, output, force)
    if fmt in ("lora", "kohya"):
        from .lora import export_lora

        return export_lora(source, sampling, output, fmt, force)
    return export_safetensors(source, sampling, output, force)


__all__ = ["export", "export_diffusers", "export_safetensors", "open_source", "resolve_sampling", "Sampling",
           "Source", "stock_scheduler", "diffusers_scheduler", "FORMATS", "RECORD_FILE", "EXPORT_FORMAT"]
