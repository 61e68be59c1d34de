"""consistency: few-step consistency students from a teacher (CD, LCM, PCM) or tuned on data (ECT, SCT).

SOURCE is a couple artifact (its teacher is the student's start; its teacher samples serve as the data x0) or a
teacher with ``data`` (:func:`accelkit.stages.student.begin_source_run`). The student keeps the teacher's network,
prediction type and schedule; its consistency function is Song et al.'s parameterisation over the teacher's x0
prediction, exact at the smallest time, or for a DDPM teacher of discrete timesteps LCM's boundary on them (``boundary``
auto / lcm), which diffusers' LCMScheduler samples step for step (:mod:`accelkit.consistency` has the equations and the
papers):

* ``cd``: consistency distillation: target = an EMA copy (``target_ema``, 0.95) of the student at the teacher's one
  solver step (``solver``, ``solver_nfe``) over one interval of the teacher's ``discretisation``-step grid;
* ``lcm``: CD through the classifier-free-guided teacher (accelkit's scale g: out_null + g (out_cond - out_null);
  LCM's w = g - 1): at one scale ``guidance`` (LCM-LoRA's form with ``loop.lora``), or with g drawn per example from
  ``guidance_range`` and given to the student as the extra input ``guidance`` (:mod:`accelkit.extra_inputs`, zero
  initialised), so one student serves every g in the range and ``accelkit sample --guidance G`` picks it;
* ``pcm``: ``phases`` M phases with edges on the teacher's grid; the student's jump to the phase's lower edge matches
  its own (stop-gradient) jump from the teacher-stepped point; sampled with one DDIM jump per phase;
* ``ect``: consistency tuning on data: lognormal noise levels, the r(t) curriculum (q, doubling every
  ``stage_steps``), shared noise, the stop-gradient target with the same dropout state, 1 / (t - r) weighting;
* ``sct``: ECT with the variance-reduced target point from a reference batch of ``reference_size`` x0 samples.

Training runs on :class:`accelkit.training.Trainer` (checkpoints, exact resume after ``kill -9`` including the EMA
target, NaN guard, DDP, LoRA). The artifact holds ``teacher.safetensors`` (the student, with its parameterisation in
its info), ``history.json``, and records its sampler in ``summary.sampling``: ``consistency`` (multistep with
re-noising, :mod:`accelkit.solvers.consistency`; ``tcd`` for ect, SCT's ``edge-skip`` for sct) at ``sampling_nfe``
steps, or ``ddim`` / ``euler`` on the phase edges
for PCM, so ``accelkit sample`` / ``couple`` / ``eval`` use it without flags.
"""

from __future__ import annotations

import copy
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from ..console import log
from ..errors import AccelkitError
from ..jobs import barrier
from ..recipes import StageRecipe, register_stage
from ..training import LOOP_EXECUTION_FIELDS, GroupSettings, LoopConfig, ParamGroup, Trainer
from . import student as students

KIND = "consistency"
METHODS = ("cd", "lcm", "pcm", "ect", "sct")
#: The recipe keys each method reads (beside the common ones); the others stay out of its identity.
METHOD_FIELDS = {
    "cd": ("discretisation", "solver", "solver_nfe", "target_ema", "boundary"),
    "lcm": ("discretisation", "solver", "solver_nfe", "target_ema", "guidance", "guidance_range", "boundary"),
    "pcm": ("discretisation", "solver", "solver_nfe", "phases", "guidance", "adversarial_weight", "disc",
            "disc_layers", "disc_width", "disc_depth", "adversarial_real", "adversarial_span", "disc_held_out"),
    "ect": ("ect_q", "stage_steps", "p_mean", "p_std", "boundary"),
    "sct": ("ect_q", "stage_steps", "p_mean", "p_std", "reference_size", "boundary"),
}
#: Sinusoidal features of g * 100 (the time embedding's features take t * 1000 for t in [0, 1]; g spans ~1-15).
GUIDANCE_INPUT_SCALE = 100.0
OPTIONAL = sorted({k for v in METHOD_FIELDS.values() for k in v})


def default_loop() -> LoopConfig:
    return LoopConfig(steps=2000, lr=1e-4, warmup_steps=50, ema_rates=[0.999], checkpoint_every=500)


