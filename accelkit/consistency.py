"""Consistency models over any teacher: the parameterisation, the targets of CD, LCM, ECT, SCT and PCM.

**EDM terms.** A teacher on any schedule x_t = alpha_t x0 + sigma_t eps is, in EDM's coordinates (Karras et al.
2022), the state x_EDM = x_t / alpha_t at noise level s = sigma_t / alpha_t. Every formula below is in those terms.

**Parameterisation** (Song et al. 2023, "Consistency models", eq. 7 and appendix C). The consistency function maps a
state at time t to the start of its probability-flow trajectory, with the boundary condition f(x, t_min) = x:

    f(x, t) = c_skip(s) x_EDM + c_out(s) F(x, t),
    c_skip(s) = sd^2 / ((s - s_min)^2 + sd^2),     c_out(s) = sd (s - s_min) / sqrt(s^2 + sd^2),

with sd = 0.5 and s_min = max(0.002, s(0)) (t_min the time of s_min; the boundary holds exactly there: c_skip = 1,
c_out = 0). F is the network in EDM's own preconditioning, read off the teacher network's x0 prediction
x0_hat = c_skip_EDM(s) x_EDM + c_out_EDM(s) F with c_skip_EDM = sd^2 / (s^2 + sd^2), c_out_EDM = s sd / sqrt(s^2 +
sd^2) (for an EDM network F is its raw output; an eps, x0, v or flow network gives x0_hat through its own prediction
type). Substituting, c_out / c_out_EDM = 1 - s_min / s, and on the teacher's own x_t:

    f(x_t, t) = A x_t + B (x0_hat - C x_t),
    A = sd^2 alpha / ((sigma - s_min alpha)^2 + sd^2 alpha^2),  C = sd^2 alpha / (sigma^2 + sd^2 alpha^2),
    B = 1 - s_min alpha / sigma,

finite at both ends (alpha = 0 at t = 1 on the linear schedule gives f = x0_hat). So the student starts as the
teacher's denoiser away from the boundary, f(x, t_min) = x_t / alpha(t_min) exactly for any network, and the student
keeps the teacher's network, prediction type and schedule (:class:`Parameterisation`).

For a DDPM teacher of N discrete steps the student takes LCM's boundary instead (Luo et al. 2023; diffusers'
LCMScheduler): f = c_skip(n) x_t + c_out(n) x0_hat on the network's timestep n = t N - 1 with c_skip = sd^2 / ((10
n)^2 + sd^2), c_out = 10 n / sqrt((10 n)^2 + sd^2), exact (f = x_t) at n = 0, so the stock LCMScheduler runs the
student step for step (``boundary`` in the recipe; :class:`Parameterisation` with ``timestep_scaling``).

**Targets** (per sample; the student's output f_theta(x_t, t) regresses the target with L2 or pseudo-Huber):

* ``cd`` (Song et al. 2023, consistency distillation): on the teacher's N-step grid 1 = t_0 > ... > t_N = t_min,
  n ~ U{0..N-1}, x_{t_n} = alpha x0 + sigma eps, x^phi = one teacher solver step t_n -> t_{n+1}; target
  f_{theta^-}(x^phi, t_{n+1}) with theta^- an EMA of the student (mu = 0.95) (:func:`teacher_step`).
* ``lcm`` (Luo et al. 2023, latent consistency models): CD whose solver step is the classifier-free-guided teacher's:
  x0^g = x0_null + g (x0_c - x0_null) in accelkit's scale g (LCM's w = g - 1; g = 1 unguided), g fixed or drawn per
  example from a range (:func:`guided_denoise`).
* ``ect`` (Geng et al. 2024, "Consistency models made easy"): tuning on data; s_t ~ LogNormal(-1.1, 2.0),
  s_r = max(0, s_t (1 - q^-(k+1) (1 + 8 sigmoid(-s_t)))) at curriculum stage k (doubling every ``stage_steps``),
  shared noise (x_r = alpha_r x0 + sigma_r eps), target f_theta(x_r, r) without gradient and with the same dropout
  state, loss (sqrt(||D||^2 + c^2) - c) / (s_t - s_r) (:func:`ect_pair_times`).
* ``sct`` (Wang et al. 2024, "Stable consistency tuning"): ECT whose target point comes from the score identity over
  a reference batch {x0_i} (including the x0 that made x_t): w_i = softmax_i(-||x_t - alpha_t x0_i||^2 /
  (2 sigma_t^2)), x0bar = sum_i w_i x0_i, epsbar = (x_t - alpha_t x0bar) / sigma_t, x_r = alpha_r x0bar + sigma_r
  epsbar. As the batch grows x0bar -> E[x0 | x_t] (:func:`reference_x0_estimate`); one sample gives ECT back.
* ``pcm`` (Wang et al. 2024, "Phased consistency model"): M phases with edges on the teacher's N-step grid; inside
  phase m with lower edge e, the student's DDIM jump from x_{t_n} to e matches the jump (no gradient) of the
  teacher-stepped point x^phi at t_{n+1} (:func:`ddim_jump`); sampling is one jump per phase.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import AccelkitError
from .schedules import DiscreteVPSchedule, Schedule, as_time
from .teacher import Condition, NetworkTeacher, Teacher, broadcast_to

SIGMA_DATA = 0.5
SIGMA_MIN = 0.002
#: LCM's boundary scaling k in c_skip = sd^2 / ((k n)^2 + sd^2) (diffusers' LCMScheduler default).
LCM_TIMESTEP_SCALING = 10.0
#: LCMScheduler's ``original_inference_steps`` (the skip grid its timesteps are taken from).
LCM_ORIGINAL_STEPS = 50


# ------------------------------------------------------------------------------------------------ parameterisation


@dataclass(frozen=True)
class Parameterisation:
    """Song et al.'s c_skip / c_out over a teacher's schedule, in EDM terms (see the module docstring); or, with
    ``timestep_scaling`` set (a DDPM teacher of N discrete steps), LCM's boundary on the network's timestep n = t N - 1
    (Luo et al. 2023; diffusers' LCMScheduler with ``timestep_scaling``, 10 by default):

        f(x_t, t) = c_skip(n) x_t + c_out(n) x0_hat,   c_skip = sd^2 / ((k n)^2 + sd^2),   c_out = k n / sqrt((k n)^2
        + sd^2),   k = timestep_scaling,

    exact (f = x_t) at the first training step n = 0 (t_min = 1 / N). Students in this form sample with the stock
    LCMScheduler step for step (:func:`accelkit.export.exporter.stock_scheduler`)."""

    schedule: Schedule
    sigma_data: float = SIGMA_DATA
    sigma_min: float = SIGMA_MIN
    timestep_scaling: float | None = None

    def __post_init__(self) -> None:
        if self.timestep_scaling is not None and not isinstance(self.schedule, DiscreteVPSchedule):
            raise AccelkitError(f"LCM's boundary condition (timestep_scaling {self.timestep_scaling}) is on a DDPM "
                                f"teacher's discrete timesteps; this teacher's schedule is {self.schedule.name}")

    @property
    def lcm(self) -> bool:
        """LCM's boundary on discrete timesteps (else Song et al.'s in EDM terms)."""
        return self.timestep_scaling is not None

    @property
    def s_min(self) -> float:
        """The smallest EDM noise level: ``sigma_min`` or the schedule's own at t = 0 when that is larger (LCM's
        boundary: the level at the first training step)."""
        if self.lcm:
            return float(self.edm_sigma(torch.tensor(self.t_min, dtype=torch.float64)))
        zero = torch.zeros((), dtype=torch.float64)
        s0 = float(self.schedule.sigma(zero) / self.schedule.alpha(zero))
        return max(self.sigma_min, s0)

    @property
    def t_min(self) -> float:
        """The time of :attr:`s_min`: where the boundary condition f(x, t_min) = x holds exactly."""
        if self.lcm:
            return 1.0 / self.schedule.num_train_timesteps  # type: ignore[attr-defined]
        zero = torch.zeros((), dtype=torch.float64)
        if float(self.schedule.sigma(zero) / self.schedule.alpha(zero)) >= self.sigma_min:
            return 0.0
        return float(self.schedule.t_of_log_snr(torch.tensor(-2.0 * math.log(self.sigma_min), dtype=torch.float64)))

    def edm_sigma(self, t: Tensor) -> Tensor:
        t = as_time(t)
        return self.schedule.sigma(t) / self.schedule.alpha(t)

    def time_of_edm_sigma(self, s: Tensor) -> Tensor:
        """The time t with sigma_t / alpha_t = s (float64)."""
        return self.schedule.t_of_log_snr(-2.0 * torch.log(as_time(s)))

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(A, B, C) of f = A x_t + B (x0_hat - C x_t) at times t (float64; t clamped to t_min from below)."""
        t = as_time(t).clamp(min=self.t_min)
        sd2 = self.sigma_data**2
        if self.lcm:  # A = c_skip(n), B = c_out(n), C = 0 on the network's timestep n = t N - 1
            k = (t * self.schedule.num_train_timesteps - 1.0).clamp(min=0.0) * self.timestep_scaling  # type: ignore
            return sd2 / (k**2 + sd2), k / torch.sqrt(k**2 + sd2), torch.zeros_like(k)
        a, s = self.schedule.alpha(t), self.schedule.sigma(t)
        s_min = self.s_min
        A = sd2 * a / ((s - s_min * a) ** 2 + sd2 * a**2)
        C = sd2 * a / (s**2 + sd2 * a**2)
        B = torch.where(s > 0, 1.0 - s_min * a / s.clamp(min=1e-300), torch.zeros_like(s))
        return A, B, C

    def apply(self, x: Tensor, t: Tensor, x0_hat: Tensor) -> Tensor:
        """f(x, t) from the network's x0 prediction at (x, t)."""
        A, B, C = (broadcast_to(c, x) for c in self.coefficients(t))
        return A * x + B * (x0_hat - C * x)

    def boundary_value(self, x_min: Tensor) -> Tensor:
        """f at t_min of the state x_min there: x_min / alpha(t_min) (EDM coordinates), x_min itself for LCM's."""
        if self.lcm:
            return x_min
        return x_min / float(self.schedule.alpha(torch.tensor(self.t_min, dtype=torch.float64)))

    def config(self) -> dict[str, float]:
        cfg = {"sigma_data": self.sigma_data, "sigma_min": self.sigma_min}
        if self.lcm:
            cfg.update(boundary="lcm", timestep_scaling=self.timestep_scaling)
        return cfg

    @staticmethod
    def of(model: Teacher) -> Parameterisation:
        """The parameterisation a consistency student records in its info (Song et al.'s defaults otherwise)."""
        cfg = (getattr(model, "info", None) or {}).get("consistency") or {}
        scaling = cfg.get("timestep_scaling") if cfg.get("boundary") == "lcm" else None
        return Parameterisation(model.schedule, float(cfg.get("sigma_data", SIGMA_DATA)),
                                float(cfg.get("sigma_min", SIGMA_MIN)),
                                float(scaling) if scaling is not None else None)

    @staticmethod
    def for_teacher(schedule: Schedule, boundary: str = "auto",
                    timestep_scaling: float = LCM_TIMESTEP_SCALING) -> Parameterisation:
        """A new student's parameterisation: ``lcm`` (LCM's boundary on discrete timesteps), ``edm`` (Song et al.'s)
        or ``auto`` (LCM's for a DDPM teacher of discrete steps, so diffusers' LCMScheduler samples it exactly;
        Song et al.'s otherwise)."""
        if boundary == "auto":
            boundary = "lcm" if isinstance(schedule, DiscreteVPSchedule) else "edm"
        if boundary not in ("lcm", "edm"):
            raise AccelkitError(f"boundary {boundary!r}: expected auto, edm or lcm")
        return Parameterisation(schedule, timestep_scaling=timestep_scaling if boundary == "lcm" else None)


