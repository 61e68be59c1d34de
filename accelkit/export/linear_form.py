"""An accelkit sampler as a table of linear coefficients, found by running the solver on symbols.

Every fixed-grid solver is linear in the teacher's predictions: each step combines the current state, earlier states
and predictions with coefficients that depend on the grid and the schedule only. Writing m_k for the x0 prediction of
evaluation k and x_init for the starting state, the point of evaluation j and the final sample are therefore

    x_j = a_j x_init + sum_{k < j} b_jk m_k,

the non-stationary form of Shaul et al. (2024, "Bespoke Non-Stationary Solvers", arXiv 2403.01329). With the
prediction's eps = (x - alpha(t) m) / sigma(t), the velocity alpha' m + sigma' eps is linear in (x, m) too.

:func:`linear_form` finds a and b without knowing the solver: it runs the solver itself (any registered one,
learned solvers included) on a symbolic teacher whose "state" is the coefficient vector over (x_init, m_0, m_1, ...)
and whose evaluation k answers with the fresh symbol m_k. The solver's own arithmetic then builds the table, in
float64. :func:`scheduler_config` adds what a diffusers pipeline needs to feed the network (timestep input, scale of
the scale-time transformation, x0 from the network output) and gives :class:`AccelkitScheduler`'s config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import AccelkitError
from ..schedules import Schedule, as_time
from ..solvers.base import Solver
from ..teacher import NetworkTeacher, RescaledTeacher, Teacher, broadcast_to, output_to_x0_eps

F64 = torch.float64


class SymbolicTeacher(Teacher):
    """A stand-in for ``teacher`` whose states are coefficient vectors over (x_init, m_0, ..., m_{n-1}) (batch 1,
    float64).

    Evaluation k records its time and point and predicts x0 = m_k and the eps the network's own parameterisation
    implies: eps = (x_A - alpha_A m_k) / sigma_A at the network's input x_A = x / s and time t_A (s = 1, t_A = t
    unless the teacher is rescaled). This is exact wherever the teacher is, including the clamped ends of a rescaled
    teacher's time map, where x is not alpha m + sigma eps under the new schedule.
    """

    #: Solvers that draw fresh noise (the consistency samplers) ask :meth:`noise_symbol` for draw k instead: the
    #: fresh noise z_k is one more symbol, so their form is linear in (x_init, m_0, ..., z_0, ...).
    symbolic = True

    def __init__(self, teacher: Teacher, evaluations: int):
        super().__init__()
        self.teacher = teacher
        self.schedule = teacher.schedule
        self.info = getattr(teacher, "info", None) or {}  # e.g. a consistency student's parameterisation
        self.evaluations = evaluations
        self.sample_shape = (1 + 2 * evaluations,)  # x_init, m_0 .. m_{n-1}, z_0 .. z_{n-1}
        self.times: list[float] = []
        self.points: list[Tensor] = []

    def noise_symbol(self, k: int, like: Tensor) -> Tensor:
        """The fresh standard normal draw of step k (accelkit's :func:`accelkit.solvers.consistency.fresh_noise`) as
        the symbol z_k."""
        if k >= self.evaluations:
            raise AccelkitError("the solver drew fresh noise more often than once per evaluation")
        z = torch.zeros_like(like)
        z[:, 1 + self.evaluations + k] = 1.0
        return z

    def network_time(self, t: Tensor) -> tuple[Tensor, Tensor, Schedule]:
        """(t_A, s, schedule A) of the network under the teacher at solver times t."""
        if isinstance(self.teacher, RescaledTeacher):
            t_a, s = self.teacher.time_map(t)
            return t_a, s, self.teacher.base.schedule
        return t, torch.ones_like(t), self.teacher.schedule

    def denoise(self, x, t, cond=None):
        k = len(self.points)
        if k >= self.evaluations:
            raise AccelkitError("the solver evaluated the teacher more often than its NFE")
        t = as_time(t, x.device)
        self.times.append(float(t.reshape(-1)[0]))
        self.points.append(x[0].clone())
        m = torch.zeros_like(x)
        m[:, 1 + k] = 1.0
        t_a, s, sched = self.network_time(t)
        x_a = x / broadcast_to(s, x)
        eps = (x_a - broadcast_to(sched.alpha(t_a), x) * m) / broadcast_to(sched.sigma(t_a), x)
        return m, eps


@dataclass
class LinearForm:
    """A sampler as coefficients: ``times[j]`` the solver time of evaluation j, ``points[j]`` its coefficients over
    (x_init, m_0, ..., m_{N-1}, z_0, ..., z_{N-1}), ``final`` those of the sample (float64, length 1 + 2 NFE each; the
    z_k, fresh noise of step k, are nonzero only for the re-noising consistency samplers)."""

    times: list[float]
    points: list[Tensor]
    final: Tensor

    @property
    def nfe(self) -> int:
        return len(self.times)


def linear_form(teacher: Teacher, solver: str | Solver, nfe: int, grid: Tensor) -> LinearForm:
    """The coefficients of ``solver`` with ``nfe`` evaluations on the time grid ``grid`` for ``teacher``."""
    from ..solvers import get_solver

    solver = get_solver(solver)
    probe = SymbolicTeacher(teacher, nfe)
    x_init = torch.zeros(1, 1 + 2 * nfe, dtype=F64)
    x_init[0, 0] = 1.0
    with torch.no_grad():
        final = solver.sample(probe, x_init, grid.to(F64), nfe)
    if len(probe.points) != nfe:
        raise AccelkitError(f"solver {solver.name!r} evaluated the teacher {len(probe.points)} times, not its NFE "
                            f"{nfe}; it cannot be exported")
    form = LinearForm(probe.times, probe.points, final[0].clone())
    for row in [*form.points, form.final]:
        if not bool(torch.isfinite(row).all()):
            raise AccelkitError(f"solver {solver.name!r} on this grid evaluates the teacher where sigma = 0 "
                                "(coefficients are not finite); choose a grid that ends there without an evaluation")
    for j, row in enumerate(form.points):  # evaluation j may only use predictions made before it
        if bool((row[1 + j:1 + nfe] != 0).any()):
            raise AccelkitError(f"solver {solver.name!r} is not explicit (evaluation {j} depends on later predictions)")
    if float(form.points[0][0]) == 0.0:
        raise AccelkitError(f"solver {solver.name!r} does not start from the initial state")
    return form


def _x0_from(teacher: NetworkTeacher, t: float) -> tuple[float, float]:
    """(c, d) with x0 = c x + d o for the network output o at its input x and its own time t (float64)."""
    x = torch.tensor([1.0, 0.0], dtype=F64)
    out = torch.tensor([0.0, 1.0], dtype=F64)
    x0, _ = output_to_x0_eps(teacher.prediction, out, x, torch.tensor(t, dtype=F64), teacher.schedule)
    return float(x0[0]), float(x0[1])


def network_of(teacher: Teacher) -> NetworkTeacher:
    """The network teacher under a (possibly rescaled) teacher."""
    base = teacher.base if isinstance(teacher, RescaledTeacher) else teacher
    if not isinstance(base, NetworkTeacher):
        raise AccelkitError(f"a {type(base).__name__} has no network to export")
    return base


def scheduler_config(teacher: Teacher, solver: str | Solver, nfe: int, grid: Tensor,
                     record: dict[str, Any] | None = None) -> dict[str, Any]:
    """The :class:`accelkit.export.scheduler.AccelkitScheduler` config that replays ``solver`` on ``teacher``.

    The table is re-expressed over the state of the first evaluation (x_0 = a_0 x_init), which is what the pipeline
    starts from: its first network input is unit noise times ``init_noise_sigma``.
    """
    net = network_of(teacher)
    form = linear_form(teacher, solver, nfe, grid)
    a0 = float(form.points[0][0])
    rows = [*form.points[1:], form.final]
    times = torch.tensor(form.times, dtype=F64)
    if isinstance(teacher, RescaledTeacher):
        net_times, scales = teacher.time_map(times)
    else:
        net_times, scales = times, torch.ones_like(times)
    timesteps = net.time_input(net_times).to(torch.float32).tolist()
    coefficients = [_x0_from(net, float(t)) for t in net_times]
    cfg = {
        "num_inference_steps": nfe,
        "timesteps": [float(v) for v in timesteps],
        "input_scales": [float(s) for s in scales],
        "x0_from_input": [c for c, _ in coefficients],
        "x0_from_output": [d for _, d in coefficients],
        "x_init_coefficients": [float(r[0]) / a0 for r in rows],
        "x0_coefficients": [[float(v) for v in r[1:2 + j]] for j, r in enumerate(rows)],
        "init_noise_sigma": teacher.schedule.prior_std() * a0 / float(scales[0]),
        "num_train_timesteps": int(net.time_input.num_train_timesteps),
        "sampler": dict(record or {}),
    }
    noise = [[float(v) for v in r[1 + nfe:1 + nfe + j + 1]] for j, r in enumerate(rows)]
    if any(v != 0.0 for row in noise for v in row):  # a re-noising consistency sampler: z_k from the sample's seed
        if a0 != 1.0 or float(scales[0]) != 1.0 or teacher.schedule.prior_std() != 1.0:
            raise AccelkitError("a re-noising sampler exports only when its first network input is its starting "
                                "noise itself (the fresh draws are seeded by it)")
        cfg["noise_coefficients"] = noise
    for key in ("input_scales", "x0_from_input", "x0_from_output", "x_init_coefficients"):
        if not all(math.isfinite(v) for v in cfg[key]):
            raise AccelkitError(f"the exported sampler has non-finite {key}; choose another grid")
    return cfg


__all__ = ["SymbolicTeacher", "LinearForm", "linear_form", "scheduler_config", "network_of"]
