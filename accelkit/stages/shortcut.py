"""shortcut: a self-consistency student of a teacher, sampled in one or a few jumps: shortcut models or MeanFlow.

The student is the teacher's network with one more zero-initialised input (:mod:`accelkit.extra_inputs`), so at the
start it is the teacher at every value of that input, and it is trained on the linear path z_t = (1 - t) x0 + t eps
(t = 1 noise). A teacher on another schedule or prediction type is read on that path through the scale-time
transformation (:mod:`accelkit.linear_path`); the student keeps the teacher's network, schedule and prediction type,
is loaded under the same transformation (its header records ``rescaled_to``), and the artifact's summary says so.

* ``--method shortcut`` (Frans et al. 2024, :mod:`accelkit.shortcut`): the input is the step size d
  (``step_size``). The finest level d = 1 / ``finest_steps`` (the paper's 1/128) is anchored to flow matching on the
  clean samples (target eps - x0, ``anchor data``) or to the teacher's velocity (``anchor teacher``: a distillation);
  a share ``consistency_share`` (the paper's 1/8) of each batch learns s(z_t, t, 2d) from two jumps of size d of the
  EMA student (the loop's first EMA rate; the paper's 0.999), with the intermediate state and the target clipped to
  [-clip, clip] (the paper's 4). Sampled with N equal jumps of 1/N, N a power of two up to ``finest_steps``.
* ``--method meanflow`` (Geng et al. 2025, :mod:`accelkit.meanflow`): the input is the interval t - r
  (``interval``); the target is the MeanFlow identity u = v - (t - r) du/dt with one JVP (``derivative: jvp``,
  torch.func.jvp in fp32) or a central finite difference (``finite-difference``; ``auto`` takes the JVP and falls
  back when the network has no forward-mode derivative; the summary says which ran), v the data velocity eps - x0
  or the teacher's; adaptive loss weight (power ``adaptive_power``); a share ``interval_share`` (the paper's 25 %) of
  the pairs with r != t. Sampled with one average-velocity jump (or a few).

Guidance (a class- or text-conditional teacher with a null condition; the source must be couplings with their
conditions): ``guidance`` W bakes accelkit's scale g = W into every target, as the paper does (the anchor's velocity
is v_null + W (v - v_null) with the teacher's null velocity, and the EMA student's jumps follow it); ``guidance_range``
[A, B] goes beyond the paper: g ~ U(A, B) per sample is one more zero-initialised input (``guidance``), so one student
serves every scale in the range and ``accelkit sample --guidance G`` picks one. Without either, couplings made with
guidance keep the couplings' scale in the teacher's targets.

SOURCE is a couple artifact (the student starts from its teacher; the clean samples x0 are the couplings' teacher
samples, noised with fresh seeded noise) or a teacher with ``data`` (:func:`accelkit.stages.student.begin_source_run`).
Training runs on :class:`accelkit.training.Trainer` (checkpoints, exact resume after kill -9, EMA, LoRA through
``loop.lora``, DDP). The artifact holds ``teacher.safetensors`` (the student's EMA weights with its extra inputs) and
``history.json``; its summary records the sampler (``sampling``: ``shortcut`` or ``meanflow`` with its NFE and grid),
which ``sample`` / ``couple`` / ``eval`` use without flags, and, for couplings without guidance settings, the RMSE of
the student's and the teacher's samples to the couplings' at 1, 2, 4 and 8 evaluations.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from ..console import log
from ..errors import AccelkitError
from ..recipes import StageRecipe, register_stage
from ..training import LOOP_EXECUTION_FIELDS, LoopConfig, Trainer
from . import student as students

KIND = "shortcut"
METHODS = ("shortcut", "meanflow")
SHORTCUT_FIELDS = ("finest_steps", "consistency_share", "clip")
MEANFLOW_FIELDS = ("interval_share", "times", "logit_mean", "logit_std", "adaptive_power", "adaptive_c", "derivative",
                   "fd_step")
QUALITY_NFES = (1, 2, 4, 8)
#: MeanFlow's interval t - r enters through sinusoidal features of (t - r) itself (scale 1): at the time embedding's
#: usual 1000 the features wiggle so fast in t - r that the JVP's du/dt is mostly that wiggle. On the 2-D teacher
#: (600 steps, 1-jump sliced W2 to the data; the teacher's best 1-NFE solver 1.28): 0.57 at scale 1000, 0.31 at 20,
#: 0.22 at 1 (data velocity); 0.13 at 20, 0.09 at 1 (teacher velocity, uniform times, p = 0.5).
INTERVAL_SCALE = 1.0


def default_loop() -> LoopConfig:
    return LoopConfig(steps=2000, lr=2e-4, warmup_steps=50, ema_rates=[0.999], checkpoint_every=500)


class ShortcutRecipe(students.SourceRecipe):
    """shortcut: a shortcut-model or MeanFlow student of a teacher, sampled in one or a few jumps."""

    execution_fields = frozenset({"device", "eval_samples"})

    method: Literal["shortcut", "meanflow"] = Field("shortcut", description="shortcut: step-size input, "
                                                    "self-consistency of two half jumps; meanflow: average velocity "
                                                    "with the interval as input, MeanFlow identity")
    anchor: Literal["data", "teacher"] = Field("data", description="the velocity the student is anchored to: the "
                                               "clean samples' eps - x0 (flow matching) or the teacher's own")
    guidance: float | None = Field(None, description="bake this guidance scale g into the targets (1 = none)")
    guidance_range: tuple[float, float] | None = Field(
        None, description="[A, B]: the guidance scale as one more input, g ~ U(A, B) per sample")
    nfe: int = Field(1, ge=1, description="the recorded sampler's jumps (shortcut: a power of two)")
    finest_steps: int = Field(128, ge=2, description="shortcut: the finest level d = 1 / finest_steps (a power of "
                                                     "two; the paper's 128)")
    consistency_share: float = Field(0.125, gt=0, lt=1, description="shortcut: share of each batch on the "
                                                                    "self-consistency target (the paper's 1/8)")
    clip: float | None = Field(4.0, gt=0, description="shortcut: clip the intermediate state and the target to "
                                                      "[-clip, clip] (None: no clipping)")
    interval_share: float = Field(0.25, ge=0, le=1, description="meanflow: share of (r, t) pairs with r != t")
    times: Literal["logit-normal", "uniform"] = Field("logit-normal", description="meanflow: the density of the two "
                                                      "times (the paper's logit-normal)")
    logit_mean: float = Field(-0.4, description="meanflow: logit-normal time density, mean")
    logit_std: float = Field(1.0, gt=0, description="meanflow: logit-normal time density, standard deviation")
    adaptive_power: float = Field(1.0, ge=0, description="meanflow: p of the adaptive weight 1/(||D||^2 + c)^p "
                                                         "(0: plain L2)")
    adaptive_c: float = Field(1e-3, gt=0, description="meanflow: c of the adaptive weight")
    derivative: Literal["auto", "jvp", "finite-difference"] = Field(
        "auto", description="meanflow: du/dt by torch.func.jvp, by a central finite difference, or auto (JVP, the "
                            "finite difference where the network has no forward-mode derivative)")
    fd_step: float = Field(1e-3, gt=0, description="meanflow: the finite difference's step h")
    batch_size: int = Field(256, ge=1, description="global batch size (over all processes)")
    seed: int = Field(0, ge=0, description="seeds the sample order, the times, the noise and the guidance draws")
    loop: LoopConfig = Field(default_factory=default_loop)
    eval_samples: int = Field(1000, ge=0, description="couplings for the final quality record (0: skip)")
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda or cuda:N")

    @model_validator(mode="after")
    def _consistent(self) -> ShortcutRecipe:
        from ..shortcut import check_steps, is_power_of_two

        if self.batch_size % self.loop.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of loop.grad_accum "
                             f"{self.loop.grad_accum}")
        if self.guidance is not None and self.guidance_range is not None:
            raise ValueError("give either guidance (a baked scale) or guidance_range (the scale as an input), not "
                             "both")
        if self.guidance_range is not None and not self.guidance_range[0] < self.guidance_range[1]:
            raise ValueError(f"guidance_range {list(self.guidance_range)}: expected A < B")
        if self.method == "shortcut":
            if not is_power_of_two(self.finest_steps):
                raise ValueError(f"finest_steps {self.finest_steps}: the step sizes are d = 2^-k, so the finest "
                                 "level 1 / finest_steps needs a power of two (e.g. 64, 128)")
            try:
                check_steps(self.nfe, self.levels, "nfe")
            except AccelkitError as e:
                raise ValueError(str(e)) from None
        return self

    @property
    def levels(self) -> int:
        """K with finest step 2^-K."""
        return self.finest_steps.bit_length() - 1

    def identity_dict(self) -> dict[str, Any]:
        d = super().identity_dict()
        for k in (MEANFLOW_FIELDS if self.method == "shortcut" else SHORTCUT_FIELDS):
            d.pop(k, None)
        d["loop"] = {k: v for k, v in d["loop"].items() if k not in LOOP_EXECUTION_FIELDS}
        return d


# ------------------------------------------------------------------------------------------------------ the student


def student_inputs(recipe: ShortcutRecipe) -> list:
    """The extra inputs of the student: the step size (default: the finest level, so any solver sees the flow) or the
    interval (default 0: the instantaneous velocity), and the guidance scale over a range."""
    from ..extra_inputs import ExtraInput
    from ..solvers.self_consistency import INTERVAL, STEP_SIZE

    inputs = [ExtraInput(STEP_SIZE, default=1.0 / recipe.finest_steps) if recipe.method == "shortcut"
              else ExtraInput(INTERVAL, scale=INTERVAL_SCALE, default=0.0)]
    if recipe.guidance_range is not None:
        inputs.append(ExtraInput("guidance", scale=100.0, default=1.0))
    return inputs


def check_guidance(recipe: ShortcutRecipe, teacher, path: Path) -> None:
    if recipe.guidance is None and recipe.guidance_range is None:
        return
    flag = "--guidance-range" if recipe.guidance_range is not None else "--guidance"
    kind = teacher.info.get("conditioning", {}).get("kind", "none") if hasattr(teacher, "info") else "none"
    if kind == "none" or getattr(teacher, "null_condition", None) is None:
        raise AccelkitError(f"{path}: {flag} needs a conditional teacher with a null condition; this teacher is "
                            "unconditional")
    if recipe.conditions is None and (recipe.data is not None or not students.is_couplings(recipe.source)):
        raise AccelkitError(f"{flag}: guidance needs the conditions of couplings (SOURCE a couple artifact "
                            "made with --conditions or a class teacher, without --data)")


def resolve_derivative(recipe: ShortcutRecipe, student, path: Path) -> str:
    """meanflow: the derivative that will run (``jvp`` or ``finite-difference``), probed on the student's start (with
    its extra inputs); a network without forward-mode derivatives under ``derivative: jvp`` is a one-line error."""
    from ..meanflow import NoForwardDerivative, average_velocity_derivative

    if recipe.method != "meanflow":
        return "none"
    if recipe.derivative == "finite-difference":
        return "finite-difference"
    probe = copy.deepcopy(student)
    u_fn = average_velocity_fn(probe, None)
    z = torch.randn(2, *probe.sample_shape, generator=torch.Generator().manual_seed(0))
    r, t = torch.full((2,), 0.25, dtype=torch.float64), torch.full((2,), 0.75, dtype=torch.float64)
    try:
        average_velocity_derivative(u_fn, z, r, t, torch.ones_like(z), "jvp")
    except NoForwardDerivative as e:
        if recipe.derivative == "jvp":
            raise AccelkitError(f"{path}: derivative jvp: the network has no forward-mode derivative for "
                                f"torch.func.jvp ({e}); --set shortcut.derivative=finite-difference (or auto) uses "
                                "the finite-difference fallback") from None
        log(f"shortcut: the network has no forward-mode derivative ({str(e)[:80]}...); MeanFlow's du/dt by a central "
            f"finite difference, h = {recipe.fd_step}")
        return "finite-difference"
    return "jvp"


def on_linear_path(reference, network: nn.Module):
    """``network`` as a teacher of the reference's kind, read on the linear path."""
    from ..linear_path import linear_path_teacher

    return linear_path_teacher(students.student_of(reference, network))