def lcm_grid(schedule: Schedule, nfe: int, original_steps: int = LCM_ORIGINAL_STEPS) -> list[float]:
    """LCMScheduler's default timesteps for ``nfe`` steps as accelkit times (training step n at t = (n + 1) / N),
    ending at 0: the skip grid n_k = k c - 1 (k = 1 .. original_steps, c = N // original_steps), reversed, at the
    indices floor(linspace(0, original_steps, nfe, endpoint=False)) (diffusers' ``set_timesteps``)."""
    n = schedule.num_train_timesteps  # type: ignore[attr-defined]
    if not 1 <= nfe <= original_steps:
        raise AccelkitError(f"NFE {nfe}: LCM's grid has at most its original_inference_steps {original_steps} steps")
    c = n // original_steps
    origin = [k * c - 1 for k in range(original_steps, 0, -1)]
    picked = [origin[int(math.floor(i * original_steps / nfe))] for i in range(nfe)]
    return [(k + 1.0) / n for k in picked] + [0.0]


def consistency_function(model: Teacher, param: Parameterisation, x: Tensor, t: Tensor,
                         cond: Condition | None = None) -> Tensor:
    """f(x, t) of ``model`` (its x0 prediction through :class:`Parameterisation`), differentiable."""
    t = as_time(t, x.device).clamp(min=param.t_min)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    return param.apply(x, t, model.predict_x0(x, t, cond))


