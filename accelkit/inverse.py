"""Training-free linear inverse problems: posterior samples of x given y = H x + n, n ~ N(0, s_y^2 I), from a
trained teacher's denoiser alone (no retraining). Everything goes through :meth:`Teacher.denoise`, so every
prediction type and schedule works; the operators H are in :mod:`accelkit.operators`.

Under x_t = alpha x0 + sigma eps, Tweedie's formula gives the posterior denoiser from the prior's,

    E[x0 | x_t, y] = x0_hat(x_t) + (sigma^2 / alpha) grad_{x_t} log p(y | x_t),

and the methods differ in how they approximate p(y | x_t):

* ``pigdm`` (Song, Vahdat, Mardani & Kautz 2023, "Pseudoinverse-Guided Diffusion Models for Inverse Problems"):
  p(x0 | x_t) ~ N(x0_hat, r_t^2 I) with r_t^2 = sigma^2 / (sigma^2 + alpha^2), so p(y | x_t) ~
  N(H x0_hat, r_t^2 H H^T + s_y^2 I) and, by one vector-Jacobian product through the teacher,

      g = [(y - H x0_hat)^T (r_t^2 H H^T + s_y^2 I)^-1 H  d x0_hat / d x_t]^T.

  :class:`PiGDMTeacher` is the teacher with the guided denoiser x0_hat + gamma (sigma^2 / alpha) g: any solver
  integrates its probability-flow ODE. Its velocity is the flow form of Pokle et al. (2024, "Training-free Linear
  Image Inverses via Flows"), v~ = v - gamma sigma^2 (d/dt log(sigma / alpha)) g, and like them sampling starts at an
  intermediate noise level from alpha H^+ y + sigma eps (H^+ regularised by the noise level,
  :meth:`LinearOperator.regularized_pinv`). With a N(0, I) prior the Gaussian approximation is exact and (gamma = 1)
  the ODE carries p(x_t | y) to the exact posterior.
* ``dps`` (Chung, Kim, McCann, Klasky & Ye 2023, "Diffusion Posterior Sampling for General Noisy Inverse Problems"):
  after each DDIM step of the unguided teacher, x <- x - zeta grad_{x_t} ||y - H x0_hat(x_t)||.
* ``ddrm`` (Kawar, Elad, Ermon & Song 2022, "Denoising Diffusion Restoration Models"): no gradients; in the SVD
  basis of H each coefficient is pulled towards the measurement where it is observed, with eta = 0.85,
  eta_b = 1 (the paper's defaults), in the variance-exploding state x / alpha with noise level sigma / alpha.

Sample k (input k // n, posterior draw k % n) starts from the noise of (seed, k) and DDRM's fresh noise at step i
comes from (stream(seed, i), k): results do not depend on the batch size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .data import stream_seed
from .errors import AccelkitError
from .noise import sample_noise
from .operators import LinearOperator
from .schedules import Schedule, as_time
from .teacher import Condition, Teacher, broadcast_to

METHODS = ("pigdm", "dps", "ddrm")
#: Default start of each method, as a time of the linear schedule (the noise level where alpha / sigma = (1 - T) / T).
DEFAULT_START = {"pigdm": 0.8, "dps": 1.0, "ddrm": 1.0}
#: Sampling never starts above the noise level where alpha / sigma = this (there y says nothing about x_t).
MIN_SIGNAL_RATIO = 1e-4


def posterior_variance(schedule: Schedule, t: Tensor) -> Tensor:
    """r_t^2 = sigma^2 / (sigma^2 + alpha^2): Var[x0 | x_t] under a N(0, I) prior (PiGDM's choice), float64."""
    a, s = schedule.alpha(t), schedule.sigma(t)
    return s**2 / (s**2 + a**2)


def start_time(schedule: Schedule, start: float) -> float:
    """The teacher's time at the noise level of the linear schedule's time ``start``: the same log-SNR,
    2 log((1 - start) / start), capped at alpha / sigma >= :data:`MIN_SIGNAL_RATIO`."""
    if not 0.0 < start <= 1.0:
        raise AccelkitError(f"start {start}: expected a time in (0, 1] (the linear schedule's noise level)")
    ratio = max((1.0 - start) / start, MIN_SIGNAL_RATIO)
    return float(schedule.t_of_log_snr(torch.tensor(2.0 * math.log(ratio), dtype=torch.float64)))


class PiGDMTeacher(Teacher):
    """The prior teacher guided towards y by PiGDM: x0_y = x0_hat + gamma (sigma^2 / alpha) g (see the module doc)."""

    def __init__(self, prior: Teacher, op: LinearOperator, y: Tensor, noise_std: float, gamma: float = 1.0):
        super().__init__()
        self.prior, self.op, self.y = prior, op, y
        self.noise_var, self.gamma = float(noise_std) ** 2, float(gamma)
        self.schedule, self.sample_shape = prior.schedule, prior.sample_shape

    def guidance(self, x: Tensor, t: Tensor, cond: Condition | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(x0_hat, eps_hat, g): the prior's prediction and PiGDM's grad log p(y | x_t), one VJP."""
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            x0, eps = self.prior.denoise(xg, t, cond)
            r2 = posterior_variance(self.schedule, as_time(t, x.device))
            residual = self.op.gram_solve(self.y - self.op(x0.detach()), r2, self.noise_var)
            (g,) = torch.autograd.grad(x0, xg, grad_outputs=self.op.adjoint(residual))
        return x0.detach(), eps.detach(), g

    def denoise(self, x, t, cond=None):
        t = as_time(t, x.device)
        x0, eps, g = self.guidance(x, t, cond)
        a, s = broadcast_to(self.schedule.alpha(t), x), broadcast_to(self.schedule.sigma(t), x)
        return x0 + self.gamma * s**2 / a * g, eps - self.gamma * s * g


def dps_sample(prior: Teacher, op: LinearOperator, y: Tensor, x: Tensor, ts: Tensor, zeta: float = 1.0,
               cond: Condition | None = None) -> Tensor:
    """DPS: DDIM steps x_next = alpha_next x0_hat + sigma_next eps_hat, each followed by
    x_next <- x_next - zeta grad_{x_t} ||y - H x0_hat(x_t)|| (one VJP per step; per-sample norms)."""
    sched = prior.schedule
    for i in range(len(ts) - 1):
        t, t_next = ts[i], ts[i + 1]
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            x0, eps = prior.denoise(xg, t, cond)
            norm = (y - op(x0)).flatten(1).norm(dim=1)
            (grad,) = torch.autograd.grad(norm.sum(), xg)
        a, s = broadcast_to(sched.alpha(t_next), x), broadcast_to(sched.sigma(t_next), x)
        x = a * x0.detach() + s * eps.detach() - zeta * grad
    return x


def ddrm_sample(prior: Teacher, op: LinearOperator, y: Tensor, noise_std: float, noise: Tensor, ts: Tensor,
                step_noise: Callable[[int], Tensor], eta: float = 0.85, eta_b: float = 1.0,
                cond: Condition | None = None) -> Tensor:
    """DDRM in the spectral basis of H (Kawar et al. 2022, eq. 7-8), in the variance-exploding state
    xbar = V^T x / alpha at noise level phi = sigma / alpha; y_bar = S^+ U^T y with noise s_y / s_i per coefficient.

    Unobserved (s_i = 0):  xbar' = x0bar + phi' (sqrt(1 - eta^2) (xbar - x0bar) / phi + eta eps)
    phi' <  s_y / s_i:     xbar' = x0bar + sqrt(1 - eta^2) phi' (ybar - x0bar) / (s_y / s_i) + eta phi' eps
    phi' >= s_y / s_i:     xbar' = (1 - eta_b) x0bar + eta_b ybar + sqrt(phi'^2 - eta_b^2 s_y^2 / s_i^2) eps

    ``noise`` is the initial noise, ``step_noise(i)`` the fresh noise of step i (both image-shaped, N(0, I)).
    """
    sched = prior.schedule
    alphas, sigmas = sched.alpha(ts), sched.sigma(ts)
    phis = [float(s / a) if float(a) > 0 else math.inf for a, s in zip(alphas, sigmas, strict=True)]
    z = op.ut(y)
    s = op.s(z)
    observed = s > 0
    safe_s = torch.where(observed, s, torch.ones_like(s))
    ybar = torch.where(observed, z / safe_s, torch.zeros_like(z))
    sy = torch.where(observed, noise_std / safe_s, torch.full_like(s, math.inf))
    eps = op.vt(noise)
    phi = phis[0]
    init_var = (phi**2 - sy**2).clamp(min=0.0)
    xbar = torch.where(observed & (sy < phi), ybar + init_var.sqrt() * eps, phi * eps)
    for i in range(len(ts) - 1):
        x = float(alphas[i]) * op.v(xbar)
        x0bar = op.vt(prior.predict_x0(x, ts[i], cond).detach())
        phi, phi_next = phis[i], phis[i + 1]
        fresh = op.vt(step_noise(i))
        hidden = x0bar + phi_next * (math.sqrt(1 - eta**2) * (xbar - x0bar) / phi + eta * fresh)
        noisy = x0bar + math.sqrt(1 - eta**2) * phi_next * (ybar - x0bar) / sy + eta * phi_next * fresh
        var = (phi_next**2 - eta_b**2 * sy**2).clamp(min=0.0)
        close = (1 - eta_b) * x0bar + eta_b * ybar + var.sqrt() * fresh
        xbar = torch.where(~observed, hidden, torch.where(phi_next < sy, noisy, close))
    return float(alphas[-1]) * op.v(xbar)


@dataclass
class RestoreSettings:
    """How to sample: the method, its network evaluations and its knobs (defaults from the papers)."""

    method: str = "pigdm"
    nfe: int = 20
    start: float | None = None  # linear-schedule time; None: DEFAULT_START[method]
    solver: str = "ddim"  # pigdm: the ODE solver of the guided teacher
    gamma: float = 1.0  # pigdm: guidance weight (1: Tweedie's formula exactly)
    zeta: float = 1.0  # dps: step size on grad ||y - H x0_hat||
    eta: float = 0.85  # ddrm
    eta_b: float = 1.0  # ddrm

    def check(self) -> None:
        if self.method not in METHODS:
            raise AccelkitError(f"--method {self.method!r}: expected one of {', '.join(METHODS)}")
        if self.nfe < 1:
            raise AccelkitError(f"--nfe {self.nfe}: expected at least 1 network evaluation")
        if not 0.0 <= self.eta <= 1.0 or not 0.0 <= self.eta_b <= 1.0:
            raise AccelkitError(f"ddrm eta {self.eta}, eta_b {self.eta_b}: expected values in [0, 1]")


def method_grid(teacher: Teacher, settings: RestoreSettings) -> Tensor:
    """The time grid of the method: the schedule's default spacing from the start time to 0."""
    from .solvers import get_solver, make_grid
    from .solvers.grids import default_grid

    start = DEFAULT_START[settings.method] if settings.start is None else settings.start
    t0 = start_time(teacher.schedule, start)
    steps = get_solver(settings.solver).steps(settings.nfe) if settings.method == "pigdm" else settings.nfe
    return make_grid(default_grid(teacher.schedule), steps, t_max=t0, schedule=teacher.schedule)


def restore(teacher: Teacher, op: LinearOperator, y: Tensor, noise_std: float, settings: RestoreSettings, *,
            n: int = 1, seed: int = 0, batch_size: int = 64, device: torch.device | str = "cpu",
            condition: Callable[[list[int]], Condition | None] | None = None,
            on_batch: Callable[[int], None] | None = None) -> Tensor:
    """``n`` posterior samples for each of the measurements ``y`` (one per row), shape (len(y), n, *image).

    Sample k = i n + j of input i starts from the noise of (seed, k); ``op`` may hold one mask per input;
    ``condition`` gives the teacher's condition for a list of input indices (class labels, text embeddings).
    """
    from .solvers import get_solver

    settings.check()
    if noise_std < 0 or not math.isfinite(noise_std):
        raise AccelkitError(f"--noise-std {noise_std}: expected a non-negative number")
    if n < 1:
        raise AccelkitError(f"-n {n}: expected at least 1 posterior sample per input")
    ts = method_grid(teacher, settings)
    sched = teacher.schedule
    a0, s0 = float(sched.alpha(ts[0])), float(sched.sigma(ts[0]))
    tensors = [*teacher.parameters(), *teacher.buffers()]
    dtype = next((p.dtype for p in tensors if p.is_floating_point()), torch.float32)
    dtype = torch.float64 if dtype == torch.float64 else torch.float32  # fp16 / bf16 networks: fp32 guidance
    y = y.to(device=device, dtype=dtype)
    shape = tuple(teacher.sample_shape)
    total = y.shape[0] * n
    out = []
    for start in range(0, total, batch_size):
        ks = list(range(start, min(total, start + batch_size)))
        rows = torch.tensor([k // n for k in ks])
        op_b, y_b = op.select(rows), y[rows.to(y.device)]
        noise = sample_noise(seed, ks, shape, device=device, dtype=dtype)
        cond = condition(rows.tolist()) if condition is not None else None
        if cond is not None:
            cond = cond.map(lambda v: v.to(device))
        if settings.method == "ddrm":
            def step_noise(i: int, ks=ks) -> Tensor:
                return sample_noise(stream_seed(seed, 0xDD, i), ks, shape, device=device, dtype=dtype)

            x = ddrm_sample(teacher, op_b, y_b, noise_std, noise, ts, step_noise, settings.eta, settings.eta_b,
                            cond)
        else:
            x = a0 * op_b.regularized_pinv(y_b, noise_std**2) + s0 * noise
            if settings.method == "pigdm":
                guided = PiGDMTeacher(teacher, op_b, y_b, noise_std, settings.gamma)
                with torch.no_grad():
                    x = get_solver(settings.solver).sample(guided, x, ts, settings.nfe, cond)
            else:
                x = dps_sample(teacher, op_b, y_b, x, ts, settings.zeta, cond)
        out.append(x.detach().to(torch.float32 if dtype != torch.float64 else dtype).cpu())
        if on_batch is not None:
            on_batch(len(ks))
    return torch.cat(out).reshape(y.shape[0], n, *shape)


__all__ = ["METHODS", "DEFAULT_START", "PiGDMTeacher", "RestoreSettings", "restore", "dps_sample", "ddrm_sample",
           "posterior_variance", "start_time", "method_grid"]