def average_velocity_fn(student_teacher, cond, guidance: Tensor | None = None):
    """u(z, r, t) of a MeanFlow student teacher (a NetworkTeacher with the ``interval`` input)."""
    from ..extra_inputs import with_extra_inputs
    from ..linear_path import linear_path_teacher
    from ..solvers.self_consistency import INTERVAL

    lin = linear_path_teacher(student_teacher)

    def u(z: Tensor, r: Tensor, t: Tensor) -> Tensor:
        values: dict[str, Tensor] = {INTERVAL: (t - r).float()}
        if guidance is not None:
            values["guidance"] = guidance.float()
        return lin.velocity(z, t, with_extra_inputs(cond, **values))

    return u


# ------------------------------------------------------------------------------------------------------------ losses


class SelfConsistencyLoss:
    """The loss of ``recipe.method`` over a batch, and the per-sample draws it needs (see the module docstring)."""

    def __init__(self, recipe: ShortcutRecipe, reference, sample_shape: tuple[int, ...], derivative: str,
                 default_guidance: float | None):
        from ..linear_path import linear_path_teacher

        self.recipe, self.reference, self.shape, self.derivative = recipe, reference, sample_shape, derivative
        self.teacher = linear_path_teacher(reference.with_guidance(1.0))
        self.baked = recipe.guidance if recipe.guidance is not None else default_guidance
        self.ema: students.EmaTarget | None = None  # set once the trainer exists (shortcut)

    # draws ----------------------------------------------------------------------------------------------------------

    def draw(self, generator: torch.Generator, n: int) -> dict[str, Tensor]:
        from ..meanflow import draw_time_pairs
        from ..shortcut import draw_consistency_times

        recipe = self.recipe
        out: dict[str, Tensor] = {"eps": torch.randn(n, *self.shape, generator=generator)}
        if recipe.method == "shortcut":
            t_flow = torch.rand(n, generator=generator, dtype=torch.float64)
            t_sc, d_sc = draw_consistency_times(generator, n, recipe.levels)
            sc = torch.zeros(n, dtype=torch.bool)
            sc[torch.randperm(n, generator=generator)[: max(1, int(round(n * recipe.consistency_share)))]] = True
            out.update(t=torch.where(sc, t_sc, t_flow), half=torch.where(sc, d_sc, 0.0), consistency=sc,
                       d=torch.where(sc, 2 * d_sc, torch.full_like(d_sc, 1.0 / recipe.finest_steps)))
        else:
            r, t = draw_time_pairs(generator, n, recipe.interval_share, recipe.times, recipe.logit_mean,
                                   recipe.logit_std)
            out.update(r=r, t=t)
        if recipe.guidance_range is not None:
            a, b = recipe.guidance_range
            out["g"] = a + (b - a) * torch.rand(n, generator=generator, dtype=torch.float64)
        return out

    # velocities -----------------------------------------------------------------------------------------------------

    def scales(self, batch: dict[str, Tensor], n: int, device: torch.device) -> Tensor | None:
        if "g" in batch:
            return batch["g"]
        if self.baked is not None and self.baked != 1.0:
            return torch.full((n,), float(self.baked), dtype=torch.float64, device=device)
        return None

    @torch.no_grad()
    def anchor_velocity(self, x0: Tensor, eps: Tensor, z: Tensor, t: Tensor, cond, g: Tensor | None) -> Tensor:
        """The velocity the student is anchored to: the teacher's (guided at g) or the data's eps - x0 (guided at g
        with the teacher's null velocity: v_null + g (eps - x0 - v_null))."""
        from ..linear_path import guided_velocity, null_condition_of
        from ..teacher import broadcast_to

        if self.recipe.anchor == "teacher":
            return guided_velocity(self.teacher, z, t, cond, g).float()
        v = eps - x0
        if g is None or cond is None:
            return v
        v_null = self.teacher.velocity(z, t, null_condition_of(self.teacher, cond, z.shape[0])).float()
        return v_null + broadcast_to(g, v) * (v - v_null)

    # the two losses -------------------------------------------------------------------------------------------------

    def __call__(self, network: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        from ..objectives import condition_of
        from ..teacher import broadcast_to

        x0 = students.clean_samples(batch).float()
        eps, t = batch["eps"].float(), batch["t"]
        cond = condition_of({k: v for k, v in batch.items() if k.startswith("cond.")})
        g = self.scales(batch, x0.shape[0], x0.device)
        z = broadcast_to(1.0 - t, x0) * x0 + broadcast_to(t, x0) * eps
        if self.recipe.method == "shortcut":
            return self.shortcut_loss(network, batch, x0, eps, z, t, cond, g)
        return self.meanflow_loss(network, batch, x0, eps, z, t, cond, g)

    def shortcut_loss(self, network, batch, x0, eps, z, t, cond, g):
        from ..extra_inputs import with_extra_inputs
        from ..objectives import regression_loss
        from ..shortcut import self_consistency_target
        from ..solvers.self_consistency import STEP_SIZE

        def inputs(d: Tensor, gg: Tensor | None) -> dict[str, Tensor]:
            return {STEP_SIZE: d.float(), **({"guidance": gg.float()} if "g" in batch and gg is not None else {})}

        sc = batch["consistency"].bool()
        flow = ~sc
        student = on_linear_path(self.reference, network)
        pred = student.velocity(z, t, with_extra_inputs(cond, **inputs(batch["d"], g))).float()
        target = torch.empty_like(pred)
        pick = (lambda c, rows: c.index(rows) if c is not None else None)
        fl, cs = flow.nonzero().reshape(-1), sc.nonzero().reshape(-1)
        g_fl = g[fl] if g is not None else None
        target[fl] = self.anchor_velocity(x0[fl], eps[fl], z[fl], t[fl], pick(cond, fl), g_fl)
        if len(cs):
            assert self.ema is not None
            ema = on_linear_path(self.reference, self.ema())
            c_sc, g_sc = pick(cond, cs), (g[cs] if g is not None else None)

            def jump(zz: Tensor, tt: Tensor, dd: Tensor) -> Tensor:
                return ema.velocity(zz, tt, with_extra_inputs(c_sc, **inputs(dd, g_sc))).float()

            target[cs] = self_consistency_target(jump, z[cs], t[cs], batch["half"][cs], self.recipe.clip)
        diff = pred - target
        logs = {"loss_flow": regression_loss(diff[fl].detach()) if len(fl) else torch.zeros(()),
                "loss_consistency": regression_loss(diff[cs].detach()) if len(cs) else torch.zeros(())}
        return regression_loss(diff), logs

    def meanflow_loss(self, network, batch, x0, eps, z, t, cond, g):
        from ..meanflow import adaptive_weighted_loss, meanflow_target

        r = batch["r"]
        v = self.anchor_velocity(x0, eps, z, t, cond, g)
        u_fn = average_velocity_fn(students.student_of(self.reference, network), cond,
                                   g if "g" in batch else None)
        with torch.autocast(z.device.type, enabled=False):  # the JVP and its target in fp32
            u, target = meanflow_target(u_fn, z, r, t, v, self.derivative, self.recipe.fd_step)
        diff = u.float() - target.float()
        loss = adaptive_weighted_loss(diff, self.recipe.adaptive_power, self.recipe.adaptive_c)
        return loss, {"mse": diff.detach().pow(2).mean()}


# ----------------------------------------------------------------------------------------------------------- run


def run_shortcut(recipe: ShortcutRecipe, output: Path | None = None, force: bool = False) -> Path:
    """Train (or reuse, or resume) the student of ``recipe``; returns the artifact directory."""
    from ..extra_inputs import attach_extra_inputs

    chosen: dict[str, str] = {}

    def prepare(start) -> None:  # before the artifact is opened, like every check below
        attach_extra_inputs(start, student_inputs(recipe))  # its first layers come from a fixed seed

    def check(run: students.StudentRun) -> None:
        assert run.teacher_path is not None
        check_guidance(recipe, run.reference, run.teacher_path)
        chosen["derivative"] = resolve_derivative(recipe, run.start, run.teacher_path)

    run = students.begin_source_run(KIND, recipe, output, force, prepare=prepare, check=check)
    art, path, device, rank = run.art, run.path, run.device, run.rank
    derivative, teacher_path = chosen.get("derivative", "none"), run.teacher_path
    try:
        if run.complete:
            return path
        start, reference = run.start, run.reference
        assert start is not None and reference is not None and teacher_path is not None
        couplings_guidance = reference.guidance_scale if reference.guidance_scale != 1.0 else None
        loss = SelfConsistencyLoss(recipe, reference.to(device), tuple(start.sample_shape), derivative,
                                   couplings_guidance)
        sampler = run.batches(recipe.batch_size, recipe.seed, noise=loss.draw)

        def hand_ema_to_loss(trainer: Trainer) -> None:  # shortcut targets come from the EMA student
            if recipe.method == "shortcut":
                loss.ema = students.EmaTarget(trainer)

        students.fit_in_artifact(art, path, rank, start.network, loss, sampler, recipe.loop, device,
                                 lambda trainer, logs, seconds: finish(art, recipe, run, reference, trainer, logs,
                                                                       seconds, derivative, teacher_path),
                                 before_fit=hand_ema_to_loss)
        return path
    finally:
        run.close()


def recommended_sampling(recipe: ShortcutRecipe) -> dict[str, Any]:
    """The student's sampler: ``nfe`` equal jumps on the uniform grid of the linear path."""
    grid = torch.linspace(1.0, 0.0, recipe.nfe + 1, dtype=torch.float64)
    return {"solver": recipe.method, "nfe": recipe.nfe, "grid": [round(float(v), 10) for v in grid]}


@torch.no_grad()
def quality(model, reference, run: students.StudentRun, recipe: ShortcutRecipe, device: torch.device
            ) -> dict[str, Any] | None:
    """RMSE of the student's (its sampler) and the teacher's (dpm++2m, euler) samples to the couplings' teacher
    samples from the same noise, at 1, 2, 4 and 8 evaluations; None without couplings or with guidance settings."""
    from ..evaluation import sample_batched
    from ..metrics import rmse
    from ..objectives import condition_of

    if (run.couplings is None or recipe.eval_samples == 0 or recipe.guidance is not None
            or recipe.guidance_range is not None):
        return None
    n = min(recipe.eval_samples, len(run.couplings))
    pairs = run.couplings.get(torch.arange(n))
    cond = condition_of(pairs)
    cond = cond.map(lambda v: v.to(device)) if cond is not None else None
    noise, target = pairs["noise"].to(device), pairs["sample"]
    nfes = [k for k in QUALITY_NFES if recipe.method == "meanflow" or k <= recipe.finest_steps]
    out: dict[str, Any] = {"metric": "rmse to the couplings' teacher ODE samples (same noise)", "samples": n,
                           "student": {}, "teacher_dpm++2m": {}, "teacher_euler": {}}
    for k in nfes:
        out["student"][str(k)] = rmse(sample_batched(model, noise, recipe.method, k, cond=cond).cpu(), target)
        for solver in ("dpm++2m", "euler"):
            out[f"teacher_{solver}"][str(k)] = rmse(sample_batched(reference, noise, solver, k, cond=cond).cpu(),
                                                    target)
    return out


def finish(art, recipe: ShortcutRecipe, run: students.StudentRun, reference, trainer: Trainer,
           logs: dict[str, float], seconds: float, derivative: str, teacher_path: Path) -> None:
    """Write the student (EMA weights, its extra inputs) with its sampler and the path it was trained on; complete."""
    from ..linear_path import linear_path_record, linear_path_teacher
    from ..schedules import LinearSchedule

    network, weights = students.averaged_network(trainer)
    sampling = recommended_sampling(recipe)
    path_record = linear_path_record(reference)
    info: dict[str, Any] = {"trained_by": "accelkit shortcut", "method": recipe.method, "steps": trainer.step,
                            "weights": weights, "seed": recipe.seed, "source": str(recipe.source),
                            "sampling": sampling}
    if recipe.method == "shortcut":
        info["finest_steps"] = recipe.finest_steps
    if reference.schedule.name != "linear":
        info["rescaled_to"] = LinearSchedule().config()  # loaded under the transformation to the linear path
    model = students.student_of(reference, network, info)
    summary: dict[str, Any] = {
        "method": recipe.method, "sampling": sampling, "anchor": recipe.anchor, "linear_path": path_record,
        "guidance": ({"baked": recipe.guidance} if recipe.guidance is not None else
                     {"input": "guidance", "range": list(recipe.guidance_range)} if recipe.guidance_range is not None
                     else None),
        "prediction_type": model.prediction, "schedule": model.schedule.config(),
        "sample_shape": list(model.sample_shape), "steps": trainer.step, "final_loss": logs.get("loss"),
        "weights": weights, "processes": run.world, "seconds_last_run": round(seconds, 3),
        "teacher": str(teacher_path),
    }
    if recipe.method == "shortcut":
        summary["finest_steps"] = recipe.finest_steps
    else:
        summary["derivative"] = derivative
    # the quality record reads the student as every command loads it (under the transformation to the linear path)
    q = quality(linear_path_teacher(model).to(run.device), reference.to(run.device), run, recipe,
                run.device)
    if q is not None:
        summary["quality"] = q
        log(f"shortcut: {recipe.method} student rmse " + ", ".join(f"{k} jumps {v:.4g}" for k, v in
                                                                  q["student"].items())
            + "; teacher dpm++2m " + ", ".join(f"{k}: {v:.4g}" for k, v in q["teacher_dpm++2m"].items()))
    art.progress = {"step": trainer.step, "steps": recipe.loop.steps}
    students.save_student(art, model, trainer.history, summary)


def _run(recipe: StageRecipe, output: Path | None, force: bool) -> Path:
    assert isinstance(recipe, ShortcutRecipe)
    return run_shortcut(recipe, output, force)


register_stage(KIND, ShortcutRecipe, _run)

__all__ = ["ShortcutRecipe", "run_shortcut", "SelfConsistencyLoss", "recommended_sampling", "KIND",
           "METHODS"]