def exact_consistency_function(teacher: Teacher, param: Parameterisation, x: Tensor, t: float,
                               nfe: int = 64, solver: str = "dpm++3m") -> Tensor:
    """The exact consistency function of a teacher (for tests with the analytic one): its ODE solved from t to t_min
    with ``nfe`` accurate steps, in the parameterisation's coordinates (:meth:`Parameterisation.boundary_value`)."""
    from .solvers import solve

    t_min = param.t_min
    if t <= t_min:
        return param.boundary_value(x)
    end = solve(teacher, x, solver=solver, nfe=nfe, grid="logsnr",
                t_max=float(t), t_min=t_min)
    return param.boundary_value(end)


# --------------------------------------------------------------------------------------------------- teacher steps


def guided_denoise(teacher: NetworkTeacher, x: Tensor, t: Tensor, cond: Condition | None,
                   scale: Tensor | float | None) -> tuple[Tensor, Tensor]:
    """(x0, eps) of the classifier-free-guided teacher at per-example scales g (accelkit's convention: out_null +
    g (out_cond - out_null); LCM's w = g - 1): two forward passes, combined per example in x0 and eps (both affine in
    the network output). ``scale`` None: the teacher as it is (its own guidance scale)."""
    if scale is None or cond is None:
        return teacher.denoise(x, t, cond)
    plain = teacher.with_guidance(1.0)
    if teacher.null_condition is None:
        raise AccelkitError("guidance needs a teacher with a null condition (e.g. a class model's null class)")
    b = x.shape[0]
    null = teacher.null_condition(cond) if callable(teacher.null_condition) else teacher.null_condition
    null = null.map(lambda v: (v.expand(b, *v.shape[1:]) if v.shape[0] == 1 else v).to(x.device))
    x0_c, eps_c = plain.denoise(x, t, cond)
    x0_u, eps_u = plain.denoise(x, t, null)
    g = broadcast_to(torch.as_tensor(scale, dtype=torch.float64, device=x.device), x)
    return x0_u + g * (x0_c - x0_u), eps_u + g * (eps_c - eps_u)


