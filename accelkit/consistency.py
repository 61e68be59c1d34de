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
from .schedules import Schedule, as_time
from .teacher import Condition, NetworkTeacher, Teacher, broadcast_to

SIGMA_DATA = 0.5
SIGMA_MIN = 0.002


# ------------------------------------------------------------------------------------------------ parameterisation


@dataclass(frozen=True)
class Parameterisation:
    """Song et al.'s c_skip / c_out over a teacher's schedule, in EDM terms (see the module docstring)."""

    schedule: Schedule
    sigma_data: float = SIGMA_DATA
    sigma_min: float = SIGMA_MIN

    @property
    def s_min(self) -> float:
        """The smallest EDM noise level: ``sigma_min`` or the schedule's own at t = 0 when that is larger."""
        zero = torch.zeros((), dtype=torch.float64)
        s0 = float(self.schedule.sigma(zero) / self.schedule.alpha(zero))
        return max(self.sigma_min, s0)

    @property
    def t_min(self) -> float:
        """The time of :attr:`s_min`: where the boundary condition f(x, t_min) = x holds exactly."""
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
        a, s = self.schedule.alpha(t), self.schedule.sigma(t)
        sd2, s_min = self.sigma_data**2, self.s_min
        A = sd2 * a / ((s - s_min * a) ** 2 + sd2 * a**2)
        C = sd2 * a / (s**2 + sd2 * a**2)
        B = torch.where(s > 0, 1.0 - s_min * a / s.clamp(min=1e-300), torch.zeros_like(s))
        return A, B, C

    def apply(self, x: Tensor, t: Tensor, x0_hat: Tensor) -> Tensor:
        """f(x, t) from the network's x0 prediction at (x, t)."""
        A, B, C = (broadcast_to(c, x) for c in self.coefficients(t))
        return A * x + B * (x0_hat - C * x)

    def config(self) -> dict[str, float]:
        return {"sigma_data": self.sigma_data, "sigma_min": self.sigma_min}

    @staticmethod
    def of(model: Teacher) -> Parameterisation:
        """The parameterisation a consistency student records in its info (Song et al.'s defaults otherwise)."""
        cfg = (getattr(model, "info", None) or {}).get("consistency") or {}
        return Parameterisation(model.schedule, float(cfg.get("sigma_data", SIGMA_DATA)),
                                float(cfg.get("sigma_min", SIGMA_MIN)))


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
    with ``nfe`` accurate steps, in EDM coordinates x_{t_min} / alpha(t_min)."""
    from .solvers import solve

    t_min = param.t_min
    if t <= t_min:
        return x / float(teacher.schedule.alpha(torch.tensor(t_min, dtype=torch.float64)))
    end = solve(teacher, x, solver=solver, nfe=nfe, grid="logsnr",
                t_max=float(t), t_min=t_min)
    return end / float(teacher.schedule.alpha(torch.tensor(t_min, dtype=torch.float64)))


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
    per sample, with the per-example guidance ``scale``; any other solver (e.g. ``heun`` as in Song et al., or an
    accurate multistep solve for ground-truth tests) runs per distinct (t, s) pair through
    :func:`accelkit.solvers.solve`."""
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


__all__ = ["Parameterisation", "consistency_function", "exact_consistency_function", "guided_denoise", "ddim_jump",
           "teacher_step", "ect_pair_times", "reference_x0_estimate", "sct_target_point", "per_sample_distance",
           "same_dropout", "SIGMA_DATA", "SIGMA_MIN"]
