"""DPM-Solver-v3 (Zheng, Lu, Chen & Zhu 2023, "DPM-Solver-v3: Improved Diffusion ODE Solver with Empirical Model
Statistics", NeurIPS 2023, arXiv 2310.13268): a multistep predictor-corrector whose parameterisation of the model
is fitted to the teacher itself through per-dimension "empirical model statistics" (EMS) l, s, b at each log-SNR.

In lambda = log(alpha / sigma) (half the log-SNR) the probability-flow ODE of a noise prediction eps(x, lambda) is
dx/dlambda = (d log alpha / dlambda) x - sigma eps. For any l_lambda (a vector, elementwise), with y = x / alpha and

    f(x, lambda) = (sigma eps(x, lambda) - l_lambda x) / alpha,

it reads dy/dlambda = -l_lambda y - f, whose exact solution from lambda_s to lambda_t is

    y_t = e^{-L(lambda_s, lambda_t)} y_s - int_{lambda_s}^{lambda_t} e^{-L(lambda, lambda_t)} f(x_lambda, lambda) dlam,

L(a, b) = int_a^b l. With s_lambda, b_lambda the solver writes f through the reparameterised model

    g(lambda) = e^{-S(lambda_s, lambda)} f(lambda) - B(lambda_s, lambda),
    S(a, b) = int_a^b s,   B(lambda_s, lambda) = int_{lambda_s}^{lambda} e^{-S(lambda_s, r)} b_r dr,

and approximates g, not f, by a polynomial in lambda through the last few evaluations (its derivatives at lambda_s
from the Vandermonde system of the points), so that

    y_t = A y_s - sum_k I_k g^{(k)}(lambda_s) / k! - I_B,   A = e^{-L(lambda_s, lambda_t)},
    I_k = int e^{-L(lambda, lambda_t)} e^{S(lambda_s, lambda)} (lambda - lambda_s)^k,  I_B = the same with B for the
    power,

all integrals over [lambda_s, lambda_t], per dimension, computed before the loop by Simpson's rule on the statistics
(piecewise linear in lambda between the computed points, constant beyond them). The EMS make g as close to constant
as possible along the teacher's own trajectories: l minimises E ||grad_x f||_F^2 (so l = sigma E[diag(grad_x eps)],
the Jacobian's diagonal, Hutchinson's estimate), and (s, b) the first-order discretisation error
E ||df/dlambda - s f - b||^2 (a per-dimension least-squares line of df/dlambda on f); see
:func:`compute_statistics`. l = 1, s = b = 0 make f = -x0_hat and g = f: DPM-Solver++ with exact phi-function
coefficients (:meth:`EmpiricalStatistics.dpm_solver_pp`).

Steps: predictor of order p (up to ``order``, warm-up with fewer points); the corrector re-solves the step with the
evaluation at its end added to the points (one order more, no extra NFE: that evaluation is the next step's), as
UniC does. The model's linear part is exact, so the next step's f uses the corrected x with the evaluated eps. A step
from lambda = -inf (alpha = 0, the linear schedule's t = 1) is a DDIM step; the step onto sigma = 0 returns the x0
estimate, as DPM-Solver++ does. The paper's pseudo-order tricks are not implemented.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import AccelkitError
from ..teacher import Condition, Teacher
from .base import GridNodes, Solver, host_to_device

F64 = torch.float64
SUBSTEPS = 200  # Simpson intervals per solver step for the coefficient integrals


@dataclass
class EmpiricalStatistics:
    """l, s, b (each (J, D), float64) at J increasing lambda values ``lam`` (J,); D = elements of one sample."""

    lam: Tensor
    l: Tensor  # noqa: E741 (the paper's name)
    s: Tensor
    b: Tensor

    @staticmethod
    def dpm_solver_pp(dim: int, lam_range: tuple[float, float] = (-20.0, 20.0)) -> EmpiricalStatistics:
        """The statistics that make DPM-Solver-v3 DPM-Solver++: l = 1, s = b = 0 (f = -x0_hat)."""
        lam = torch.tensor(lam_range, dtype=F64)
        one, zero = torch.ones(2, dim, dtype=F64), torch.zeros(2, dim, dtype=F64)
        return EmpiricalStatistics(lam, one, zero, zero.clone())

    def at(self, lam: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """l, s, b at the lambdas ``lam`` (M,): linear between the computed points, constant beyond them."""
        lam = lam.to(F64).clamp(float(self.lam[0]), float(self.lam[-1]))
        hi = torch.searchsorted(self.lam, lam).clamp(1, len(self.lam) - 1)
        lo = hi - 1
        w = ((lam - self.lam[lo]) / (self.lam[hi] - self.lam[lo])).unsqueeze(1)
        return tuple(v[lo] + w * (v[hi] - v[lo]) for v in (self.l, self.s, self.b))

    def tensors(self) -> dict[str, Tensor]:
        return {"lam": self.lam, "l": self.l, "s": self.s, "b": self.b}


def _simpson(values: Tensor, du: Tensor) -> Tensor:
    """Simpson's rule over dim 0 (an odd number of equally spaced points, spacing ``du``)."""
    w = torch.ones(values.shape[0], dtype=F64)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    return (w.reshape(-1, *([1] * (values.ndim - 1))) * values).sum(0) * du / 3.0


