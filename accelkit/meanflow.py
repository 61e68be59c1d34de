"""MeanFlow (Geng, Deng, Bai, Kolter & He 2025, "Mean Flows for One-step Generative Modeling"), on a teacher.

On the linear path z_t = (1 - t) x0 + t eps (t = 1 noise; :mod:`accelkit.linear_path`) with velocity v, the average
velocity between times r <= t is

    u(z_t, r, t) = 1 / (t - r) int_r^t v(z_tau, tau) dtau,     so   z_r = z_t - (t - r) u(z_t, r, t),

(u(z, t, t) = v(z, t)). Differentiating (t - r) u = int_r^t v along the trajectory through z_t gives the MeanFlow
identity

    u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t),   d/dt u = v . grad_z u + d_t u,

whose total derivative is one Jacobian-vector product of u with tangents (v, 0, 1) in (z, r, t)
(:func:`average_velocity_derivative`: ``torch.func.jvp`` in fp32, or a central finite difference
(u(z + h v, r, t + h) - u(z - h v, r, t - h)) / (2h) for networks without forward-mode derivatives). The student
u_theta regresses the stop-gradient target

    u_tgt = v - (t - r) sg(d/dt u_theta),    Delta = u_theta - u_tgt,

with the paper's adaptive weight: L = sg(w) ||Delta||^2, w = 1 / (||Delta||^2 + c)^p (||.||^2 summed over the
sample's elements, c = 1e-3; p = 1 on ImageNet, 0.75 on CIFAR-10; p = 0 is plain L2; :func:`meanflow_loss`).
v is the data velocity eps - x0 (or, with a teacher, the teacher's possibly guided velocity at z_t, which makes it a
distillation). (t, r) are drawn from a logit-normal (the paper's mean -0.4, std 1), ordered t >= r, and a share of
the pairs (the paper's 75 %) has r = t, where the target is v itself (:func:`draw_time_pairs`).

Sampling: K average-velocity jumps on the uniform grid (one evaluation each), one jump x0 = eps - u(eps, 0, 1)
(the ``meanflow`` solver, :mod:`accelkit.solvers.self_consistency`). The student is the teacher's network with the
interval t - r as one more zero-initialised input (the paper's (t, t - r) conditioning), so at the start it is
the teacher's velocity at every r: u(z, r, t) = v(z, t), right at r = t.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .errors import AccelkitError
from .objectives import sample_times
from .teacher import broadcast_to

#: u(z, r, t) -> the average velocity between r and t at z (t, r per sample, float64).
AverageVelocityFn = Callable[[Tensor, Tensor, Tensor], Tensor]
DERIVATIVES = ("jvp", "finite-difference")


class NoForwardDerivative(AccelkitError):
    """The network has an operation without a forward-mode derivative, so ``torch.func.jvp`` cannot run it."""


def draw_time_pairs(generator: torch.Generator, n: int, interval_share: float = 0.25, density: str = "logit-normal",
                    logit_mean: float = -0.4, logit_std: float = 1.0) -> tuple[Tensor, Tensor]:
    """(r, t) for n samples, float64: two times from ``density`` ordered t >= r; a share 1 - ``interval_share`` of
    them with r = t (a fixed number per batch, round(n * interval_share) with r != t, at random rows)."""
    a = sample_times(density, generator, n, logit_mean, logit_std)
    b = sample_times(density, generator, n, logit_mean, logit_std)
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.randperm(n, generator=generator)[: int(round(n * interval_share))]] = True
    return torch.where(keep, r, t), t


def average_velocity_derivative(u_fn: AverageVelocityFn, z: Tensor, r: Tensor, t: Tensor, v: Tensor,
                                derivative: str = "jvp", fd_step: float = 1e-3) -> tuple[Tensor, Tensor]:
    """(u, du/dt): u = u_fn(z, r, t) (with its autograd graph) and its total derivative along the flow
    d/dt u = v . grad_z u + d_t u (detached), by ``torch.func.jvp`` with tangents (v, 0, 1), or by a central finite
    difference of step ``fd_step`` (see the module docstring)."""
    if derivative == "jvp":
        from torch.func import jvp

        try:
            u, dudt = jvp(u_fn, (z, r, t), (v.to(z.dtype), torch.zeros_like(r), torch.ones_like(t)))
        except (RuntimeError, NotImplementedError) as e:
            if "forward" in str(e).lower() or "jvp" in str(e).lower():
                raise NoForwardDerivative(" ".join(str(e).split())[:200]) from None
            raise
        return u, dudt.detach()
    if derivative == "finite-difference":
        u = u_fn(z, r, t)
        h = float(fd_step)
        with torch.no_grad():
            dz = h * v.to(z.dtype)
            dudt = (u_fn(z + dz, r, t + h) - u_fn(z - dz, r, t - h)) / (2.0 * h)
        return u, dudt
    raise AccelkitError(f"derivative {derivative!r}: expected one of {', '.join(DERIVATIVES)}")


def meanflow_target(u_fn: AverageVelocityFn, z: Tensor, r: Tensor, t: Tensor, v: Tensor, derivative: str = "jvp",
                    fd_step: float = 1e-3) -> tuple[Tensor, Tensor]:
    """(u_theta, u_tgt): the prediction and the stop-gradient target v - (t - r) du/dt of the MeanFlow identity."""
    u, dudt = average_velocity_derivative(u_fn, z, r, t, v, derivative, fd_step)
    target = v.to(dudt.dtype) - broadcast_to(t - r, dudt) * dudt
    return u, target.detach()


def adaptive_weighted_loss(delta: Tensor, power: float = 1.0, c: float = 1e-3) -> Tensor:
    """The batch mean of sg(w) ||Delta||^2, w = 1 / (||Delta||^2 + c)^p, per sample (summed over its elements)."""
    sq = delta.reshape(delta.shape[0], -1).pow(2).sum(dim=1)
    if power == 0:
        return sq.mean()
    w = 1.0 / (sq.detach() + c) ** power
    return (w * sq).mean()


def meanflow_loss(u_fn: AverageVelocityFn, z: Tensor, r: Tensor, t: Tensor, v: Tensor, derivative: str = "jvp",
                  fd_step: float = 1e-3, power: float = 1.0, c: float = 1e-3) -> Tensor:
    """The MeanFlow loss of ``u_fn`` on (z, r, t) with velocity v (see the module docstring)."""
    u, target = meanflow_target(u_fn, z, r, t, v, derivative, fd_step)
    return adaptive_weighted_loss(u.float() - target.float() if u.dtype != torch.float64 else u - target, power, c)


@torch.no_grad()
def exact_average_velocity(teacher, z: Tensor, r: float, t: float, cond=None, tol: float = 1e-12) -> Tensor:
    """u*(z, r, t) = (z - Phi(z; t -> r)) / (t - r) of ``teacher`` on the linear path, from a high-accuracy solve
    (float64), and v(z, t) at r = t: the ground truth of a MeanFlow student."""
    from .linear_path import linear_path_teacher
    from .solvers.reference import reference_solve

    lin = linear_path_teacher(teacher)
    z64 = z.detach().to(torch.float64)
    if float(t) == float(r):
        return lin.velocity(z64, torch.tensor(float(t), dtype=torch.float64), cond)
    end = reference_solve(lin, z64, float(t), float(r), cond, rtol=tol, atol=tol)
    return (z64 - end.to(z64.device)) / (float(t) - float(r))


__all__ = ["AverageVelocityFn", "DERIVATIVES", "NoForwardDerivative", "draw_time_pairs",
           "average_velocity_derivative", "meanflow_target", "adaptive_weighted_loss", "meanflow_loss",
           "exact_average_velocity"]