def ddim_jump(model: Teacher, x: Tensor, t: Tensor, s: Tensor, cond: Condition | None = None,
              denoised: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """x_s = alpha_s x0_hat + sigma_s eps_hat with (x0_hat, eps_hat) at (x, t) (per-sample times; differentiable):
    DDIM's deterministic update, a PCM phase jump, Euler's step on the linear schedule."""
    x0, eps = denoised if denoised is not None else model.denoise(x, t, cond)
    sch = model.schedule
    return broadcast_to(sch.alpha(s), x) * x0 + broadcast_to(sch.sigma(s), x) * eps


@torch.no_grad()
def teacher_step(teacher: Teacher, x: Tensor, t: Tensor, s: Tensor, cond: Condition | None = None,
                 solver: str = "ddim", nfe: int = 1, scale: Tensor | None = None) -> Tensor:
    """The teacher's solver step from per-sample times t to s (t > s). ``ddim`` with 1 NFE (the LCM / PCM step) runs
    per sample, with the per-example guidance ``scale``; ``exact`` is the closed-form ODE map of a teacher that has
    one (``flow_map``: a single analytic Gaussian), so the CD target of the exact consistency function is exact; any
    other solver (e.g. ``heun`` as in Song et al., or an
    accurate multistep solve for ground-truth tests) runs per distinct (t, s) pair through
    :func:`accelkit.solvers.solve`."""
    if solver == "exact":  # the closed-form ODE map of an analytic teacher (ground-truth tests)
        if not hasattr(teacher, "flow_map") or scale is not None:
            raise AccelkitError(f"solver exact: needs a teacher with a closed-form ODE map (one analytic Gaussian), "
                                f"not a {type(teacher).__name__}")
        return teacher.flow_map(x, t, s)
    if solver == "ddim" and nfe == 1:
        if scale is not None:
            return ddim_jump(teacher, x, t, s, denoised=guided_denoise(teacher, x, t, cond, scale))  # type: ignore
        return ddim_jump(teacher, x, t, s, cond)
    if scale is not None:
        raise AccelkitError(f"a per-example guidance scale needs the ddim solver with 1 NFE, not {solver} x {nfe}")
    from .solvers import solve
    from .solvers.grids import default_grid

    out = torch.empty_like(x)
    pairs = torch.stack([as_time(t).cpu(), as_time(s).cpu()], dim=1)
    for ts in torch.unique(pairs, dim=0):
        rows = ((pairs[:, 0] == ts[0]) & (pairs[:, 1] == ts[1])).nonzero().reshape(-1).to(x.device)
        c = cond.index(rows) if cond is not None else None
        out[rows] = solve(teacher, x[rows], solver=solver, nfe=nfe, grid=default_grid(teacher.schedule),
                          t_max=float(ts[0]), t_min=float(ts[1]), cond=c)
    return out


# ------------------------------------------------------------------------------------------------------ ECT / SCT


def ect_pair_times(param: Parameterisation, z: Tensor, stage: int, q: float = 2.0, p_mean: float = -1.1,
                   p_std: float = 2.0) -> tuple[Tensor, Tensor, Tensor]:
    """(t, r, weight) for ECT at curriculum ``stage`` from standard normal draws ``z``: EDM noise levels
    s_t = exp(p_mean + p_std z) (LogNormal, clipped to [2 s_min, s_max]), s_r from Geng et al.'s r(t) (clipped below
    at s_min, where the boundary holds), their times, and the weight 1 / (s_t - s_r). Float64."""
    s_min = param.s_min
    one = torch.ones((), dtype=torch.float64)
    s_end = float(param.schedule.sigma(one)) / max(float(param.schedule.alpha(one)), 1e-300)
    s_max = min(s_end, 80.0)
    s_t = torch.exp(p_mean + p_std * z.double()).clamp(2.0 * s_min, s_max)
    s_r = s_t * (1.0 - q ** (-(stage + 1)) * (1.0 + 8.0 * torch.sigmoid(-s_t)))
    s_r = torch.maximum(s_r, torch.full_like(s_r, s_min))
    t = param.time_of_edm_sigma(s_t).clamp(param.t_min, 1.0)
    r = torch.where(s_r <= s_min, torch.full_like(s_r, param.t_min), param.time_of_edm_sigma(s_r))
    return t, torch.minimum(r.clamp(param.t_min, 1.0), t), 1.0 / (s_t - s_r)


def reference_x0_estimate(x_t: Tensor, alpha: Tensor, sigma: Tensor, reference: Tensor,
                          same: Tensor | None = None) -> Tensor:
    """SCT's x0bar = sum_i w_i x0_i with w_i = softmax_i(-||x_t - alpha x0_i||^2 / (2 sigma^2)) over the reference
    samples (B_ref, ...) for every x_t (B, ...) (per-sample alpha, sigma); ``same`` (B, B_ref) bool masks references
    of another condition. The Monte-Carlo form of E[x0 | x_t] under the data distribution (float64 inside)."""
    b = x_t.shape[0]
    z = x_t.reshape(b, 1, -1).double()
    ref = reference.reshape(1, reference.shape[0], -1).double()
    a = alpha.double().reshape(-1, 1, 1)
    s = sigma.double().reshape(-1, 1, 1)
    logits = -((z - a * ref) ** 2).sum(-1) / (2.0 * s.reshape(-1, 1) ** 2)
    if same is not None:
        logits = logits.masked_fill(~same, -math.inf)
    w = torch.softmax(logits, dim=1)
    return (w @ reference.reshape(reference.shape[0], -1).double()).reshape(x_t.shape).to(x_t.dtype)


def sct_target_point(x_t: Tensor, t: Tensor, r: Tensor, schedule: Schedule, reference: Tensor,
                     same: Tensor | None = None) -> Tensor:
    """x_r = alpha_r x0bar + sigma_r epsbar with epsbar = (x_t - alpha_t x0bar) / sigma_t (see the module docstring):
    the DDIM step to r of the reference-batch posterior mean."""
    a_t, s_t = schedule.alpha(t), schedule.sigma(t)
    x0bar = reference_x0_estimate(x_t, a_t, s_t, reference, same)
    epsbar = (x_t - broadcast_to(a_t, x_t) * x0bar) / broadcast_to(s_t, x_t)
    return broadcast_to(schedule.alpha(r), x_t) * x0bar + broadcast_to(schedule.sigma(r), x_t) * epsbar


# ----------------------------------------------------------------------------------------------------------- losses


def per_sample_distance(diff: Tensor, kind: str, huber_c: float | None = None) -> Tensor:
    """Per-sample d: ``l2`` the mean of diff^2 over the elements; ``pseudo-huber`` sqrt(||diff||^2 + c^2) - c with
    c = 0.00054 sqrt(D) by default (Song & Dhariwal 2023)."""
    flat = diff.reshape(diff.shape[0], -1).float()
    if kind == "l2":
        return flat.pow(2).mean(dim=1)
    if kind == "pseudo-huber":
        c = huber_c if huber_c is not None else 0.00054 * math.sqrt(flat.shape[1])
        return torch.sqrt(flat.pow(2).sum(dim=1) + c * c) - c
    raise ValueError(f"loss {kind!r}: expected l2 or pseudo-huber")


def same_dropout(fn: Callable[[], Tensor], device: torch.device) -> Callable[[], Tensor]:
    """Run ``fn`` with the random state it would see now, leaving the state as it was (ECT's target and the student
    see the same dropout masks): fork the generators, run, restore."""
    def run() -> Tensor:
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return fn()
    return run


__all__ = ["Parameterisation", "lcm_grid", "LCM_TIMESTEP_SCALING", "LCM_ORIGINAL_STEPS", "consistency_function",
           "exact_consistency_function", "guided_denoise", "ddim_jump",
           "teacher_step", "ect_pair_times", "reference_x0_estimate", "sct_target_point", "per_sample_distance",
           "same_dropout", "SIGMA_DATA", "SIGMA_MIN"]
