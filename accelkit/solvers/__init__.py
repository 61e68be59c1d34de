"""Few-step ODE solvers over the teacher interface.

``solve(teacher, x_init, solver="dpm++2m", nfe=8)`` integrates the probability-flow ODE of ``teacher`` from
t_max = 1 (noise) to t_min = 0 (data) in exactly ``nfe`` teacher evaluations.

Solvers (registered by name; :func:`register_solver` adds more, e.g. learned bespoke solvers):

* ``euler``, ``heun``, ``midpoint``   one-step methods on the velocity in t (:mod:`.runge_kutta`);
* ``dpm++2m``, ``dpm++3m``, ``ddim`` DPM-Solver++ multistep, data prediction in log-SNR (:mod:`.dpm_solver`);
  ``ddim`` is its first-order update (DDIM with eta = 0);
* ``unipc``, ``unipc2``              UniPC-3 / UniPC-2 (bh2) predictor-corrector (:mod:`.unipc`);
* ``ipndm``, ``ipndm-v``             improved PNDM, fixed / variable-step Adams-Bashforth (:mod:`.ipndm`);
* ``consistency``, ``tcd``, ``edge-skip``  consistency students' multistep re-noising samplers (:mod:`.consistency`);
* ``shortcut``, ``meanflow``         the jumps of self-consistency students (:mod:`.self_consistency`);
* a ``bespoke`` artifact's path       a learned solver (:mod:`.learned`: :mod:`.bespoke` scale-time, :mod:`.bns`
                                     non-stationary), for its own teacher and NFE.

Grids (:mod:`.grids`): ``uniform``, ``logsnr``, ``edm`` (rho = 7), ``shift`` (SD3 / Flux), or a list of times.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import AccelkitError
from ..teacher import Condition, Teacher
from .base import GridNodes, Solver, get_solver, is_solver, register_solver, solver_names
from .consistency import ConsistencySampler
from .dpm_solver import DPMSolverPP
from .grids import GRID_NAMES, check_user_grid, default_grid, make_grid
from .ipndm import IPNDM
from .runge_kutta import Euler, Heun, Midpoint
from .self_consistency import MeanFlowSolver, ShortcutSolver  # noqa: F401  (registers shortcut, meanflow)
from .unipc import UniPC

#: The built-in solvers, in the order tables list them.
SOLVER_NAMES = ("euler", "heun", "midpoint", "dpm++2m", "dpm++3m", "unipc", "unipc2", "ipndm", "ipndm-v")


def solver_grid(
    teacher: Teacher, solver: str | Solver, nfe: int, grid: str | Sequence[float] | Tensor | None = None, **grid_kw
) -> Tensor:
    """The time grid ``solve`` would use (float64, host): N + 1 times for the N steps that ``nfe`` buys."""
    solver = get_solver(solver)
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise AccelkitError(f"NFE {nfe!r}: expected an integer of at least 1")
    steps = solver.steps(nfe)
    if grid is None:
        grid = default_grid(teacher.schedule)
    if not isinstance(grid, str):
        if grid_kw:
            raise AccelkitError(f"grid options {', '.join(sorted(grid_kw))} apply to named grids, not to a list of "
                                f"times")
        return check_user_grid(grid, steps)
    return make_grid(grid, steps, schedule=teacher.schedule, **grid_kw)


@torch.no_grad()
def solve(
    teacher: Teacher,
    x_init: Tensor,
    solver: str | Solver = "euler",
    nfe: int = 8,
    grid: str | Sequence[float] | Tensor | None = None,
    cond: Condition | None = None,
    **grid_kw,
) -> Tensor:
    """Integrate from ``x_init`` at the grid's first time to its last in exactly ``nfe`` teacher evaluations.

    ``grid``: a name from :data:`GRID_NAMES` (default: :func:`default_grid` of the teacher's schedule) or the times
    t_0 > ... > t_N themselves; ``grid_kw`` go to :func:`make_grid` (``t_max``, ``t_min``, ``shift``, ``rho``,
    ``sigma_min``, ``sigma_max``). ``x_init`` is the state at t_0 (``teacher.prior_sample(noise)`` for t_0 = 1).
    """
    solver = get_solver(solver)
    ts = solver_grid(teacher, solver, nfe, grid, **grid_kw)
    return solver.sample(teacher, x_init, ts, nfe, cond)


__all__ = [
    "solve", "solver_grid", "make_grid", "default_grid", "SOLVER_NAMES", "GRID_NAMES",
    "Solver", "register_solver", "get_solver", "is_solver", "solver_names", "GridNodes",
    "Euler", "Heun", "Midpoint", "DPMSolverPP", "UniPC", "IPNDM", "ConsistencySampler",
]
