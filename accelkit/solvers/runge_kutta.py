"""One-step methods on the velocity, dx/dt = v(x, t) = alpha'(t) x0_hat + sigma'(t) eps_hat, in the teacher's own t.

None of them evaluates the teacher at the grid's last time, where sigma may be 0 and the velocity undefined (VP
schedules have sigma'(0) = inf): the 2-stage methods end on an Euler step when needed, as EDM's sampler does.
To run them in another parameterisation (e.g. EDM's sigma), rescale the teacher to that schedule
(:class:`accelkit.teacher.RescaledTeacher`); the ODE is the same, the steps differ.
"""

from __future__ import annotations

from torch import Tensor

from ..teacher import Condition, Teacher
from .base import Solver, host_to_device, on_device, register_solver


class Euler(Solver):
    """Euler's method: x_{i+1} = x_i + h_i v(x_i, t_i), h_i = t_{i+1} - t_i. One evaluation per step, order 1.

    On the linear schedule with a flow-prediction teacher this is the flow-matching Euler sampler of SD3 / Flux.
    """

    name = "euler"

    def sample(self, teacher: Teacher, x: Tensor, ts: Tensor, nfe: int, cond: Condition | None = None) -> Tensor:
        h, t, b = on_device(ts.diff(), x), host_to_device(ts, x.device), x.shape[0]
        for i in range(len(h)):
            x = x + h[i] * teacher.velocity(x, t[i].expand(b), cond)
        return x


class Heun(Solver):
    """Heun's method (explicit trapezoid; Karras et al. 2022, Algorithm 1 without churn), order 2:

        d_i = v(x_i, t_i),  x~ = x_i + h d_i,  x_{i+1} = x_i + h/2 (d_i + v(x~, t_{i+1})).

    NFE rule: the last step is always an Euler step (EDM's rule, since sigma(t_min) may be 0). NFE = 2k + 1 gives k
    Heun steps and the final Euler step (k + 1 intervals, exactly EDM's 2N - 1); NFE = 2k gives an Euler first step,
    k - 1 Heun steps and the final Euler step (k + 1 intervals). An Euler step has local error O(h^2), so one or two
    of them keep the global order 2.
    """

    name = "heun"

    def steps(self, nfe: int) -> int:
        return nfe // 2 + 1 if nfe > 1 else 1

    def stages(self, nfe: int) -> list[int]:
        """Evaluations per step (1 = Euler, 2 = Heun); they sum to ``nfe``."""
        if nfe == 1:
            return [1]
        k = nfe // 2
        return [2] * k + [1] if nfe % 2 else [1] + [2] * (k - 1) + [1]

    def sample(self, teacher, x, ts, nfe, cond=None):
        h, t, b = on_device(ts.diff(), x), host_to_device(ts, x.device), x.shape[0]
        for i, stages in enumerate(self.stages(nfe)):
            d = teacher.velocity(x, t[i].expand(b), cond)
            if stages == 1:
                x = x + h[i] * d
            else:
                x_euler = x + h[i] * d
                x = x + 0.5 * h[i] * (d + teacher.velocity(x_euler, t[i + 1].expand(b), cond))
        return x


class Midpoint(Solver):
    """The explicit midpoint method, order 2:

        x_{i+1} = x_i + h v(x_i + h/2 v(x_i, t_i), t_i + h/2).

    It never evaluates at t_{i+1}. NFE = 2k gives k midpoint steps; NFE = 2k + 1 adds a final Euler step.
    """

    name = "midpoint"

    def steps(self, nfe: int) -> int:
        return nfe // 2 + nfe % 2

    def sample(self, teacher, x, ts, nfe, cond=None):
        h, t, b = on_device(ts.diff(), x), host_to_device(ts, x.device), x.shape[0]
        t_mid = 0.5 * (t[:-1] + t[1:])
        for i in range(self.steps(nfe)):
            d = teacher.velocity(x, t[i].expand(b), cond)
            if i < nfe // 2:
                d = teacher.velocity(x + 0.5 * h[i] * d, t_mid[i].expand(b), cond)
            x = x + h[i] * d
        return x


register_solver("euler", Euler)
register_solver("heun", Heun)
register_solver("midpoint", Midpoint)