def _cumtrapz(values: Tensor, u: Tensor) -> Tensor:
    """Cumulative trapezoid integral over dim 0 from u[0] (exact for linear integrands)."""
    steps = 0.5 * (values[1:] + values[:-1]) * (u[1:] - u[:-1]).unsqueeze(1)
    return torch.cat([torch.zeros_like(values[:1]), steps.cumsum(0)])


@dataclass
class StepPlan:
    """What step i does: ``kind`` (v3, ddim, x0) and, for v3, its coefficients (D-vectors, times alpha_{i+1})."""

    kind: str
    history: list[int]  # earlier grid points whose f enters the predictor (nearest first)
    a: Tensor | None = None  # multiplies x_i
    i0: Tensor | None = None  # multiplies g_i
    ib: Tensor | None = None  # the constant term
    pred: list[Tensor] | None = None  # multiply g_r - g_i for r in history
    corr: list[Tensor] | None = None  # corrector: for [i + 1] + history
    conv: dict[int, tuple[Tensor, Tensor]] | None = None  # g_r = e_r * f_r - c_r relative to lambda_i


def _vandermonde_weights(deltas: list[float], moments: list[Tensor]) -> list[Tensor]:
    """Weights c_r with sum_k I_k d_k = sum_r c_r (g_r - g_i), where d solves sum_k d_k delta_r^k = g_r - g_i
    (k = 1 .. len(deltas)) and ``moments`` are I_1 .. I_K."""
    if not deltas:
        return []
    m = torch.tensor([[d ** k for k in range(1, len(deltas) + 1)] for d in deltas], dtype=F64)
    minv = torch.linalg.inv(m)  # d = minv @ (g - g_i)
    return [sum(moments[k] * minv[k, r] for k in range(len(deltas))) for r in range(len(deltas))]


