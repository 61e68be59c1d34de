"""High-accuracy reference solutions of a teacher's probability-flow ODE (scipy's adaptive DOP853).

The ground truth that solver orders, ``rescale`` and learned solvers are measured against. For the discrete VP
schedule, whose log(alpha) has a kink at every training step in t (an adaptive solver in t crawls across them), the
ODE is integrated in the log-SNR instead, dx/dlambda = v / (dlambda/dt), where the field is smooth.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..schedules import DiscreteVPSchedule
from ..teacher import Condition, Teacher

F64 = torch.float64


class ReferenceSolveFailed(RuntimeError):
    """The adaptive solver gave up (a step below floating-point spacing: a stiff or non-smooth field)."""


@torch.no_grad()
def reference_solve(
    teacher: Teacher, x: Tensor, t_start: float, t_end: float, cond: Condition | None = None,
    rtol: float = 1e-10, atol: float = 1e-10,
) -> Tensor:
    """x(t_end) from x(t_start) = ``x`` (float64, on the host), integrated at tolerance ``rtol`` / ``atol``."""
    from scipy.integrate import solve_ivp

    shape, sch = x.shape, teacher.schedule
    y0 = x.detach().to("cpu", F64).reshape(-1).numpy()
    if not isinstance(sch, DiscreteVPSchedule):

        def field(t, y):
            xt = torch.from_numpy(y).reshape(shape)
            return teacher.velocity(xt, torch.tensor(t, dtype=F64), cond).reshape(-1).numpy()

        span = (t_start, t_end)
    else:

        def field(lam, y):
            t = sch.t_of_log_snr(torch.tensor(lam, dtype=F64))
            dlam_dt = 2 * (sch.d_alpha(t) / sch.alpha(t) - sch.d_sigma(t) / sch.sigma(t))
            xt = torch.from_numpy(y).reshape(shape)
            return (teacher.velocity(xt, t, cond) / dlam_dt).reshape(-1).numpy()

        span = tuple(float(sch.log_snr(torch.tensor(v, dtype=F64))) for v in (t_start, t_end))
    sol = solve_ivp(field, span, y0, method="DOP853", rtol=rtol, atol=atol)
    if not sol.success:
        raise ReferenceSolveFailed(f"reference ODE solve failed: {sol.message}")
    return torch.from_numpy(sol.y[:, -1]).reshape(shape)
