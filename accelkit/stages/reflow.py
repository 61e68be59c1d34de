"""reflow: a student trained on a teacher's couplings (noise eps_i, ODE sample x0*_i), starting from the teacher.

Both methods regress the student's output at x_t = alpha(t) x0* + sigma(t) eps on the target of its prediction type
built from the pair (eps, x0*) (:class:`accelkit.objectives.DenoisingObjective` on the pairs instead of on data and
fresh noise):

* ``rectified-flow`` (Liu et al. 2022, "Flow straight and fast"): the straight path x_t = (1 - t) x0* + t eps with
  the constant velocity eps - x0* as target (the linear schedule). The teacher must be on the linear schedule (a
  flow-matching / rectified-flow model): its network is the student's start and keeps its prediction type (a flow
  network regresses eps - x0*; an x0, eps or v network on the linear schedule the same line in its own terms). A
  teacher on another schedule is refused: train it with ``--method rectified-diffusion``, which keeps its schedule.
  Repeating couple + reflow on the student gives k-rectified flow (``recipes/toy2d-reflow.yaml``).
* ``rectified-diffusion`` (Wang et al. 2024, "Rectified Diffusion: straightness is not your need"): the teacher's
  own schedule and prediction type: x_t = alpha_t x0* + sigma_t eps* with the pair's own noise, target in the
  teacher's parameterisation (an eps model stays an eps model; on a discrete schedule t stays on its grid).

**Phased form** (``phases`` K > 1; PeRFlow, Yan et al. 2024; phased rectified diffusion, Wang et al. 2024): the
time range is split into K windows; a pair's sample is noised with its own noise to the start of the window holding
its training time, the frozen teacher's ODE is solved across the window (``phase_solver``, ``phase_nfe``) and the
student regresses the straight line of that window, in the teacher's schedule, through the two states
(:mod:`accelkit.phased` gives the equations and the window boundaries). The student is then sampled with one
first-order step per window on the window boundaries; the artifact's summary records it as ``recommended``
(solver, NFE, grid) for ``accelkit sample`` / ``eval --grid``. K = 1 is the method above, on the pairs as they are.

The student's trajectories from eps_i are then (close to) the first-order ODE solution that lands on x0*_i, so one
or two solver steps reach what the teacher needed many for. Times come from ``timesteps`` (uniform, logit-normal or
U-shaped), the loss is L2 or pseudo-Huber (:mod:`accelkit.objectives`).

The student trains all of the teacher's weights, or only LoRA adapters on them (``loop.lora``: rank, alpha,
target_modules; needs peft), which are merged into the weights at the end, so the student has the teacher's
architecture and state-dict keys either way.

The teacher is the ``teacher`` input of the couplings artifact (its recorded path, checked against the recorded
content hash). Training runs on :class:`accelkit.training.Trainer` (checkpoints, exact resume after ``kill -9``,
EMA, NaN guard, DDP under torchrun). The artifact holds ``teacher.safetensors`` (the student's EMA weights in
accelkit's teacher format, so ``accelkit sample`` / ``couple`` / ``load_teacher`` take the artifact) and
``history.json``; its summary gives the straightness (:func:`accelkit.evaluation.straightness`) and the curvature
(:func:`accelkit.evaluation.curvature`) of teacher and student on ``eval_samples`` seeded noises.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from ..artifacts import Artifact
from ..console import log
from ..data import seeded_generator
from ..errors import AccelkitError
from ..recipes import StageRecipe, register_stage
from ..training import LOOP_EXECUTION_FIELDS, LoopConfig, Trainer
from . import student as students

KIND = "reflow"
METHODS = ("rectified-flow", "rectified-diffusion")


def default_loop() -> LoopConfig:
    return LoopConfig(steps=2000, lr=2e-4, warmup_steps=50, ema_rates=[0.999], checkpoint_every=500)


class ReflowRecipe(StageRecipe):
    """reflow: a rectified-flow / rectified-diffusion student trained on a teacher's couplings."""

    input_fields = ("couplings",)
    execution_fields = frozenset({"device", "eval_samples"})

    couplings: str = Field(description="a complete couple artifact (its teacher is the student's start)")
    method: Literal["rectified-flow", "rectified-diffusion"] = Field(
        "rectified-flow", description="rectified-flow: straight paths, linear schedule; rectified-diffusion: the "
                                      "teacher's own schedule and prediction type")
    timesteps: Literal["uniform", "logit-normal", "u-shaped"] = Field("uniform", description="training time density")
    logit_mean: float = Field(0.0, description="logit-normal: mean of the logit")
    logit_std: float = Field(1.0, gt=0, description="logit-normal: standard deviation of the logit")
    u_shape: float = Field(4.0, gt=0, description="u-shaped: a in the density cosh(a (t - 1/2))")
    loss: Literal["l2", "pseudo-huber"] = Field("l2", description="l2 or pseudo-huber on the network output")
    huber_c: float | None = Field(None, gt=0, description="pseudo-Huber c (None: 0.00054 sqrt(elements per sample))")
    loss_space: Literal["output", "x0"] | None = Field(
        None, description="the loss on the network output or on its x0 estimate (None: output for rectified-flow, "
                          "x0 for rectified-diffusion, as Wang et al. train)")
    batch_size: int = Field(256, ge=1, description="global batch size (over all processes)")
    seed: int = Field(0, ge=0, description="seeds the pair order and the training times")
    loop: LoopConfig = Field(default_factory=default_loop)
    phases: int = Field(1, ge=1, description="K windows of the phased (piecewise straight) form; 1: one straight path "
                                           "over the whole time range")
    phase_solver: str = Field("dpm++2m", description="phases > 1: the solver of the teacher's ODE across a window")
    phase_nfe: int = Field(8, ge=1, description="phases > 1: teacher evaluations per window solve")
    phase_start_share: float = Field(0.5, ge=0, lt=1, description="phases > 1: share of the training times moved to "
                                                                  "their window's start, where the sampler evaluates")
    eval_samples: int = Field(1000, ge=0, description="noises for the final straightness check (0: skip)")
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda or cuda:N")

    @model_validator(mode="after")
    def _consistent(self) -> ReflowRecipe:
        if self.batch_size % self.loop.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of loop.grad_accum "
                             f"{self.loop.grad_accum}")
        if self.loss_space is None:
            self.loss_space = "x0" if self.method == "rectified-diffusion" else "output"
        from ..solvers import get_solver

        try:
            get_solver(self.phase_solver).steps(self.phase_nfe)
        except AccelkitError as e:
            raise ValueError(f"phase_solver {self.phase_solver!r} with phase_nfe {self.phase_nfe}: {e}") from None
        return self

    def identity_dict(self) -> dict[str, Any]:
        d = super().identity_dict()
        if self.phases == 1:  # the unphased method: same identity (and default path) as before phases existed
            for k in ("phases", "phase_solver", "phase_nfe", "phase_start_share"):
                d.pop(k, None)
        d["loop"] = {k: v for k, v in d["loop"].items() if k not in LOOP_EXECUTION_FIELDS}
        return d