class ConsistencyRecipe(students.SourceRecipe):
    """consistency: a CD / LCM / PCM / ECT / SCT consistency student of a teacher."""

    execution_fields = frozenset({"device"})

    method: Literal["cd", "lcm", "pcm", "ect", "sct"] = Field(
        "cd", description="cd, lcm (guided CD), pcm (phased), ect or sct (consistency tuning on data)")
    loss: Literal["l2", "pseudo-huber"] = Field("pseudo-huber", description="distance between student and target")
    huber_c: float | None = Field(None, gt=0, description="pseudo-Huber c (None: 0.00054 sqrt(elements per sample))")
    discretisation: int = Field(32, ge=1, description="cd / lcm / pcm: N steps of the teacher's grid")
    solver: str = Field("ddim", description="cd / lcm / pcm: the teacher's solver over one grid interval")
    solver_nfe: int = Field(1, ge=1, description="cd / lcm / pcm: teacher evaluations per interval")
    target_ema: float = Field(0.95, ge=0, lt=1, description="cd / lcm: EMA rate of the target network")
    guidance: float | None = Field(None, description="lcm / pcm: the teacher's guidance scale g in the solver step "
                                                     "(accelkit's scale; LCM's w = g - 1)")
    guidance_range: tuple[float, float] | None = Field(
        None, description="lcm: draw the guidance scale g per example from [A, B] and give it to the student as the "
                          "extra input 'guidance' (zero-initialised), so one student serves every g in the range "
                          "(`accelkit sample --guidance G`)")
    phases: int = Field(4, ge=1, description="pcm: M phases (the student's sampling steps)")
    adversarial_weight: float = Field(0.0, ge=0, description="pcm: weight of the adversarial term (0: off; PCM uses "
                                                             "0.1): hinge loss of heads on the frozen teacher's "
                                                             "features at noised jumps")
    disc: GroupSettings = Field(default_factory=lambda: GroupSettings(lr=1e-5),
                                description="pcm with adversarial_weight > 0: the heads' optimizer settings")
    disc_layers: list[str] | Literal["auto"] = Field("auto", description="pcm adversarial: the teacher layers the "
                                                                         "heads read")
    disc_width: int = Field(64, ge=4, description="pcm adversarial: the heads' width")
    disc_depth: int = Field(1, ge=1, description="pcm adversarial: hidden layers of each head (2-3 for a 2-D "
                                                 "teacher's plain features)")
    disc_held_out: int = Field(2048, ge=16, description="pcm adversarial: samples per side of the heads' held-out "
                                                         "accuracy check (validate steps)")
    adversarial_real: Literal["target", "data"] = Field(
        "target", description="pcm adversarial: the real side the heads judge at s': 'target' (PCM's code: the "
                              "teacher-stepped target's jump, noised forward) or 'data' (the clean samples x0 of the "
                              "batch, noised to s': the teacher's / data's marginal there)")
    adversarial_span: float = Field(1.0, gt=0, le=1, description="pcm adversarial: s' is drawn in [e, e + span (1 - e) "
                                                                 "/ M) (1: the whole of PCM's interval; less keeps "
                                                                 "the judged inputs closer to the phase edge e)")
    ect_q: float = Field(2.0, gt=1, description="ect / sct: q of the r(t) curriculum")
    stage_steps: int | None = Field(None, ge=1, description="ect / sct: steps per curriculum stage (t - r shrinks by "
                                                             "q); default a quarter of loop.steps (4 stages in any "
                                                             "run)")
    p_mean: float = Field(-1.1, description="ect / sct: mean of log sigma")
    p_std: float = Field(2.0, gt=0, description="ect / sct: standard deviation of log sigma")
    reference_size: int = Field(64, ge=1, description="sct: x0 samples in each reference batch")
    boundary: Literal["auto", "edm", "lcm"] = Field(
        "auto", description="the consistency parameterisation: edm (Song et al.'s c_skip / c_out in EDM terms), lcm "
                            "(LCM's on a DDPM teacher's discrete timesteps, which diffusers' LCMScheduler samples "
                            "exactly) or auto (lcm for a DDPM teacher of discrete steps, else edm)")
    sampling_nfe: int | None = Field(None, ge=1, description="the recorded sampling steps (default 1; pcm: phases)")
    sampler: Literal["consistency", "tcd", "edge-skip"] | None = Field(
        None, description="the recorded multistep sampler (not pcm): consistency (full re-noising; default for cd and "
                          "lcm), tcd (gamma 0.3; default for ect, which improves 1 -> 2 -> 4 steps with it on the 2-D "
                          "teachers and not with full re-noising) or edge-skip (SCT's edge-skipping: tcd whose inner "
                          "evaluations sit a quarter interval past each edge; default for sct)")
    batch_size: int = Field(256, ge=1, description="global batch size (over all processes)")
    seed: int = Field(0, ge=0, description="seeds the batch order, the times and the noise")
    loop: LoopConfig = Field(default_factory=default_loop)
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda or cuda:N")

    @model_validator(mode="after")
    def _consistent(self) -> ConsistencyRecipe:
        if self.batch_size % self.loop.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of loop.grad_accum "
                             f"{self.loop.grad_accum}")
        if self.method == "pcm" and self.discretisation % self.phases:
            raise ValueError(f"phases {self.phases} does not divide the teacher's grid of discretisation "
                             f"{self.discretisation} steps; expected a divisor (e.g. phases 1, 2, 4 with 32 steps)")
        if self.method == "lcm" and (self.guidance is None) == (self.guidance_range is None):
            raise ValueError("method lcm distils the guided teacher: give either its guidance scale (accelkit's g; "
                             "LCM's w = g - 1), e.g. --guidance 3, or a range for the student's guidance input, e.g. "
                             "--guidance-range 1,4")
        if self.guidance_range is not None:
            lo, hi = self.guidance_range
            if self.method != "lcm":
                raise ValueError(f"guidance_range {list(self.guidance_range)}: the student's guidance input belongs "
                                 f"to lcm, not to {self.method}")
            if not lo <= hi:
                raise ValueError(f"guidance_range {list(self.guidance_range)}: expected A <= B")
        if self.adversarial_weight > 0 and self.method != "pcm":
            raise ValueError(f"adversarial_weight {self.adversarial_weight}: the adversarial term belongs to pcm")
        if self.adversarial_weight > 0 and self.loop.lora is not None:
            raise ValueError("pcm's adversarial term trains two networks (student and heads); it does not take "
                             "loop.lora")
        if self.guidance is not None and self.method not in ("lcm", "pcm"):
            raise ValueError(f"guidance {self.guidance}: the guided solver step belongs to lcm and pcm, not to "
                             f"{self.method}")
        from ..solvers import get_solver

        try:
            get_solver(self.solver).steps(self.solver_nfe)
        except AccelkitError as e:
            raise ValueError(f"solver {self.solver!r} with solver_nfe {self.solver_nfe}: {e}") from None
        return self

    def identity_dict(self) -> dict[str, Any]:
        d = super().identity_dict()
        for k in OPTIONAL:
            if k not in METHOD_FIELDS[self.method]:
                d.pop(k, None)
        d["loop"] = {k: v for k, v in d["loop"].items() if k not in LOOP_EXECUTION_FIELDS}
        if "stage_steps" in d:  # the steps it resolves to (the default 2000-step recipe keeps its identity)
            d["stage_steps"] = self.curriculum_stage_steps
        return d

    @property
    def curriculum_stage_steps(self) -> int:
        """ect / sct: steps per stage of the r(t) curriculum: ``stage_steps``, or a quarter of the run, so that every
        run passes through 4 stages (a fixed length left a run shorter than it in stage 0: r = t_min for most noise
        levels, plain denoising; docs/benchmarks.md, digits)."""
        return self.stage_steps if self.stage_steps is not None else max(1, self.loop.steps // 4)

    @property
    def recorded_nfe(self) -> int:
        if self.sampling_nfe is not None:
            return self.sampling_nfe
        return self.phases if self.method == "pcm" else 1


# ------------------------------------------------------------------------------------------------------ sampling


def teacher_grid(schedule, steps: int, t_min: float = 0.0) -> Tensor:
    """The teacher's ``steps``-step grid from 1 to ``t_min`` (its default spacing), float64."""
    from ..solvers.grids import default_grid, make_grid

    return make_grid(default_grid(schedule), steps, t_min=t_min, schedule=schedule)


def phase_edges(schedule, discretisation: int, phases: int) -> Tensor:
    """PCM's M + 1 phase edges 1 = e_0 > ... > e_M = 0: every (N / M)-th time of the teacher's N-step grid."""
    return teacher_grid(schedule, discretisation)[:: discretisation // phases]


def recommended_sampling(recipe: ConsistencyRecipe, schedule, param=None) -> dict[str, Any]:
    """The sampler the student is made for: phase jumps (pcm) or the multistep consistency sampler (on LCMScheduler's
    own timesteps for a student with LCM's boundary, so the stock scheduler runs it)."""
    if recipe.method == "pcm":
        edges = phase_edges(schedule, recipe.discretisation, recipe.phases)
        solver = "euler" if schedule.name == "linear" else "ddim"
        nfe = recipe.phases
        return {"solver": solver, "nfe": nfe, "grid": [round(float(v), 10) for v in edges]}
    nfe = recipe.recorded_nfe
    solver = recipe.sampler or {"ect": "tcd", "sct": "edge-skip"}.get(recipe.method, "consistency")
    if param is not None and param.lcm:
        from ..consistency import lcm_grid

        return {"solver": solver, "nfe": nfe, "grid": lcm_grid(schedule, nfe)}
    return {"solver": solver, "nfe": nfe, "grid": [round(float(v), 10) for v in teacher_grid(schedule, nfe)]}


# ------------------------------------------------------------------------------------------------------- checks


def check_source(recipe: ConsistencyRecipe):
    """What the method cannot take, found before anything is written."""
    def check(run: students.StudentRun) -> None:
        ref = run.reference
        assert ref is not None
        conditioning = ref.info.get("conditioning", {}).get("kind", "none")
        guided = recipe.guidance if recipe.guidance is not None else recipe.guidance_range
        if guided is not None and (conditioning == "none" or ref.null_condition is None):
            raise AccelkitError(f"{run.teacher_path}: guidance {guided} needs a conditional teacher with a null "
                                "condition; this teacher is unconditional")
        if recipe.boundary == "lcm" and recipe.method != "pcm":
            from ..schedules import DiscreteVPSchedule

            if not isinstance(ref.schedule, DiscreteVPSchedule):
                raise AccelkitError(f"boundary lcm: LCM's boundary condition is on a DDPM teacher's discrete "
                                    f"timesteps; {run.teacher_path} has the {ref.schedule.name} schedule (use "
                                    "boundary edm or auto)")
        if run.data is not None and conditioning != "none" and run.conditions is None:
            raise AccelkitError(f"data {recipe.data!r}: the teacher is conditional ({conditioning}) and the data has "
                                "no conditions; give --prompt / --prompts (or --conditions FILE), or its couplings "
                                "as SOURCE instead")
    return check


# ------------------------------------------------------------------------------------------------------------ run


def run_consistency(recipe: ConsistencyRecipe, output: Path | None = None, force: bool = False) -> Path:
    """Train (or reuse, or resume) the consistency student of ``recipe``; returns the artifact directory."""
    run = students.begin_source_run(KIND, recipe, output, force, check=check_source(recipe))
    path = run.path
    try:
        if run.complete:
            return path
        job = ConsistencyJob(recipe, run)
        begin = time.perf_counter()
        trainer = job.train()
        if run.rank == 0:
            job.finish(trainer, time.perf_counter() - begin)
            shutil.rmtree(path / "checkpoint", ignore_errors=True)
        barrier()
        return path
    finally:
        run.close()


class ConsistencyJob:
    """One consistency run: the method's per-batch draws and loss over the shared Trainer."""

    def __init__(self, recipe: ConsistencyRecipe, run: students.StudentRun):
        from ..consistency import Parameterisation

        self.recipe, self.run = recipe, run
        assert run.start is not None and run.reference is not None
        self.start, self.reference = run.start, run.reference.to(run.device)
        if recipe.guidance is not None:
            self.reference.guidance_scale = float(recipe.guidance)
        if recipe.guidance_range is not None:
            from ..extra_inputs import ExtraInput, attach_extra_inputs, extra_inputs_of

            if not any(spec.name == "guidance" for spec in extra_inputs_of(self.start.network)):
                attach_extra_inputs(self.start, [ExtraInput("guidance", "scalar", scale=GUIDANCE_INPUT_SCALE)])
        self.schedule = self.start.schedule
        self.param = Parameterisation.for_teacher(self.schedule, recipe.boundary)
        self.shape = tuple(self.start.sample_shape)
        self.trainer: Trainer | None = None
        self.target_network: students.EmaTarget | None = None

    # ---------------------------------------------------------------------------------------------------- draws

    def grid(self) -> Tensor:
        """cd / lcm: the N-step grid from 1 to t_min; pcm: from 1 to 0 (its last phase ends at the data)."""
        t_min = self.param.t_min if self.recipe.method in ("cd", "lcm") else 0.0
        return teacher_grid(self.schedule, self.recipe.discretisation, t_min)

    def draw(self, generator: torch.Generator, n: int) -> dict[str, Tensor]:
        out = {"eps": torch.randn(n, *self.shape, generator=generator)}
        if self.recipe.method in ("cd", "lcm", "pcm"):
            out["i"] = torch.randint(0, self.recipe.discretisation, (n,), generator=generator)
            if self.recipe.adversarial_weight > 0:  # the noise level above the phase edge and the noise there
                out["u"] = torch.rand(n, generator=generator, dtype=torch.float64)
                out["n"] = torch.randn(n, *self.shape, generator=generator)
                out["n_real"] = torch.randn(n, *self.shape, generator=generator)  # the real side's own noise
            if self.recipe.guidance_range is not None:
                lo, hi = self.recipe.guidance_range
                out["g"] = lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)
        else:
            out["z"] = torch.randn(n, generator=generator, dtype=torch.float64)
        return out

    # ---------------------------------------------------------------------------------------------------- model

    def model(self, network: torch.nn.Module):
        """``network`` as a teacher of the student's kind (the start's call: with its extra inputs, if any)."""
        return students.student_of(self.start, network)

    def ema_target(self) -> torch.nn.Module:
        """The target network of cd / lcm: a frozen copy of the student holding its EMA at ``target_ema`` (the
        Trainer's own average, so checkpoints and resume carry it)."""
        assert self.trainer is not None
        if self.target_network is None:
            self.target_network = students.EmaTarget(self.trainer, float(self.recipe.target_ema))
        return self.target_network()

    # ---------------------------------------------------------------------------------------------------- losses

    def loss_fn(self):
        from ..consistency import (
            consistency_function,
            ddim_jump,
            ect_pair_times,
            per_sample_distance,
            same_dropout,
            sct_target_point,
            teacher_step,
        )
        from ..extra_inputs import with_extra_inputs
        from ..objectives import condition_of
        from ..teacher import broadcast_to

        recipe, param, sch, device = self.recipe, self.param, self.schedule, self.run.device
        method = recipe.method
        grid = self.grid().to(device) if method in ("cd", "lcm", "pcm") else None
        per = recipe.discretisation // recipe.phases

        def noised(x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
            return broadcast_to(sch.alpha(t), x0) * x0 + broadcast_to(sch.sigma(t), x0) * eps

        def distance(diff: Tensor, weight: Tensor | None = None):
            d = per_sample_distance(diff, recipe.loss, recipe.huber_c)
            return (d * weight.to(d)).mean() if weight is not None else d.mean()

        def cd_loss(network: torch.nn.Module, batch: dict[str, Tensor]):
            x0, eps, cond = students.clean_samples(batch).float(), batch["eps"], condition_of(batch)
            t, s = grid[batch["i"]], grid[batch["i"] + 1]
            x_t = noised(x0, eps, t)
            g = batch.get("g")
            seen = cond if g is None else with_extra_inputs(cond, guidance=g.float())  # the student's condition
            with torch.no_grad():
                x_phi = teacher_step(self.reference, x_t, t, s, cond, recipe.solver, recipe.solver_nfe, scale=g)
                target = consistency_function(self.model(self.ema_target()), param, x_phi, s, seen)
            pred = consistency_function(self.model(network), param, x_t, t, seen)
            return distance(pred.float() - target.float())

        def pcm_jumps(network: torch.nn.Module, batch: dict[str, Tensor]):
            """(prediction, target, lower edge e) of PCM: the student's jump from x_{t_n} to its phase's lower
            edge, and its stop-gradient jump from the teacher-stepped x^phi at t_{n+1}."""
            x0, eps, cond, i = students.clean_samples(batch).float(), batch["eps"], condition_of(batch), batch["i"]
            t, s, e = grid[i], grid[i + 1], grid[(i // per + 1) * per]
            x_t = noised(x0, eps, t)
            student = self.model(network)
            with torch.no_grad():
                x_phi = teacher_step(self.reference, x_t, t, s, cond, recipe.solver, recipe.solver_nfe)
                at_edge = broadcast_to((s == e).to(x_phi.dtype), x_phi)
                jump = same_dropout(lambda: ddim_jump(student, x_phi, s, e, cond), device)()
                target = at_edge * x_phi + (1 - at_edge) * torch.nan_to_num(jump)
            pred = ddim_jump(student, x_t, t, e, cond)
            return pred, target, e

        def pcm_loss(network: torch.nn.Module, batch: dict[str, Tensor]):
            pred, target, _ = pcm_jumps(network, batch)
            return distance(pred.float() - target.float())

        self.pcm_jumps = pcm_jumps
        self.distance = distance

        def ect_loss(network: torch.nn.Module, batch: dict[str, Tensor]):
            x0, eps, cond = students.clean_samples(batch).float(), batch["eps"], condition_of(batch)
            stage = self.trainer.step // recipe.curriculum_stage_steps if self.trainer is not None else 0
            t, r, weight = (v.to(device) for v in ect_pair_times(param, batch["z"].cpu(), stage, recipe.ect_q,
                                                                 recipe.p_mean, recipe.p_std))
            x_t = noised(x0, eps, t)
            if method == "sct":
                x_r = torch.empty_like(x_t)
                labels = cond.class_labels if cond is not None else None
                for lo in range(0, x0.shape[0], recipe.reference_size):
                    rows = slice(lo, lo + recipe.reference_size)
                    same = labels[rows, None] == labels[None, rows] if labels is not None else None
                    x_r[rows] = sct_target_point(x_t[rows], t[rows], r[rows], sch, x0[rows], same)
            else:
                x_r = noised(x0, eps, r)
            student = self.model(network)

            def target_fn() -> Tensor:
                with torch.no_grad():
                    return consistency_function(student, param, x_r, r, cond)

            target = same_dropout(target_fn, device)()
            pred = consistency_function(student, param, x_t, t, cond)
            return distance(pred.float() - target.float(), weight)

        return {"cd": cd_loss, "lcm": cd_loss, "pcm": pcm_loss, "ect": ect_loss, "sct": ect_loss}[method]

    # ---------------------------------------------------------------------------------------------------- train

    def loop_config(self) -> LoopConfig:
        """The recipe's loop, with the cd / lcm target's EMA rate added after the evaluation rates."""
        loop = self.recipe.loop
        if self.recipe.method in ("cd", "lcm") and float(self.recipe.target_ema) not in loop.ema_rates:
            loop = loop.model_copy(update={"ema_rates": [*loop.ema_rates, float(self.recipe.target_ema)]})
        return loop

    def train(self) -> Trainer:
        recipe, run = self.recipe, self.run
        art = run.art
        sampler = run.batches(recipe.batch_size, recipe.seed, noise=self.draw)

        def on_log(step: int, values: dict[str, float]) -> None:
            if art is not None:
                art.progress = {"step": step, "steps": recipe.loop.steps, "loss": values.get("loss")}

        network = self.start.network
        if recipe.adversarial_weight > 0:
            model, groups = self.adversarial_groups()
            self.trainer = Trainer(model, None, sampler, self.loop_config(), checkpoint_dir=run.path / "checkpoint",
                                   device=run.device, on_log=on_log, groups=groups, validate_fn=self.validate_fn)
        else:
            self.trainer = Trainer(network, self.loss_fn(), sampler, self.loop_config(),
                                   checkpoint_dir=run.path / "checkpoint", device=run.device, on_log=on_log)
        if art is not None:
            art.progress = {"step": 0, "steps": recipe.loop.steps}
        self.trainer.fit()
        barrier()
        return self.trainer

    def adversarial_groups(self):
        """PCM's adversarial term (Wang et al. 2024, sec. 4.3): the student's jump to the phase edge e, noised
        forward from e to s' in [e, e + (1 - e) / M), is judged against a real side at s' by heads on the frozen
        teacher's features (:class:`accelkit.discriminator.FeatureDiscriminator`), hinge losses

            L_D = E ReLU(1 - D(real)) + E ReLU(1 + D(pred)),      L_student = L_PCM - w E D(pred),

        two parameter groups of one Trainer (the heads with their own optimizer settings ``disc``). The real side
        (``adversarial_real``): ``target``, the teacher-stepped target's jump noised forward as PCM's code does, or
        ``data``, the batch's clean samples x0 noised straight to s' (alpha_s' x0 + sigma_s' n: the teacher's /
        data's marginal at s', which the student's noised jumps should follow). Each side has its own noise (PCM's
        code draws them apart): with one shared noise the two inputs differ only by the PCM residual, nearly zero
        by design, and the heads sit at chance. The heads' accuracy on a held-out batch (:meth:`held_out_check`)
        is recorded at the validate steps."""
        from .. import discriminator as gan
        from ..data import stream_seed
        from ..objectives import condition_of
        from ..teacher import broadcast_to

        recipe, sch = self.recipe, self.schedule
        self.loss_fn()  # defines self.pcm_jumps and self.distance
        held_out = self.held_out_check()
        with torch.random.fork_rng(devices=[]):  # the heads' initial weights: seeded, so a run repeats
            torch.manual_seed(stream_seed(recipe.seed, 0xAD))
            disc = gan.FeatureDiscriminator(self.reference, recipe.disc_layers, recipe.disc_width,
                                            probe=held_out["probe"], depth=recipe.disc_depth)
        model = torch.nn.ModuleDict({"student": self.start.network, "discriminator": disc})
        width = recipe.adversarial_span / recipe.phases

        def level(e: Tensor, batch: dict[str, Tensor]) -> Tensor:
            return (e + width * (1.0 - e) * batch["u"]).clamp(max=1.0)

        def renoise(x_e: Tensor, e: Tensor, s_up: Tensor, noise: Tensor) -> Tensor:
            a_e, s_e, a_u, s_u = sch.alpha(e), sch.sigma(e), sch.alpha(s_up), sch.sigma(s_up)
            ratio = a_u / a_e
            spread = (s_u**2 - (ratio * s_e) ** 2).clamp(min=0).sqrt()
            return broadcast_to(ratio, x_e) * x_e + broadcast_to(spread, x_e) * noise

        def real_side(target: Tensor, e: Tensor, s_up: Tensor, batch: dict[str, Tensor]) -> Tensor:
            if recipe.adversarial_real == "data":
                x0 = batch["real"] if "real" in batch else students.clean_samples(batch).float()
                return broadcast_to(sch.alpha(s_up), x0) * x0 + broadcast_to(sch.sigma(s_up), x0) * batch["n_real"]
            return renoise(target, e, s_up, batch["n_real"])

        def judged(m: torch.nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
            with torch.no_grad():
                pred, target, e = self.pcm_jumps(m["student"], batch)
            s_up, cond = level(e, batch), condition_of(batch)
            return (disc(real_side(target, e, s_up, batch), s_up, cond),
                    disc(renoise(pred, e, s_up, batch["n"]), s_up, cond))

        def disc_loss(m: torch.nn.Module, batch: dict[str, Tensor]):
            real, fake = judged(m, batch)
            loss = torch.relu(1.0 - real).mean() + torch.relu(1.0 + fake).mean()
            return loss, {"d_loss": loss.detach(), "d_acc": torch.tensor(gan.accuracy(real.detach(), fake.detach()))}

        def student_loss(m: torch.nn.Module, batch: dict[str, Tensor]):
            pred, target, e = self.pcm_jumps(m["student"], batch)
            pcm = self.distance(pred.float() - target.float())
            s_up = level(e, batch)
            adv = -disc(renoise(pred, e, s_up, batch["n"]), s_up, condition_of(batch)).mean()
            return pcm + recipe.adversarial_weight * adv, {"pcm_loss": pcm.detach(), "adv_loss": adv.detach()}

        def validate(tr: Trainer) -> dict[str, float]:  # the heads on a batch they never train on
            real, fake = judged(model, held_out["batch"])
            return {"disc_accuracy": gan.accuracy(real, fake)}

        self.validate_fn = validate
        self.held_out = held_out
        groups = [ParamGroup("discriminator", disc, disc_loss, recipe.disc.model_copy(update={"ema": False})),
                  ParamGroup("student", model["student"], student_loss, GroupSettings(ema=True))]
        return model, groups

    def held_out_check(self) -> dict[str, Any]:
        """The heads' held-out batch: draws of another seed than the run's and, for the ``data`` real side, real
        samples no training batch holds (:func:`accelkit.stages.generator_student.held_out_real`); 256 more real
        samples noised at drawn levels (``probe``) fix the heads' per-channel feature standardisation."""
        from ..data import seeded_generator
        from ..teacher import broadcast_to
        from .generator_student import held_out_real

        recipe, run, sch = self.recipe, self.run, self.schedule
        n = recipe.disc_held_out
        b = next(run.batches(n, recipe.seed + 7919, noise=self.draw, whole=True))  # the same on every process
        batch: dict[str, Any] = {k: v.to(run.device) if isinstance(v, Tensor) else v for k, v in b.items()}
        fresh, what = held_out_real(recipe, run, n + 256, recipe.seed + 7919)
        if fresh is None:
            rows = students.clean_samples(batch).float()
            fresh = torch.cat([rows, rows[:256]])
        fresh = fresh.to(run.device)
        if recipe.adversarial_real == "data":
            batch["real"] = fresh[:n]
        g = seeded_generator(recipe.seed + 7919, 0x9B)
        t = (0.02 + 0.96 * torch.rand(256, generator=g, dtype=torch.float64)).to(run.device)
        x0 = fresh[n:]
        noise = torch.randn(x0.shape, generator=g).to(run.device)
        probe = (broadcast_to(sch.alpha(t), x0) * x0 + broadcast_to(sch.sigma(t), x0) * noise, t, None)
        return {"batch": batch, "probe": probe, "real_is": what if recipe.adversarial_real == "data" else
                "target jumps of held-out rows", "samples_per_side": n}

    def finish(self, trainer: Trainer, seconds: float) -> None:
        recipe, run = self.recipe, self.run
        if trainer.groups:  # the adversarial run: the student group's EMA
            network = copy.deepcopy(self.start.network)
            network.load_state_dict(trainer.ema_weights(group="student"))
            network.eval().requires_grad_(False)
            rate = trainer.config.ema_rates[0] if trainer.config.ema_rates else None
            weights = f"ema {rate}" if rate is not None else "raw"
        else:
            network, weights = students.averaged_network(trainer)
        sampling = recommended_sampling(recipe, self.schedule, self.param)
        info = {"trained_by": "accelkit consistency", "method": recipe.method, "steps": trainer.step,
                "weights": weights, "seed": recipe.seed, "source": str(recipe.source), "sampling": sampling,
                "consistency": self.param.config()}
        model = students.student_of(self.start, network, info)
        summary: dict[str, Any] = {
            "method": recipe.method, "sampling": sampling, "parameterisation": {
                **self.param.config(), "s_min": self.param.s_min, "t_min": self.param.t_min},
            "prediction_type": model.prediction, "schedule": model.schedule.config(),
            "sample_shape": list(model.sample_shape), "data": recipe.data or "couplings",
            "steps": trainer.step, "final_loss": trainer.history[-1].get("loss") if trainer.history else None,
            "weights": weights, "processes": run.world, "seconds_last_run": round(seconds, 3),
        }
        if trainer.groups:
            accs = [h["discriminator/d_acc"] for h in trainer.history if "discriminator/d_acc" in h]
            held = [h["val/disc_accuracy"] for h in trainer.history if "val/disc_accuracy" in h]
            summary["adversarial"] = {"weight": recipe.adversarial_weight, "updates": dict(trainer.updates),
                                      "real_side": recipe.adversarial_real,
                                      "disc_accuracy_through_run": held,
                                      "disc_held_out": {"samples_per_side": self.held_out["samples_per_side"],
                                                        "real": self.held_out["real_is"]},
                                      "disc_train_batch_accuracy_through_run": accs}
        if recipe.method in ("ect", "sct"):
            per = recipe.curriculum_stage_steps
            summary["curriculum"] = {"stage_steps": per, "q": recipe.ect_q, "last_stage": (trainer.step - 1) // per}
        if recipe.method in ("lcm", "pcm") and recipe.guidance is not None:
            summary["guidance"] = {"scale": recipe.guidance, "lcm_w": recipe.guidance - 1.0}
        if recipe.guidance_range is not None:
            lo, hi = recipe.guidance_range
            summary["guidance"] = {"input": "guidance", "range": [lo, hi], "lcm_w_range": [lo - 1.0, hi - 1.0],
                                   "convention": "accelkit's g (out_null + g (out_cond - out_null)); LCM's w = g - 1"}
        log(f"consistency: {recipe.method} student after {trainer.step} steps ({weights}); sampled with "
            f"{sampling['solver']} at {sampling['nfe']} NFE")
        assert run.art is not None
        run.art.progress = {"step": trainer.step, "steps": recipe.loop.steps}
        students.save_student(run.art, model, trainer.history, summary)


def _run(recipe: StageRecipe, output: Path | None, force: bool) -> Path:
    assert isinstance(recipe, ConsistencyRecipe)
    return run_consistency(recipe, output, force)


register_stage(KIND, ConsistencyRecipe, _run)

__all__ = ["ConsistencyRecipe", "run_consistency", "recommended_sampling", "phase_edges", "KIND", "METHODS"]
