"""Bespoke non-stationary solvers (Shaul et al. 2024, "Bespoke Non-Stationary Solvers for Fast Sampling of Diffusion
and Flow Models", arXiv 2403.01329).

Evaluation k (k = 0 ... n - 1) of the teacher's velocity happens at a learned time t_k and at a point that is a
learned combination of the starting point and every velocity evaluated before it:

    z_0 = x_0,   u_k = u_{t_k}(z_k),   z_{k+1} = a_k x_0 + sum_{j <= k} b_kj u_j,   output z_n.

Every explicit linear solver of n evaluations (Euler, Heun, midpoint, DPM-Solver++, UniPC, iPNDM, ...) is a member
of this family: it is linear in x_0 and the network outputs, with coefficients that depend on the times only. So
:func:`trace_linear_solver` reads its (t_k, a_k, b_kj) off by running it on a symbolic teacher whose states are
coefficient vectors over the basis (x_0, u_0, ..., u_{n-1}), and :class:`NonStationarySolver` initialised from them
*is* that solver. Training (end to end through the sampler) minimises log of the mean squared error of z_n against
the ground truth x(t_min) over a batch, i.e. maximises its PSNR. Parameters: n times, n scalars a_k and n (n + 1) / 2
weights b_kj (all stored in units of the mean step).

Times stay inside [t_lo, t_max] (clamped; t_lo a little above t_min, where a VP teacher's velocity is undefined).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import AccelkitError
from ..teacher import Condition, Teacher

F64 = torch.float64


class NonStationarySolver(nn.Module):
    """z_{k+1} = a_k x_0 + sum_{j <= k} b_kj u_{t_j}(z_j), k < n, with learned t, a, b (module docstring)."""

    def __init__(self, times: Tensor, a: Tensor, b: Tensor, t_range: tuple[float, float]):
        super().__init__()
        n = len(times)
        if a.shape != (n,) or b.shape != (n, n):
            raise AccelkitError(f"non-stationary solver: expected {n} times, {n} a and {n}x{n} b coefficients")
        self.n = n
        self.register_buffer("t_range", torch.tensor(t_range, dtype=F64))
        self.register_buffer("mask", torch.ones(n, n, dtype=F64).tril())
        # times and coefficients are stored in units of the mean step h = (t_max - t_min) / n, so that one optimizer
        # step moves them by a similar fraction of a step whatever the NFE
        self.h = float(t_range[1] - t_range[0]) / n
        self.times_h = nn.Parameter(torch.as_tensor(times, dtype=F64).clone() / self.h)
        self.a_h = nn.Parameter(torch.as_tensor(a, dtype=F64).clone() / self.h)
        self.b_h = nn.Parameter(torch.as_tensor(b, dtype=F64).clone() * self.mask / self.h)

    @property
    def nfe(self) -> int:
        return self.n

    def clamped_times(self) -> Tensor:
        lo, hi = self.t_range[0], self.t_range[1]
        return torch.minimum(torch.maximum(self.times_h * self.h, lo), hi)

    def weights(self) -> Tensor:
        """b_kj (lower triangular)."""
        return self.b_h * self.mask * self.h

    def sample(self, teacher: Teacher, x0: Tensor, cond: Condition | None = None) -> Tensor:
        t, a, b = self.clamped_times(), (self.a_h * self.h).to(x0.dtype), self.weights().to(x0.dtype)
        n_batch = x0.shape[0]
        us: list[Tensor] = []
        z = x0
        for k in range(self.n):
            us.append(teacher.velocity(z, t[k].expand(n_batch), cond))
            z = a[k] * x0
            for j in range(k + 1):
                z = z + b[k, j] * us[j]
        return z

    def describe(self) -> dict[str, list]:
        with torch.no_grad():
            return {"t": self.clamped_times().tolist(), "a": (self.a_h * self.h).tolist(), "b": self.weights().tolist()}


def psnr_loss(x: Tensor, target: Tensor) -> Tensor:
    """log of the batch's mean squared error: -PSNR of the batch (as :func:`accelkit.metrics.psnr` measures it) up
    to the factor 10 / ln 10 and an offset. Its gradient is the MSE's divided by the MSE itself, so the step size
    stays the same as the error falls by orders of magnitude."""
    return torch.log((x.double() - target.double()).pow(2).mean() + 1e-30)


class _SymbolicTeacher(Teacher):
    """A teacher on ``schedule`` whose k-th evaluation returns the velocity basis vector e_{k+1}: run on the state
    e_0 (one row, n + 1 coefficients), a linear solver computes the coefficients of its points and its output."""

    def __init__(self, schedule, n: int):
        super().__init__()
        self.schedule, self.sample_shape, self.n = schedule, (n + 1,), n
        self.calls: list[tuple[float, Tensor]] = []

    def denoise(self, x: Tensor, t: Tensor, cond=None) -> tuple[Tensor, Tensor]:
        k = len(self.calls)
        if k >= self.n:
            raise AccelkitError(f"solver made more than {self.n} evaluations")
        tt = torch.as_tensor(t, dtype=F64).reshape(-1)[:1]
        self.calls.append((float(tt), x[0].detach().clone()))
        u = torch.zeros_like(x)
        u[:, k + 1] = 1.0
        sch = self.schedule
        al, si, dal, dsi = sch.alpha(tt), sch.sigma(tt), sch.d_alpha(tt), sch.d_sigma(tt)
        det = al * dsi - si * dal  # x = al x0 + si eps, u = dal x0 + dsi eps
        return (dsi * x - si * u) / det, (al * u - dal * x) / det


@torch.no_grad()
def trace_linear_solver(teacher: Teacher, solver: str, nfe: int) -> tuple[Tensor, Tensor, Tensor]:
    """(times, a, b) of a standard solver at ``nfe`` evaluations on ``teacher``'s schedule and default grid."""
    from . import solve

    sym = _SymbolicTeacher(teacher.schedule, nfe)
    start = torch.zeros(1, nfe + 1, dtype=F64)
    start[0, 0] = 1.0
    out = solve(sym, start, solver=solver, nfe=nfe)[0]
    if len(sym.calls) != nfe:
        raise AccelkitError(f"{solver} made {len(sym.calls)} evaluations at NFE {nfe}, expected {nfe}")
    points = torch.stack([p for _, p in sym.calls[1:]] + [out])  # z_1 ... z_n
    if not torch.allclose(sym.calls[0][1], start[0]):
        raise AccelkitError(f"{solver} does not start by evaluating at its initial point")
    times = torch.tensor([t for t, _ in sym.calls], dtype=F64)
    return times, points[:, 0].clone(), points[:, 1:].clone()


__all__ = ["NonStationarySolver", "psnr_loss", "trace_linear_solver"]