# ----------------------------------------------------------------------------------------------------- teacher


def warn_if_one_step_is_ill_conditioned(teacher) -> None:
    """An eps network's one DDIM step from t = 1 multiplies its eps error by sigma(1) / alpha(1): say so where that is
    large (DDPM's linear betas: 156), since the student's 1-step samples then lag its 2-step ones."""
    if teacher.prediction != "eps":
        return
    one = torch.ones((), dtype=torch.float64)
    gain = float(teacher.schedule.sigma(one) / teacher.schedule.alpha(one))
    if gain > 50:
        log(f"reflow: this eps teacher's schedule has sigma/alpha = {gain:.0f} at t = 1, so a 1-step sample multiplies "
            "the student's eps error by that much; expect it to shine at 2+ NFE (docs/benchmarks.md, Students)")


def phase_windows(recipe: ReflowRecipe, couplings: Artifact, device: torch.device):
    """phases > 1: the frozen teacher (with the couplings' guidance) and its windows; None for the unphased form."""
    if recipe.phases == 1:
        return None
    from ..models.loading import load_teacher
    from ..phased import PhaseWindows

    guidance = couplings.manifest.get("recipe", {}).get("guidance")
    teacher = load_teacher(students.couplings_teacher_path(couplings, "reflow"), dtype="fp32", guidance=guidance)
    teacher.eval().requires_grad_(False)
    return PhaseWindows(teacher.to(device), recipe.phases, recipe.phase_solver, recipe.phase_nfe,
                        recipe.phase_start_share)


# ----------------------------------------------------------------------------------------------------------- run


