"""The samplers of self-consistency students: shortcut models' jumps and MeanFlow's average-velocity jumps.

Both step on the linear path (t = 1 noise, t = 0 data; a student trained from a teacher on another schedule is
loaded under the scale-time transformation to it, :mod:`accelkit.linear_path`) along the grid t_0 = 1 > ... > t_N = 0
(uniform by default: N equal steps of 1/N), one evaluation per step:

* ``shortcut`` (Frans et al. 2024): z_{t-d} = z_t - d s(z_t, t, d) with the step size d = t_i - t_{i+1} as the
  student's ``step_size`` input;
* ``meanflow`` (Geng et al. 2025): z_r = z_t - (t - r) u(z_t, r, t) with the interval t - r = t_i - t_{i+1} as the
  student's ``interval`` input; one step is x0 = eps - u(eps, 0, 1).

Either is Euler's step with the velocity replaced by the student's jump velocity for that step's size.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import AccelkitError
from ..teacher import Condition, Teacher
from .base import Solver, host_to_device, on_device, register_solver

#: The extra-input name of a shortcut model's step size d (:mod:`accelkit.extra_inputs`).
STEP_SIZE = "step_size"
#: The extra-input name of a MeanFlow student's interval t - r.
INTERVAL = "interval"


def network_of(teacher: Teacher) -> nn.Module | None:
    """The network under a (possibly rescaled) network teacher."""
    while not hasattr(teacher, "network") and hasattr(teacher, "base"):
        teacher = teacher.base  # type: ignore[assignment]
    return getattr(teacher, "network", None)


def check_jump_student(teacher: Teacher, solver: str, input_name: str) -> None:
    """The teacher is on the linear path and its network takes ``input_name``; else a one-line error. A teacher
    without a network ignores the input, and the jump is then Euler's step."""
    from ..extra_inputs import extra_inputs_of

    network = network_of(teacher)
    if network is None:  # no network (an analytic teacher, export's linear-form probe): the jump is Euler's step
        return
    names = [s.name for s in extra_inputs_of(network)]
    if input_name not in names:
        raise AccelkitError(f"solver {solver!r} is the sampler of a student with the extra input {input_name!r} "
                            f"(accelkit shortcut --method {'shortcut' if solver == 'shortcut' else 'meanflow'}); "
                            f"this model takes {names or 'none'}")
    if teacher.schedule.name != "linear":
        raise AccelkitError(f"solver {solver!r} steps on the linear path; this model is on "
                            f"{teacher.schedule.name!r}")


class JumpSolver(Solver):
    """N jumps z_{t_{i+1}} = z_{t_i} - (t_i - t_{i+1}) f(z_{t_i}, t_i; input = t_i - t_{i+1})."""

    input_name = ""

    def sample(self, teacher: Teacher, x: Tensor, ts: Tensor, nfe: int, cond: Condition | None = None) -> Tensor:
        from ..extra_inputs import with_extra_inputs

        check_jump_student(teacher, self.name, self.input_name)
        h, t, b = on_device(ts.diff(), x), host_to_device(ts, x.device), x.shape[0]
        sizes = on_device((-ts.diff()).tolist(), x).float()
        for i in range(len(h)):
            c = with_extra_inputs(cond, **{self.input_name: sizes[i].expand(b)})
            x = x + h[i] * teacher.velocity(x, t[i].expand(b), c)
        return x


class ShortcutSolver(JumpSolver):
    """Shortcut models' sampler: each step's size is the student's step-size input."""

    name = "shortcut"
    input_name = STEP_SIZE


class MeanFlowSolver(JumpSolver):
    """MeanFlow's sampler: each step is one average-velocity jump over its interval."""

    name = "meanflow"
    input_name = INTERVAL


register_solver("shortcut", ShortcutSolver)
register_solver("meanflow", MeanFlowSolver)

__all__ = ["ShortcutSolver", "MeanFlowSolver", "JumpSolver", "STEP_SIZE", "INTERVAL", "network_of",
           "check_jump_student"]