class DPMSolverV3(Solver):
    """DPM-Solver-v3 on a teacher's empirical model statistics (see the module docstring). One evaluation per step.

    ``order``: the predictor's order (1 - 3); ``corrector``: add the corrector (default). ``config``: what an artifact
    records (the teacher's path and content hash), for :func:`accelkit.solvers.learned.check_solver_teacher`.
    """

    def __init__(self, stats: EmpiricalStatistics, order: int = 2, corrector: bool = True, config: dict | None = None,
                 name: str = "dpm-solver-v3"):
        if order not in (1, 2, 3):
            raise AccelkitError(f"DPM-Solver-v3 order {order}: expected 1, 2 or 3")
        self.stats, self.order, self.corrector = stats, order, corrector
        self.config = dict(config or {})
        self.name = name
        self.own_times = False  # steps on the grid it is given, at any NFE

    def plan(self, schedule, ts: Tensor) -> list[StepPlan]:
        """Every step's coefficients (float64, host), from the grid and the statistics."""
        g = GridNodes.of(schedule, ts)
        lam = [float(v) for v in g.lam]
        n = len(ts) - 1
        finite = [math.isfinite(v) for v in lam]
        knots = [i for i in range(n + 1) if finite[i]]
        if len(knots) < 2:
            return [StepPlan("ddim" if not finite[i] else "x0", []) for i in range(n)]
        # one fine lambda grid through every finite grid point, SUBSTEPS Simpson intervals per step
        parts, index = [], {}
        for a, b in zip(knots[:-1], knots[1:], strict=True):
            index[a] = sum(len(p) for p in parts)
            parts.append(torch.linspace(lam[a], lam[b], SUBSTEPS + 1, dtype=F64)[:-1])
        index[knots[-1]] = sum(len(p) for p in parts)
        u = torch.cat(parts + [torch.tensor([lam[knots[-1]]], dtype=F64)])
        l_u, s_u, b_u = self.stats.at(u)
        if l_u.shape[1] != self.stats.l.shape[1]:
            raise AccelkitError("statistics of inconsistent width")
        big_l, big_s = _cumtrapz(l_u, u), _cumtrapz(s_u, u)
        big_e = _cumtrapz(torch.exp(-big_s) * b_u, u)
        plans: list[StepPlan] = []
        evaluated: list[int] = []  # grid points with a finite lambda whose f is known
        for i in range(n):
            if not finite[i]:
                plans.append(StepPlan("ddim", []))
                continue
            if not finite[i + 1]:
                plans.append(StepPlan("x0", []))
                evaluated.insert(0, i)
                continue
            p = min(self.order, 1 + len(evaluated))
            hist = evaluated[:p - 1]
            ia, ie = index[i], index[i + 1]
            uu = u[ia:ie + 1]
            du = (uu[-1] - uu[0]) / (len(uu) - 1)
            w = torch.exp(-(big_l[ie] - big_l[ia:ie + 1]) + (big_s[ia:ie + 1] - big_s[ia]))
            rel = (uu - lam[i]).unsqueeze(1)
            moments = [_simpson(w * rel ** k, du) for k in range(self.order + 1)]
            bterm = torch.exp(big_s[ia]) * (big_e[ia:ie + 1] - big_e[ia])
            scale = float(g.alpha[i + 1])
            conv = {r: (torch.exp(-(big_s[index[r]] - big_s[ia])), torch.exp(big_s[ia]) * (big_e[index[r]] - big_e[ia]))
                    for r in hist + [i + 1]}
            pred = _vandermonde_weights([lam[r] - lam[i] for r in hist], moments[1:])
            corr = _vandermonde_weights([lam[i + 1] - lam[i]] + [lam[r] - lam[i] for r in hist], moments[1:])
            plans.append(StepPlan(
                "v3", hist, a=scale / float(g.alpha[i]) * torch.exp(-(big_l[ie] - big_l[ia])),
                i0=scale * moments[0], ib=scale * _simpson(w * bterm, du), pred=[scale * c for c in pred],
                corr=[scale * c for c in corr], conv=conv))
            evaluated.insert(0, i)
        return plans

    def sample(self, teacher: Teacher, x: Tensor, ts: Tensor, nfe: int, cond: Condition | None = None) -> Tensor:
        dim = math.prod(x.shape[1:])
        if self.stats.l.shape[1] != dim:
            raise AccelkitError(f"{self.name}: statistics of samples with {self.stats.l.shape[1]} elements, the "
                                f"teacher's have {dim}")
        plans = self.plan(teacher.schedule, ts)
        g = GridNodes.of(teacher.schedule, ts)
        lam = g.lam.clone()
        shape = (1, *x.shape[1:])

        def dev(v: Tensor) -> Tensor:
            return host_to_device(v.reshape(shape), x.device).to(x.dtype)

        def scalar(v) -> Tensor:
            return host_to_device(torch.tensor(float(v), dtype=F64), x.device).to(x.dtype)

        for step in plans:  # coefficients on x's device and dtype, shaped like one sample, once
            if step.kind == "v3":
                step.a, step.i0, step.ib = dev(step.a), dev(step.i0), dev(step.ib)
                step.pred, step.corr = [dev(c) for c in step.pred], [dev(c) for c in step.corr]
                step.conv = {r: (dev(e), dev(c)) for r, (e, c) in step.conv.items()}
        l_at = {i: dev(self.stats.at(lam[i:i + 1])[0][0]) for i in range(len(ts)) if math.isfinite(float(lam[i]))}
        t, b = host_to_device(ts, x.device), x.shape[0]
        alpha = [scalar(v) for v in g.alpha]
        sigma = [scalar(v) for v in g.sigma]
        f: dict[int, Tensor] = {}  # f at the grid points evaluated
        pending = None  # (i, x_i, hist of step i) awaiting correction with the evaluation at i + 1
        for i, step in enumerate(plans):
            x0, eps = teacher.denoise(x, t[i].expand(b), cond)
            if pending is not None and self.corrector:
                j, xj, plan_j = pending
                f_new = (sigma[i] * eps - l_at[i] * x) / alpha[i]
                pts = [i] + plan_j.history
                gs = {r: plan_j.conv[r][0] * (f_new if r == i else f[r]) - plan_j.conv[r][1] for r in pts}
                x_c = self._update(plan_j, xj, f[j], gs, pts, plan_j.corr)
                x0 = x0 + (x_c - x) / alpha[i]  # the evaluated eps with the corrected x
                x = x_c
            pending = None
            if step.kind == "ddim":
                x = (sigma[i + 1] / sigma[i]) * x - alpha[i + 1] * math.expm1(-(float(lam[i + 1]) - float(lam[i])))\
                    * x0 if math.isfinite(float(lam[i + 1])) else x0
                continue
            if step.kind == "x0":
                x = x0
                continue
            f[i] = (sigma[i] * eps - l_at[i] * x) / alpha[i]
            gs = {r: step.conv[r][0] * f[r] - step.conv[r][1] for r in step.history}
            x_next = self._update(step, x, f[i], gs, step.history, step.pred)
            pending = (i, x, step)
            x = x_next
        return x

    @staticmethod
    def _update(step: StepPlan, x: Tensor, f_i: Tensor, gs: dict[int, Tensor], points: list[int],
                weights: list[Tensor]) -> Tensor:
        """alpha_{i+1} (A y_i - I_0 g_i - sum_r c_r (g_r - g_i) - I_B) with g_i = f_i."""
        out = step.a * x - step.i0 * f_i - step.ib
        for r, c in zip(points, weights, strict=True):
            out = out - c * (gs[r] - f_i)
        return out