def run_reflow(recipe: ReflowRecipe, output: Path | None = None, force: bool = False) -> Path:
    """Train (or reuse, or resume) the student of ``recipe``; returns the artifact directory."""
    from ..objectives import DenoisingObjective, condition_of

    run = students.begin_student_run(KIND, recipe, output, force)
    art, path, device, rank, world = run.art, run.path, run.device, run.rank, run.world
    try:
        if run.complete:
            return path
        teacher, reference, couplings, couplings_art = run.start, run.reference, run.couplings, run.couplings_artifact
        if recipe.method == "rectified-flow" and teacher.schedule.name != "linear":
            raise AccelkitError(f"{students.couplings_teacher_path(couplings_art, KIND)}: --method rectified-flow "
                                "needs a teacher on the linear schedule; this one is on "
                                f"{teacher.schedule.name!r} (use --method rectified-diffusion, which keeps its "
                                "schedule)")
        if rank == 0 and recipe.method == "rectified-diffusion" and recipe.phases == 1:
            warn_if_one_step_is_ill_conditioned(teacher)
        objective = DenoisingObjective(teacher.schedule, teacher.prediction, teacher.call, teacher.time_input,
                                       times=recipe.timesteps, loss_kind=recipe.loss, huber_c=recipe.huber_c,
                                       logit_mean=recipe.logit_mean, logit_std=recipe.logit_std,
                                       u_shape=recipe.u_shape, loss_space=recipe.loss_space)
        windows = phase_windows(recipe, couplings_art, device)

        def draw_times(generator: torch.Generator, n: int) -> dict[str, torch.Tensor]:
            t = objective.draw_times(generator, n)
            if windows is not None:  # a share of the times at their window's start, where the sampler looks
                t = windows.snap_to_starts(t, torch.rand(n, generator=generator, dtype=torch.float64))
            return {"t": t}

        sampler = couplings.sampler(recipe.batch_size, recipe.seed, rank, world, noise=draw_times)

        def loss_fn(network: torch.nn.Module, batch: dict[str, torch.Tensor]):
            pairs = {"x": batch["sample"], "eps": batch["noise"], "t": batch["t"]}
            pairs.update({k: v for k, v in batch.items() if k.startswith("cond.")})
            if windows is not None:  # the straight line of each pair's window replaces the pair
                pairs["x"], pairs["eps"] = windows.straight_pairs(pairs["x"], pairs["eps"], pairs["t"],
                                                                  condition_of(pairs))
            return objective.loss(network, pairs)

        students.fit_in_artifact(art, path, rank, teacher.network, loss_fn, sampler, recipe.loop, device,
                                 lambda trainer, logs, seconds: finish(art, recipe, couplings_art, reference, trainer,
                                                                       logs, seconds, world, device))
        return path
    finally:
        run.close()


def finish(art: Artifact, recipe: ReflowRecipe, couplings: Artifact, reference, trainer: Trainer,
           logs: dict[str, float], seconds: float, world: int, device: torch.device) -> None:
    """Write the student (EMA weights) as teacher.safetensors and history.json, measure straightness, complete."""
    from ..evaluation import curvature, straightness
    from ..phased import recommended_sampling

    network, weights = students.averaged_network(trainer)
    info = {"trained_by": "accelkit reflow", "method": recipe.method, "steps": trainer.step, "weights": weights,
            "seed": recipe.seed, "couplings": str(couplings.path), "rounds": int(reference.info.get("rounds", 0)) + 1}
    model = students.student_of(reference, network, info)
    summary: dict[str, Any] = {
        "method": recipe.method, "phases": recipe.phases,
        "sampling": recommended_sampling(model.schedule, recipe.phases),
        "prediction_type": model.prediction, "schedule": model.schedule.config(),
        "sample_shape": list(model.sample_shape), "couplings": couplings.manifest["summary"].get("samples"),
        "steps": trainer.step, "final_loss": logs.get("loss"), "weights": info["weights"], "processes": world,
        "rounds": info["rounds"], "seconds_last_run": round(seconds, 3),
    }
    conditional = any(k.startswith("cond.") for k in couplings.manifest["summary"].get("keys", []))
    if recipe.eval_samples > 0 and not conditional:  # a conditional student's straightness needs its conditions
        noise = torch.randn(recipe.eval_samples, *model.sample_shape,
                            generator=seeded_generator(recipe.seed, 5)).to(device)
        summary["straightness"] = {"teacher": straightness(reference.to(device), noise),
                                   "student": straightness(model.to(device), noise),
                                   "samples": recipe.eval_samples, "nfe": 64}
        summary["curvature"] = {"teacher": curvature(reference.to(device), noise),
                                "student": curvature(model.to(device), noise),
                                "samples": recipe.eval_samples, "nfe": 64, "unit": "radians"}
        s, k = summary["straightness"], summary["curvature"]
        log(f"reflow: straightness {s['student']:.4g} (teacher {s['teacher']:.4g}), curvature {k['student']:.4g} rad "
            f"(teacher {k['teacher']:.4g})")
    art.progress = {"step": trainer.step, "steps": recipe.loop.steps}
    students.save_student(art, model, trainer.history, summary)


def _run(recipe: StageRecipe, output: Path | None, force: bool) -> Path:
    assert isinstance(recipe, ReflowRecipe)
    return run_reflow(recipe, output, force)


register_stage(KIND, ReflowRecipe, _run)

__all__ = ["ReflowRecipe", "run_reflow", "KIND", "METHODS"]