# ------------------------------------------------------------------------------------------------ statistics


@torch.no_grad()
def compute_statistics(teacher: Teacher, noise: Tensor, points: int = 100, segment_nfe: int = 4,
                       cond: Condition | None = None, batch: int = 256, seed: int = 0,
                       t_range: tuple[float, float] | None = None) -> EmpiricalStatistics:
    """The empirical model statistics of ``teacher`` on its own ODE trajectories from ``noise`` (K samples).

    At ``points`` values of lambda, evenly spaced between the ends of the schedule (clipped to phi = sigma / alpha in
    [0.002, 80], EDM's range, where lambda is infinite), the trajectories' states x come from Heun steps
    (``segment_nfe`` evaluations between two points), and

    * l = sigma E[v * (grad_x eps) v] over the K states, Rademacher v: Hutchinson's estimate of the Jacobian's
      diagonal, the minimiser of E ||grad_x f||_F^2 over diagonal l (one vector-Jacobian product per state);
    * f = (sigma eps - l x) / alpha at each state, df/dlambda by central differences along each trajectory;
    * s = Cov(df/dlambda, f) / Var(f), b = E[df/dlambda] - s E[f], per dimension (least squares over the K states;
      a dimension where f does not vary gets s = 0).
    """
    from .grids import make_grid

    sched = teacher.schedule
    ends = torch.tensor([1.0, 0.0], dtype=F64) if t_range is None else torch.tensor(t_range, dtype=F64)
    lam_ends = 0.5 * sched.log_snr(ends)
    lo = float(lam_ends[0]) if math.isfinite(float(lam_ends[0])) else -math.log(80.0)
    hi = float(lam_ends[1]) if math.isfinite(float(lam_ends[1])) else -math.log(0.002)
    lam = torch.linspace(lo, hi, points, dtype=F64)
    times = sched.t_of_log_snr(2.0 * lam).clamp(0.0, 1.0)
    k = noise.shape[0]
    dim = math.prod(noise.shape[1:])
    l_sum = torch.zeros(points, dim, dtype=F64)
    states, epss = [], []
    x = teacher.prior_sample(noise)
    t_prev = float(ends[0])
    gen = torch.Generator().manual_seed(seed)  # the Hutchinson probes
    for j in range(points):
        tj = float(times[j])
        if tj < t_prev:
            grid = make_grid("uniform", segment_nfe // 2 + 1, t_max=t_prev, t_min=tj)
            x = torch.cat([_heun(teacher, x[i:i + batch], grid, _rows(cond, i, batch)) for i in range(0, k, batch)])
        t_prev = tj
        eps_parts = []
        for i in range(0, k, batch):
            xb = x[i:i + batch]
            v = (torch.randint(0, 2, xb.shape, generator=gen, dtype=torch.int64) * 2 - 1).to(xb)
            tb = torch.full((xb.shape[0],), tj, dtype=F64, device=xb.device)
            c = _rows(cond, i, batch)
            eps, jv = _eps_and_probe(teacher, xb, tb, v, c)
            eps_parts.append(eps)
            l_sum[j] += (v * jv).reshape(xb.shape[0], -1).to(F64).sum(0).cpu()
        states.append(x.reshape(k, -1).to(F64).cpu())
        epss.append(torch.cat(eps_parts).reshape(k, -1).to(F64).cpu())
    alpha, sigma = sched.alpha(times), sched.sigma(times)
    l_stat = sigma.unsqueeze(1) * l_sum / k
    f = torch.stack([(sigma[j] * epss[j] - l_stat[j] * states[j]) / alpha[j] for j in range(points)])  # (J, K, D)
    df = torch.empty_like(f)
    df[1:-1] = (f[2:] - f[:-2]) / (lam[2:] - lam[:-2]).reshape(-1, 1, 1)
    df[0] = (f[1] - f[0]) / (lam[1] - lam[0])
    df[-1] = (f[-1] - f[-2]) / (lam[-1] - lam[-2])
    fm, dm = f.mean(1, keepdim=True), df.mean(1, keepdim=True)
    cov = ((f - fm) * (df - dm)).mean(1)
    var = (f - fm).pow(2).mean(1)
    s = torch.where(var > 1e-12 * var.mean(1, keepdim=True).clamp_min(1e-300), cov / var.clamp_min(1e-300),
                    torch.zeros_like(cov))
    b = dm.squeeze(1) - s * fm.squeeze(1)
    return EmpiricalStatistics(lam, l_stat, s, b)


def _rows(cond: Condition | None, i: int, batch: int) -> Condition | None:
    return cond.index(slice(i, i + batch)) if cond is not None else None


def _heun(teacher: Teacher, x: Tensor, grid: Tensor, cond: Condition | None) -> Tensor:
    from . import get_solver

    solver = get_solver("heun")
    return solver.sample(teacher, x, grid, 2 * (len(grid) - 1) - 1, cond) if len(grid) > 2 else \
        get_solver("euler").sample(teacher, x, grid, 1, cond)


def _eps_and_probe(teacher: Teacher, x: Tensor, t: Tensor, v: Tensor, cond: Condition | None
                   ) -> tuple[Tensor, Tensor]:
    """eps(x) and (grad_x eps)^T v by one backward pass; E[v * (grad_x eps)^T v] is the Jacobian's diagonal as
    E[v * (grad_x eps) v] is (the diagonal of a matrix and of its transpose agree). Central differences of eps
    along v where the teacher cannot be differentiated."""
    try:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            eps = teacher.predict_eps(xg, t, cond)
            (jtv,) = torch.autograd.grad(eps, xg, v)
        return eps.detach(), jtv
    except RuntimeError:
        delta = 1e-3 * float(x.abs().mean().clamp_min(1e-3))
        eps = teacher.predict_eps(x, t, cond)
        jv = (teacher.predict_eps(x + delta * v, t, cond) - teacher.predict_eps(x - delta * v, t, cond)) / (2 * delta)
        return eps, jv


__all__ = ["DPMSolverV3", "EmpiricalStatistics", "compute_statistics"]
